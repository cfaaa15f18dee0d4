"""Plain-PyTorch backend of ``m2pt::cross_modal_linear``: the oracle and the CPU path.

Implements the math in ``cross_modal_linear``'s docstring. The merged weight W + λ·W' is formed in
(at least) fp32 for each GEMM that needs it and dropped right after: nothing weight-sized is kept
alive between forward and backward (the op saves only its inputs).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def merged_weight(weight: Tensor, aux_weight: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """W + λ·W' computed in fp32 (fp64 for fp64 inputs) and cast once to ``dtype``."""
    cd = _compute_dtype(weight.dtype)
    lam = scale.to(cd).view(-1, 1)
    return torch.addcmul(weight.to(cd), aux_weight.to(cd), lam).to(dtype)


def forward(x2: Tensor, weight: Tensor, aux_weight: Tensor, scale: Tensor, bias: Optional[Tensor]) -> Tensor:
    return F.linear(x2, merged_weight(weight, aux_weight, scale, x2.dtype), bias)


def dgrad(dy2: Tensor, weight: Tensor, aux_weight: Tensor, scale: Tensor) -> Tensor:
    return dy2 @ merged_weight(weight, aux_weight, scale, dy2.dtype)


def wgrad(
    dy2: Tensor, x2: Tensor, aux_weight: Tensor, scale: Tensor,
    need_weight: bool, need_aux: bool, need_scale: bool, need_bias: bool,
):
    dw = daux = dscale = db = None
    if need_weight or need_aux or need_scale:
        g = dy2.t() @ x2  # G = dyᵀx, [N, K]
        cd = _compute_dtype(g.dtype)
        if need_weight:
            dw = g.to(aux_weight.dtype)
        if need_aux:
            daux = (g.to(cd) * scale.to(cd).view(-1, 1)).to(aux_weight.dtype)
        if need_scale:
            per_channel = (g.to(cd) * aux_weight.to(cd)).sum(dim=1)
            dscale = (per_channel if scale.numel() > 1 else per_channel.sum().view(1)).to(scale.dtype)
    if need_bias:
        db = dy2.sum(dim=0, dtype=_compute_dtype(dy2.dtype)).to(dy2.dtype)
    return dw, daux, dscale, db
