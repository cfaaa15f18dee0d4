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


_COMPUTE_DTYPE = {torch.float16: torch.float32, torch.bfloat16: torch.float32,
                  torch.float32: torch.float32, torch.float64: torch.float64}


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    cd = _COMPUTE_DTYPE.get(dtype)
    if cd is not None:
        return cd
    if dtype.is_floating_point and dtype.itemsize <= 4:  # float8 (autocast casts it): torch won't promote those
        return torch.float32
    return torch.promote_types(dtype, torch.float32)


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _rows(scale: Tensor) -> Tensor:
    """λ broadcastable against [N, K]: a [1] λ broadcasts as it is (no view to make: this runs on
    every call), a per-channel [N] λ becomes a column."""
    return scale if scale.shape[0] == 1 else scale.view(-1, 1)


def merged_weight(weight: Tensor, aux_weight: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """W + λ·W' computed in fp32 (fp64 for fp64 inputs) and cast once to ``dtype``."""
    wd = weight.dtype
    if wd is dtype and wd is scale.dtype and (wd is torch.float32 or wd is torch.float64):
        return torch.addcmul(weight, aux_weight, _rows(scale))  # already the compute dtype
    cd = _compute_dtype(wd)
    merged = torch.addcmul(_as(weight, cd), _as(aux_weight, cd), _rows(_as(scale, cd)))
    return _as(merged, dtype)


def forward(x2: Tensor, weight: Tensor, aux_weight: Tensor, scale: Tensor, bias: Optional[Tensor]) -> Tensor:
    return F.linear(x2, merged_weight(weight, aux_weight, scale, x2.dtype), bias)


def dgrad(dy2: Tensor, weight: Tensor, aux_weight: Tensor, scale: Tensor) -> Tensor:
    return dy2 @ merged_weight(weight, aux_weight, scale, dy2.dtype)


def autocast_enabled(device_type: str) -> bool:
    """``torch.is_autocast_enabled(device_type)``, False for meta tensors (autocast has no meta device
    type and raises for it; it casts nothing there)."""
    return device_type != "meta" and torch.is_autocast_enabled(device_type)


def _mm_in(a: Tensor, b: Tensor, dtype: torch.dtype) -> Tensor:
    """``a @ b`` computed and returned in ``dtype``. A backward called inside an autocast region runs
    under it, and autocast would put the GEMM back in its low-precision dtype."""
    a, b = _as(a, dtype), _as(b, dtype)
    if autocast_enabled(a.device.type):
        with torch.autocast(a.device.type, enabled=False):
            return a @ b
    return a @ b


def wgrad(
    dy2: Tensor, x2: Tensor, aux_weight: Tensor, scale: Tensor,
    need_weight: bool, need_aux: bool, need_scale: bool, need_bias: bool,
    out: Optional[Tensor] = None,
):
    """``out``: a dead [N, K] tensor of dy's dtype to write G into (see ``backward``). Reductions and
    dW' in the compute dtype (``_as`` casts only where the dtypes differ).

    bf16 / fp16 with dλ or dW' asked for: G = dyᵀx is computed with an fp32 result (the operands
    cast to fp32, products exact) and rounded once for dW, as the fused kernels use their fp32
    accumulators. dλ sums N·K (one λ) products G ⊙ W' whose signs mix; from a G rounded to bf16 its
    error would be about 2⁻⁹·‖G ⊙ W'‖, which, when the sum is small against its terms, is several
    percent of dλ itself (measured: one random draw in ten at ViT-Ti widths beyond bf16's 2e-2).
    dW' = λ·G is representable in fp16 where G is not (a GradScaler-scaled dy, λ small): from a G
    rounded to fp16 it would be inf, or NaN for λ = 0."""
    dw = daux = dscale = db = None
    dt = dy2.dtype
    cd = _compute_dtype(dt)
    if need_weight or need_aux or need_scale:
        if (need_scale or need_aux) and dt != cd:
            gc = _mm_in(dy2.t(), x2, cd)  # G = dyᵀx in fp32, [N, K]
            g = (out.copy_(gc) if out is not None else gc.to(dt)) if need_weight else None
        else:
            g = torch.mm(dy2.t(), x2, out=out) if out is not None else dy2.t() @ x2  # G = dyᵀx, [N, K]
            gc = _as(g, cd)
        if need_weight:
            dw = g
        if need_aux:
            daux = _as(gc * _rows(_as(scale, cd)), dt)
        if need_scale:
            ac = _as(aux_weight, cd)  # a weight-sized cast for bf16 / fp16: only when dλ is asked for
            if scale.shape[0] == 1:  # one λ: Σ_{n,k} G ⊙ W' as a single dot product
                dscale = torch.dot(gc.reshape(-1), ac.reshape(-1)).view(1)
            else:
                dscale = (gc * ac).sum(dim=1)
            dscale = _as(dscale, scale.dtype)
    if need_bias:
        db = dy2.sum(dim=0) if dt == cd else dy2.sum(dim=0, dtype=cd).to(dt)
    return dw, daux, dscale, db


def backward(
    dy2: Tensor, x2: Tensor, weight: Tensor, aux_weight: Tensor, scale: Tensor,
    need_x: bool, need_weight: bool, need_aux: bool, need_scale: bool, need_bias: bool,
):
    """``dgrad`` and ``wgrad`` in one call, for the eager path: G is written into the merged-weight
    buffer that dx was computed from (dead by then, fresh, and of G's shape and dtype), so the
    backward allocates one weight-sized tensor fewer, which on the CPU is measurable at ViT widths.

    fp32 / fp64 (every tensor already in its compute dtype: no casts) take a flat copy of the same
    math: each Python step here is paid on every layer of every step, and at ViT-Ti widths on the CPU
    they add up to a few percent of the layer's time. ``wgrad`` serves the rest (bf16 / fp16) and the
    registered op.

    The eager Function calls this with grad mode off and on plain tensors only: it sends
    backward(create_graph=True) and batched cotangents to ``dgrad`` / ``wgrad``, since out= ops
    record no graph and don't batch."""
    dt = dy2.dtype
    if dt is weight.dtype and dt is scale.dtype and (dt is torch.float32 or dt is torch.float64):
        lam = _rows(scale)  # λ itself when it has shape [1]
        dx = buf = g = dw = daux = dscale = db = None
        if need_x:
            buf = torch.addcmul(weight, aux_weight, lam)
            dx = torch.mm(dy2, buf)
        if need_weight or need_aux or need_scale:
            g = torch.mm(dy2.t(), x2, out=buf) if buf is not None else torch.mm(dy2.t(), x2)
            if need_weight:
                dw = g
            if need_aux:
                daux = g * lam
            if need_scale:
                dscale = (torch.dot(g.reshape(-1), aux_weight.reshape(-1)).view(1) if lam is scale
                          else (g * aux_weight).sum(1))
        if need_bias:
            db = dy2.sum(0)
        return dx, dw, daux, dscale, db
    dx = buf = None
    if need_x:
        buf = merged_weight(weight, aux_weight, scale, dt)
        dx = dy2 @ buf
    return (dx,) + wgrad(dy2, x2, aux_weight, scale, need_weight, need_aux, need_scale, need_bias, out=buf)
