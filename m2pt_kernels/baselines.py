"""The paper's own layer, kept as the baseline the benchmarks time and the checkpoint format we load.

``PaperCrossModalReparamLinear`` follows the official M2PT code (``CrossModalReparamLinear``): it
materializes ``W + λ·W'`` on every forward, calls ``F.linear`` and lets autograd keep the merged
matrix alive until backward. State-dict keys: ``weight``, ``bias``, ``aux_weight`` (always a
Parameter, frozen with ``requires_grad=False`` when not trainable), ``cross_modal_scale`` (shape
[1]). It is not used by the package's own layers.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import check_flag, check_size


class PaperCrossModalReparamLinear(nn.Linear):
    """``y = F.linear(x, weight + cross_modal_scale * aux_weight, bias)``, as in the paper's code.

    ``origin_layer`` (an ``nn.Linear`` of shape [out_features, in_features]) gives the layer its
    weight and bias, so that at λ = 0 it computes the origin's function: the layer has a bias exactly
    when the origin has one (a copy of it), whatever ``bias`` says. Without an origin layer ``bias``
    decides, as for ``nn.Linear``. ``aux_weight`` ([out_features, in_features], floating point) is
    copied; ``None`` holds zeros.
    """

    def __init__(self, in_features, out_features, bias=True, origin_layer=None, aux_weight=None,
                 is_aux_trainable=True, device=None, dtype=None):
        where = type(self).__name__
        in_features = check_size(where, "in_features", in_features)
        out_features = check_size(where, "out_features", out_features)
        bias = check_flag(where, "bias", bias)
        is_aux_trainable = check_flag(where, "is_aux_trainable", is_aux_trainable)
        shape = [out_features, in_features]
        if origin_layer is not None:
            if not isinstance(origin_layer, nn.Linear):
                raise TypeError(f"{where}: origin_layer must be an nn.Linear (or None), got "
                                f"{type(origin_layer).__name__}")
            if list(origin_layer.weight.shape) != shape:
                raise ValueError(f"{where}: origin_layer's weight has shape {list(origin_layer.weight.shape)}, "
                                 f"expected [out_features, in_features] = {shape}; pass the origin's "
                                 "in_features / out_features")
            bias = origin_layer.bias is not None  # the origin's function: its bias, or none
        if aux_weight is not None:
            if not isinstance(aux_weight, torch.Tensor):
                raise TypeError(f"{where}: aux_weight must be a torch.Tensor of shape {shape} (or None), got "
                                f"{type(aux_weight).__name__}")
            if not aux_weight.is_floating_point():
                raise TypeError(f"{where}: aux_weight must be floating point, got "
                                f"{str(aux_weight.dtype).replace('torch.', '')}; convert it with .float()")
            if list(aux_weight.shape) != shape:
                raise ValueError(f"{where}: aux_weight has shape {list(aux_weight.shape)}, expected {shape} "
                                 "([out_features, in_features]): the auxiliary layer must have the target's shape")
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.cross_modal_scale = nn.Parameter(torch.zeros(1, device=device))
        if aux_weight is None:
            aux_weight = torch.zeros(out_features, in_features, device=device, dtype=dtype)
        self.aux_weight = nn.Parameter(aux_weight.detach().clone(), requires_grad=is_aux_trainable)
        if origin_layer is not None:
            with torch.no_grad():
                self.weight.copy_(origin_layer.weight)
                if origin_layer.bias is not None:
                    self.bias.copy_(origin_layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight + self.cross_modal_scale * self.aux_weight
        return F.linear(x, weight, self.bias)
