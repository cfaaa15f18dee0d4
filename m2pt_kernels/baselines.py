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


class PaperCrossModalReparamLinear(nn.Linear):
    """``y = F.linear(x, weight + cross_modal_scale * aux_weight, bias)``, as in the paper's code."""

    def __init__(self, in_features, out_features, bias=True, origin_layer=None, aux_weight=None,
                 is_aux_trainable=True, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.cross_modal_scale = nn.Parameter(torch.zeros(1, device=device))
        if aux_weight is None:
            aux_weight = torch.zeros(out_features, in_features, device=device, dtype=dtype)
        if tuple(aux_weight.shape) != tuple(self.weight.shape):
            raise ValueError(f"aux_weight has shape {list(aux_weight.shape)}, expected {list(self.weight.shape)}")
        self.aux_weight = nn.Parameter(aux_weight.detach().clone(), requires_grad=is_aux_trainable)
        if origin_layer is not None:
            with torch.no_grad():
                self.weight.copy_(origin_layer.weight)
                if self.bias is not None and origin_layer.bias is not None:
                    self.bias.copy_(origin_layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight + self.cross_modal_scale * self.aux_weight
        return F.linear(x, weight, self.bias)
