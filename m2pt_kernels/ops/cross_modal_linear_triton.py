r"""Triton backend of ``m2pt::cross_modal_linear`` (math: the op's docstring in ``cross_modal_linear.py``).

Two GEMM kernels and a small finalize kernel (the dλ / db partials); none ever writes W + λ·W' to
memory.

``_merged_gemm_kernel`` -- ``C[M, NC] = A[M, R] · B[R, NC]`` where B is a strided view of the merged
weight, formed tile by tile in registers: W and W' tiles are loaded, merged in fp32 with λ, cast to
A's dtype and fed to ``tl.dot``; fp32 accumulation, optional bias in the epilogue.
  - forward: A = x [M, K], B[k, n] = (W + λW')[n, k], λ runs along the output columns (NC = N).
  - dgrad:   A = dy [M, N], B[n, k] = (W + λW')[n, k], λ runs along the reduction (R = N).
  Tiling: one program per (BLOCK_M, BLOCK_C) output tile (grouped launch order for L2 reuse),
  looping over R in BLOCK_R steps. ``SWAP_AB`` computes the transposed tile
  Cᵀ = Bᵀ·Aᵀ so the merged weight (built in registers) is the *left* dot operand -- the one wgmma
  on Hopper may take from registers -- and the A tile stays on the shared-memory pipeline.

``_wgrad_kernel`` -- G = dyᵀ·x tiled over (BLOCK_N, BLOCK_K) output tiles, reducing over M in
BLOCK_M steps. The epilogue writes dW = G and dW' = λ·G only when asked, reduces the per-tile
partial of dλ against the W' tile into a small fp32 buffer [SPLIT_M, k-tiles, N] (λ of shape
[1]: the tile's partial summed over its channels too, one value per tile at column n-tile), and the
programs with k-tile index 0 write db = Σ_m dy (accumulated from the dy tiles they load anyway)
into an fp32 buffer [SPLIT_M, N]. When only dλ / db are wanted (linear probing) G is never written and
M may be split over ``SPLIT_M`` programs per tile (more parallelism when N·K tiles are few). When
G is written there is no split (it would need an fp32 [SPLIT_M, N, K] workspace).

``_finalize_kernel`` -- one launch after the wgrad kernel: sums the partials it wrote (and only
those) in a fixed order and writes dλ in λ's dtype (per channel, or summed over channels too for
λ of shape [1]) and db in dy's dtype. Deterministic for a given config, no atomics (under
``torch.use_deterministic_algorithms(True)`` the configs are fixed: ``DETERMINISTIC_GEMM``). So
wgrad is two launches (one when neither dλ nor db is wanted): at M = 197 tokens a launch costs
about as much as the math.

On CUDA both kernels are autotuned (configs below, for Ampere and Hopper). Under
``TRITON_INTERPRET=1`` one small config is used (tests may pick others with ``config_override``).
fp32 dots follow torch's fp32 matmul precision (``m2pt_kernels._precision``): IEEE at "highest" /
``fp32_precision = "ieee"``, otherwise TF32.
"""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Iterator, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._precision import fp32_matmul_allows_tf32

__all__ = ["forward", "dgrad", "wgrad", "config_override", "GEMM_CONFIGS", "WGRAD_CONFIGS"]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# --------------------------------------------------------------------------- kernels


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # UPCAST: bf16 operands under the interpreter, which multiplies the raw uint16 bits of bf16 in
    # tl.dot (triton-lang/triton#11584, "not supported yet"); every other bf16 value here is only
    # loaded, cast or stored. bf16·bf16 products are exact in fp32, so an IEEE fp32 dot of the
    # bf16-rounded operands gives what the tensor cores give.
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _tile_ids(pid, M, NC, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped launch order: GROUP_M row tiles share each column tile while it is in L2."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_c = tl.cdiv(NC, BLOCK_C)
    per_group = GROUP_M * num_c
    group = pid // per_group
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_c = (pid % per_group) // size_m
    return pid_m, pid_c


@triton.jit
def _merged_gemm_kernel(
    a_ptr, w_ptr, aux_ptr, lam_ptr, bias_ptr, c_ptr,
    M, NC, R,
    stride_am, stride_ar,
    stride_wr, stride_wc,  # W seen as B[R, NC]
    stride_ur, stride_uc,  # W' seen as B[R, NC]
    stride_lam,            # 0 when λ has shape [1]
    stride_bias,
    stride_cm, stride_cc,
    M_BUCKET,              # autotune key only (``_tune_bucket``)
    LAM_ON_R: tl.constexpr, HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, SWAP_AB: tl.constexpr,
):
    pid_m, pid_c = _tile_ids(tl.program_id(0), M, NC, BLOCK_M, BLOCK_C, GROUP_M)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_m = offs_m < M
    mask_c = offs_c < NC
    if not LAM_ON_R:  # forward: one λ per output column, loaded once
        lam_c = tl.load(lam_ptr + offs_c * stride_lam, mask=mask_c, other=0.0).to(tl.float32)
    in_dtype = a_ptr.dtype.element_ty

    if SWAP_AB:
        acc = tl.zeros((BLOCK_C, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        if LAM_ON_R:  # dgrad: λ indexes the reduction dim
            lam_r = tl.load(lam_ptr + offs_r * stride_lam, mask=mask_r, other=0.0).to(tl.float32)
        if SWAP_AB:
            # left operand: Bᵀ tile [BLOCK_C, BLOCK_R], merged in registers
            mask_b = mask_c[:, None] & mask_r[None, :]
            w = tl.load(w_ptr + offs_c[:, None] * stride_wc + offs_r[None, :] * stride_wr, mask=mask_b, other=0.0)
            u = tl.load(aux_ptr + offs_c[:, None] * stride_uc + offs_r[None, :] * stride_ur, mask=mask_b, other=0.0)
            if LAM_ON_R:
                lam = lam_r[None, :]
                b = (w.to(tl.float32) + lam * u.to(tl.float32)).to(in_dtype)
            else:  # padded r: 0 + λ·0 is NaN for λ = ±inf, and 0·NaN would reach valid outputs
                lam = lam_c[:, None]
                b = tl.where(mask_b, w.to(tl.float32) + lam * u.to(tl.float32), 0.0).to(in_dtype)
            a = tl.load(a_ptr + offs_r.to(tl.int64)[:, None] * stride_ar + offs_m[None, :] * stride_am,
                        mask=mask_r[:, None] & mask_m[None, :], other=0.0)
            acc = _dot(b, a, acc, PRECISION, UPCAST)
        else:
            a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_r.to(tl.int64)[None, :] * stride_ar,
                        mask=mask_m[:, None] & mask_r[None, :], other=0.0)
            mask_b = mask_r[:, None] & mask_c[None, :]
            w = tl.load(w_ptr + offs_r[:, None] * stride_wr + offs_c[None, :] * stride_wc, mask=mask_b, other=0.0)
            u = tl.load(aux_ptr + offs_r[:, None] * stride_ur + offs_c[None, :] * stride_uc, mask=mask_b, other=0.0)
            if LAM_ON_R:
                lam = lam_r[:, None]
                b = (w.to(tl.float32) + lam * u.to(tl.float32)).to(in_dtype)
            else:  # as above
                lam = lam_c[None, :]
                b = tl.where(mask_b, w.to(tl.float32) + lam * u.to(tl.float32), 0.0).to(in_dtype)
            acc = _dot(a, b, acc, PRECISION, UPCAST)

    if SWAP_AB:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_c * stride_bias, mask=mask_c, other=0.0).to(tl.float32)[:, None]
        c_ptrs = c_ptr + offs_c[:, None] * stride_cc + offs_m[None, :] * stride_cm
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_c[:, None] & mask_m[None, :])
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_c * stride_bias, mask=mask_c, other=0.0).to(tl.float32)[None, :]
        c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_c[None, :] * stride_cc
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_c[None, :])


@triton.jit
def _wgrad_kernel(
    dy_ptr, x_ptr, aux_ptr, lam_ptr, dw_ptr, daux_ptr, dlam_part_ptr, db_part_ptr,
    M, N, K,
    stride_dym, stride_dyn, stride_xm, stride_xk, stride_un, stride_uk, stride_lam,
    stride_part_split,     # dλ partials [SPLIT_M, k-tiles, N]: split stride; k-tile stride is N
    SPLIT_M, M_BUCKET,     # M_BUCKET: autotune key only (``_tune_bucket``)
    NEED_W: tl.constexpr, NEED_AUX: tl.constexpr, NEED_SCALE: tl.constexpr, NEED_BIAS: tl.constexpr,
    SCALAR_LAM: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, GROUP_N: tl.constexpr,
):
    pid_n, pid_k = _tile_ids(tl.program_id(0), N, K, BLOCK_N, BLOCK_K, GROUP_N)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    mask_k = offs_k < K
    rows = tl.cdiv(tl.cdiv(M, SPLIT_M), BLOCK_M) * BLOCK_M  # rows of M per split
    m_start = pid_s * rows
    m_end = tl.minimum(m_start + rows, M)

    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        mask_m = offs_m < m_end
        dyt = tl.load(dy_ptr + offs_n.to(tl.int64)[:, None] * stride_dyn + offs_m[None, :] * stride_dym,
                      mask=mask_n[:, None] & mask_m[None, :], other=0.0)  # dyᵀ tile [BLOCK_N, BLOCK_M]
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k.to(tl.int64)[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        acc = _dot(dyt, x, acc, PRECISION, UPCAST)
        if NEED_BIAS:
            db += tl.sum(dyt.to(tl.float32), axis=1)

    mask_nk = mask_n[:, None] & mask_k[None, :]
    out_offs = offs_n[:, None] * K + offs_k[None, :]  # dW, dW' are fresh contiguous [N, K]
    if NEED_W:
        tl.store(dw_ptr + out_offs, acc.to(dw_ptr.dtype.element_ty), mask=mask_nk)
    if NEED_AUX:
        lam = tl.load(lam_ptr + offs_n * stride_lam, mask=mask_n, other=0.0).to(tl.float32)
        tl.store(daux_ptr + out_offs, (acc * lam[:, None]).to(daux_ptr.dtype.element_ty), mask=mask_nk)
    if NEED_SCALE:
        u = tl.load(aux_ptr + offs_n[:, None] * stride_un + offs_k[None, :] * stride_uk, mask=mask_nk, other=0.0)
        # padded rows / columns of G are 0·x or dy·0, NaN where x or dy hold ±inf: kept out of the sum
        part = tl.sum(tl.where(mask_nk, acc * u.to(tl.float32), 0.0), axis=1)
        row = dlam_part_ptr + pid_s * stride_part_split + pid_k * N
        if SCALAR_LAM:  # λ [1]: the whole tile's share, at column pid_n (< N) of its k-tile row
            tl.store(row + pid_n, tl.sum(part, axis=0))
        else:
            tl.store(row + offs_n, part, mask=mask_n)
    if NEED_BIAS:
        tl.store(db_part_ptr + pid_s * N + offs_n, db, mask=mask_n & (pid_k == 0))


@triton.jit
def _finalize_kernel(
    dlam_part_ptr, db_part_ptr, dscale_ptr, db_ptr,
    N, SPLIT_M, K_TILES,   # K_TILES: the k-tile rows the wgrad launch wrote (its BLOCK_K), per split
    N_TILES,               # λ [1]: the columns it wrote per row (its n-tiles)
    stride_part_split,
    NEED_SCALE: tl.constexpr, NEED_BIAS: tl.constexpr, SCALAR_LAM: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, SCALAR_T: tl.constexpr, SCALAR_C: tl.constexpr,
):
    """dλ = Σ_split Σ_k-tile partials, db = Σ_split partials: fp32, fixed order, one launch.

    Per-channel dλ and db: one program per BLOCK_N channels. λ of shape [1]: program 0 also sums
    the [K_TILES, N_TILES] per-tile values of every split, in [SCALAR_T, SCALAR_C] blocks added
    into one fp32 block that a single fixed-shape tl.sum finishes.
    """
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    if NEED_BIAS:
        db = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for s in range(0, SPLIT_M):
            db += tl.load(db_part_ptr + s * N + offs_n, mask=mask_n, other=0.0)
        tl.store(db_ptr + offs_n, db.to(db_ptr.dtype.element_ty), mask=mask_n)
    if NEED_SCALE:
        if SCALAR_LAM:
            if pid == 0:
                tiles = tl.zeros((SCALAR_T, SCALAR_C), dtype=tl.float32)
                for s in range(0, SPLIT_M):
                    for t0 in range(0, K_TILES, SCALAR_T):
                        offs_t = t0 + tl.arange(0, SCALAR_T)
                        for c0 in range(0, N_TILES, SCALAR_C):
                            offs_c = c0 + tl.arange(0, SCALAR_C)
                            tiles += tl.load(dlam_part_ptr + s * stride_part_split + offs_t[:, None] * N
                                             + offs_c[None, :],
                                             mask=(offs_t < K_TILES)[:, None] & (offs_c < N_TILES)[None, :],
                                             other=0.0)
                total = tl.sum(tl.sum(tiles, axis=1), axis=0)
                tl.store(dscale_ptr, total.to(dscale_ptr.dtype.element_ty))
        else:
            acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
            for s in range(0, SPLIT_M):
                for t0 in range(0, K_TILES, BLOCK_T):
                    offs_t = t0 + tl.arange(0, BLOCK_T)
                    acc += tl.load(dlam_part_ptr + s * stride_part_split + offs_t[:, None] * N + offs_n[None, :],
                                   mask=(offs_t < K_TILES)[:, None] & mask_n[None, :], other=0.0)
            tl.store(dscale_ptr + offs_n, tl.sum(acc, axis=0).to(dscale_ptr.dtype.element_ty), mask=mask_n)


# --------------------------------------------------------------------------- configs


def _gemm_config(bm, bc, br, warps, stages, swap, group=8):
    return triton.Config(dict(BLOCK_M=bm, BLOCK_C=bc, BLOCK_R=br, GROUP_M=group, SWAP_AB=swap),
                         num_warps=warps, num_stages=stages)


def _wgrad_config(bn, bk, bm, warps, stages, group=8):
    return triton.Config(dict(BLOCK_N=bn, BLOCK_K=bk, BLOCK_M=bm, GROUP_N=group),
                         num_warps=warps, num_stages=stages)


# Ampere: mma.sync, 3-4 stage cp.async pipelines (~164 KiB smem on A100; the merged operand costs
# two loads, W and W'). Hopper: wgmma wants 64-row multiples per warpgroup; with SWAP_AB the merged
# weight is the register operand and x stays on the smem pipeline; BLOCK_M = 32/64 swapped
# configs cover small-M inference (M = 197). The last two are small 2-stage fallbacks: fp32 tiles
# take twice the shared memory of bf16 ones, and with IEEE dots none of the others fits the
# 99 KiB of an sm_86 / sm_89 GPU (RTX 30xx / 40xx, A10, L4, L40S).
GEMM_CONFIGS = [
    _gemm_config(128, 128, 32, 4, 4, False),
    _gemm_config(128, 128, 64, 8, 3, False),
    _gemm_config(128, 64, 32, 4, 4, False),
    _gemm_config(64, 128, 32, 4, 4, False),
    _gemm_config(64, 64, 64, 4, 3, False),
    _gemm_config(128, 256, 32, 8, 3, False),
    _gemm_config(128, 128, 32, 4, 4, True),
    _gemm_config(128, 128, 64, 8, 3, True),
    _gemm_config(64, 128, 64, 4, 4, True),
    _gemm_config(256, 128, 32, 8, 3, True),
    _gemm_config(32, 128, 64, 4, 4, True),
    _gemm_config(64, 64, 64, 4, 3, True),
    _gemm_config(128, 64, 32, 4, 2, False),
    _gemm_config(64, 64, 32, 4, 2, False),
]
WGRAD_CONFIGS = [
    _wgrad_config(128, 128, 32, 4, 4),
    _wgrad_config(128, 128, 64, 8, 3),
    _wgrad_config(128, 64, 32, 4, 4),
    _wgrad_config(64, 128, 32, 4, 4),
    _wgrad_config(64, 64, 64, 4, 3),
    _wgrad_config(128, 256, 32, 8, 3),
    _wgrad_config(256, 128, 32, 8, 3),
]

GEMM_KEY = ["M_BUCKET", "NC", "R", "LAM_ON_R", "HAS_BIAS", "PRECISION"]
WGRAD_KEY = ["M_BUCKET", "N", "K", "NEED_W", "NEED_AUX", "NEED_SCALE", "NEED_BIAS", "PRECISION"]

# Under torch.use_deterministic_algorithms(True): one fixed config per kernel and dtype instead of
# the autotuner's pick. dλ sums its per-tile partials in a fixed order, but the tiles' size is the
# chosen BLOCK_K, so an autotuner that picks differently in another process (timing noise) changes
# dλ's rounding; fixed configs give the same bits run after run on one GPU model. These fit every
# sm_80+ GPU's shared memory (fp32: the fallbacks above).
DETERMINISTIC_GEMM = {torch.float32: GEMM_CONFIGS[-2], torch.bfloat16: GEMM_CONFIGS[0], torch.float16: GEMM_CONFIGS[0]}
DETERMINISTIC_WGRAD = {torch.float32: WGRAD_CONFIGS[2], torch.bfloat16: WGRAD_CONFIGS[0],
                       torch.float16: WGRAD_CONFIGS[0]}


def smem_lower_bound(kind: str, config, elem_bytes: int) -> int:
    """Shared memory a config needs at least: its pipeline keeps ``num_stages - 1`` copies of the
    operand tiles (W and W' both for the merged operand). Compiled sizes are this or a little more
    (checked against triton 3.6 / 3.8 for sm_80 / sm_86 / sm_90)."""
    kw = config.kwargs
    if kind == "gemm":
        tile = kw["BLOCK_M"] * kw["BLOCK_R"] + 2 * kw["BLOCK_R"] * kw["BLOCK_C"]
    else:
        tile = kw["BLOCK_N"] * kw["BLOCK_M"] + kw["BLOCK_M"] * kw["BLOCK_K"]
    return (config.num_stages - 1) * tile * elem_bytes


_device_limits_cache: dict = {}


def _device_limits(device: torch.device) -> tuple[int, tuple[int, int]]:
    """(shared memory per block, opt-in, in bytes; compute capability) of a CUDA device."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    limits = _device_limits_cache.get(index)
    if limits is None:
        props = torch.cuda.get_device_properties(index)
        smem = getattr(props, "shared_memory_per_block_optin", None) or 0
        limits = _device_limits_cache[index] = (smem, (props.major, props.minor))
    return limits


def prune_for_device(kind: str, configs, tensor: Tensor):
    """The configs worth timing on ``tensor``'s GPU: none that cannot fit its shared memory (by the
    lower bound), and SWAP_AB only on Hopper and newer (it serves wgmma; on Ampere it doubles the
    operand staging for nothing). Never empty: the least demanding config stays, so a GPU that fits
    none gets triton's own error. CPU tensors (tests) keep every config."""
    if not tensor.is_cuda:
        return configs
    smem, capability = _device_limits(tensor.device)
    elem = tensor.element_size()
    keep = [c for c in configs
            if (smem == 0 or smem_lower_bound(kind, c, elem) <= smem)
            and (capability >= (9, 0) or not c.kwargs.get("SWAP_AB", False))]
    return keep or [min(configs, key=lambda c: smem_lower_bound(kind, c, elem))]


def _tune_bench(fn, quantiles=None):
    """The autotuner's timer: triton's do_bench with 5 ms of warm-up and 20 ms of repeats per config
    (its default, 25 + 100 ms, makes the 35 configs of a new shape cost ~4.5 s; 20 ms is still 60
    repeats of the slowest ViT-B GEMM at 50,432 tokens)."""
    import triton.testing
    return triton.testing.do_bench(fn, warmup=5, rep=20, quantiles=quantiles)


def autotuned(kernel, configs, **extra):
    """The autotuned launchers below (tests build their own, with a fake timer, under the interpreter)."""
    extra.setdefault("do_bench", _tune_bench)
    if kernel is _wgrad_kernel:
        # No reset_to_zero of the partials: the finalize kernel reads only the rows the chosen
        # config wrote (configs with a smaller BLOCK_K, benchmarked first, leave stale rows past them).
        prune = {"early_config_prune": lambda cfgs, nargs, **kw: prune_for_device("wgrad", cfgs, nargs["dy_ptr"])}
        return triton.autotune(configs=configs, key=WGRAD_KEY, prune_configs_by=prune, **extra)(kernel)
    prune = {"early_config_prune": lambda cfgs, nargs, **kw: prune_for_device("gemm", cfgs, nargs["a_ptr"])}
    return triton.autotune(configs=configs, key=GEMM_KEY, prune_configs_by=prune, **extra)(kernel)


# Autotuned launches hold this lock: triton's Autotuner keeps per-call state on itself (``nargs``,
# ``best_config``), which two threads launching at once (one autograd thread per GPU) would share.
_tune_lock = threading.Lock()


_gemm_tuned = autotuned(_merged_gemm_kernel, GEMM_CONFIGS)
_wgrad_tuned = autotuned(_wgrad_kernel, WGRAD_CONFIGS)

# The one config used under the interpreter (fast), unless a test overrides it.
_INTERPRET_GEMM = dict(BLOCK_M=16, BLOCK_C=16, BLOCK_R=16, GROUP_M=2, SWAP_AB=False)
_INTERPRET_WGRAD = dict(BLOCK_N=16, BLOCK_K=16, BLOCK_M=16, GROUP_N=2)
# The finalize kernel is not tuned: it moves a few KiB (fc2 at BLOCK_K=64: 48 k-tiles x 768
# channels; for λ [1], 48 x 6 tile values: one [SCALAR_T, SCALAR_C] block per 32 k-tiles).
FINALIZE_META = dict(BLOCK_N=128, BLOCK_T=8, SCALAR_T=32, SCALAR_C=32, num_warps=4)
_override: dict = {}


@contextlib.contextmanager
def config_override(gemm: Optional[dict] = None, wgrad: Optional[dict] = None,
                    split_m: Optional[int] = None) -> Iterator[None]:
    """Testing aid: launch with these meta-parameters instead of autotuning / the interpreter default.

    ``gemm``: BLOCK_M, BLOCK_C, BLOCK_R, GROUP_M, SWAP_AB (and optionally num_warps, num_stages);
    ``wgrad``: BLOCK_N, BLOCK_K, BLOCK_M, GROUP_N (...); ``split_m``: forces SPLIT_M for the
    λ/db-only wgrad (ignored when dW or dW' is written).
    """
    saved = dict(_override)
    for key, value in (("gemm", gemm), ("wgrad", wgrad), ("split_m", split_m)):
        if value is not None:
            _override[key] = value
    try:
        yield
    finally:
        _override.clear()
        _override.update(saved)


# --------------------------------------------------------------------------- launchers


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not fp32_matmul_allows_tf32():
        return "ieee"
    return "tf32"  # TF32 for fp32 at "high"/"medium"; ignored by tl.dot for 16-bit inputs


def _upcast(dtype: torch.dtype) -> bool:
    return dtype == torch.bfloat16 and _interpreting()


def _on_device(t: Tensor):
    """Launch on the tensors' GPU, not the current one (triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _tune_bucket(m: int, tensor: Tensor) -> int:
    """The autotune key's M_BUCKET: M rounded up to a power of 2 (one tuning per bucket), times 1000,
    plus the GPU's compute capability (86 for sm_86): triton's autotune cache does not look at the
    device, and a config tuned on one GPU model may not fit another's shared memory."""
    capability = 0
    if tensor.is_cuda:
        major, minor = _device_limits(tensor.device)[1]
        capability = 10 * major + minor
    return triton.next_power_of_2(m) * 1000 + capability


def _meta(kind: str, dtype: torch.dtype) -> Optional[dict]:
    """Explicit meta-parameters, or None to autotune."""
    if kind in _override:
        return dict(_override[kind])
    if _interpreting():
        return dict(_INTERPRET_GEMM if kind == "gemm" else _INTERPRET_WGRAD)
    if torch.are_deterministic_algorithms_enabled():
        config = (DETERMINISTIC_GEMM if kind == "gemm" else DETERMINISTIC_WGRAD)[dtype]
        return dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
    return None


def _merged_gemm(a: Tensor, weight: Tensor, aux_weight: Tensor, scale: Tensor,
                 bias: Optional[Tensor], lam_on_r: bool) -> Tensor:
    m = a.shape[0]
    n, k = weight.shape
    # forward: B[k, n] = merged[n, k]; dgrad: B[n, k] = merged[n, k]
    if lam_on_r:
        nc, r = k, n
        sw, su = (weight.stride(0), weight.stride(1)), (aux_weight.stride(0), aux_weight.stride(1))
    else:
        nc, r = n, k
        sw, su = (weight.stride(1), weight.stride(0)), (aux_weight.stride(1), aux_weight.stride(0))
    out = a.new_empty((m, nc))
    if out.numel() == 0:
        return out
    args = (a, weight, aux_weight, scale, bias if bias is not None else out, out,
            m, nc, r, a.stride(0), a.stride(1), *sw, *su, 0 if scale.numel() == 1 else scale.stride(0),
            bias.stride(0) if bias is not None else 0, out.stride(0), out.stride(1), _tune_bucket(m, a))
    flags = dict(LAM_ON_R=lam_on_r, HAS_BIAS=bias is not None,
                 PRECISION=_precision(a.dtype), UPCAST=_upcast(a.dtype))
    meta = _meta("gemm", a.dtype)
    with _on_device(a):
        if meta is None:
            grid = lambda META: (triton.cdiv(m, META["BLOCK_M"]) * triton.cdiv(nc, META["BLOCK_C"]),)  # noqa: E731
            with _tune_lock:
                _gemm_tuned[grid](*args, **flags)
        else:
            grid = (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(nc, meta["BLOCK_C"]),)
            _merged_gemm_kernel[grid](*args, **flags, **meta)
    return out


def forward(x2: Tensor, weight: Tensor, aux_weight: Tensor, scale: Tensor, bias: Optional[Tensor]) -> Tensor:
    """y = x·(W + λW')ᵀ + b on a 2-D (any strides) x; y in x's dtype."""
    return _merged_gemm(x2, weight, aux_weight, scale, bias, lam_on_r=False)


def dgrad(dy2: Tensor, weight: Tensor, aux_weight: Tensor, scale: Tensor) -> Tensor:
    """dx = dy·(W + λW')."""
    return _merged_gemm(dy2, weight, aux_weight, scale, None, lam_on_r=True)


def _split_m(m: int, n: int, k: int, writes_g: bool, device: torch.device) -> int:
    """SPLIT_M for the λ/db-only wgrad: enough programs to fill the GPU, ≥ 512 rows each."""
    if writes_g or m == 0:
        return 1
    if "split_m" in _override:
        return max(1, int(_override["split_m"]))
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    tiles = triton.cdiv(n, 128) * triton.cdiv(k, 128)
    return max(1, min(triton.cdiv(m, 512), triton.cdiv(2 * sms, tiles)))


def _workspace(shape, device: torch.device) -> Tensor:
    """fp32 scratch for the wgrad partials, left uninitialized: every value the finalize kernel
    reads was written by the wgrad launch (tests swap in a NaN-filled one to check that)."""
    return torch.empty(shape, device=device, dtype=torch.float32)


def wgrad(dy2: Tensor, x2: Tensor, aux_weight: Tensor, scale: Tensor,
          need_weight: bool, need_aux: bool, need_scale: bool, need_bias: bool):
    """(dW | None, dW' | None, dλ | None, db | None); see the op's docstring for the math.

    Kernel launches: the wgrad kernel, then -- when dλ or db is wanted -- the finalize kernel; no
    other device work (buffers come from torch.empty). Before the finalize kernel this path also
    launched a zero-fill of the dλ partials and 3-5 torch reductions / casts.
    """
    m, n = dy2.shape
    k = x2.shape[1]
    dw = aux_weight.new_empty((n, k)) if need_weight else None
    daux = aux_weight.new_empty((n, k)) if need_aux else None
    if not (need_weight or need_aux or need_scale):  # db alone needs no GEMM
        return None, None, None, (dy2.sum(dim=0, dtype=torch.float32).to(dy2.dtype) if need_bias else None)
    if n == 0 or k == 0:  # G is empty: nothing to launch
        if dw is not None:
            dw.zero_()
        if daux is not None:
            daux.zero_()
        dscale = torch.zeros_like(scale) if need_scale else None
        db = dy2.sum(dim=0, dtype=torch.float32).to(dy2.dtype) if need_bias else None
        return dw, daux, dscale, db

    split = _split_m(m, n, k, need_weight or need_aux, dy2.device)
    meta = _meta("wgrad", dy2.dtype)
    k_tiles = triton.cdiv(k, meta["BLOCK_K"] if meta is not None else min(
        c.kwargs["BLOCK_K"] for c in _wgrad_tuned.configs))
    # dλ partials [split, k-tiles, N], sized for the smallest BLOCK_K the autotuner may pick.
    dlam_part = _workspace((split, k_tiles, n) if need_scale else (1,), dy2.device)
    db_part = _workspace((split, n), dy2.device) if need_bias else None
    dummy = scale  # stands in for output pointers a variant never touches (never written)
    args = (dy2, x2, aux_weight, scale,
            dw if dw is not None else dummy, daux if daux is not None else dummy,
            dlam_part, db_part if db_part is not None else dummy,
            m, n, k, dy2.stride(0), dy2.stride(1), x2.stride(0), x2.stride(1),
            aux_weight.stride(0), aux_weight.stride(1), 0 if scale.numel() == 1 else scale.stride(0),
            k_tiles * n, split, _tune_bucket(m, dy2))
    scalar = need_scale and scale.numel() == 1
    flags = dict(NEED_W=need_weight, NEED_AUX=need_aux, NEED_SCALE=need_scale, NEED_BIAS=need_bias,
                 SCALAR_LAM=scalar, PRECISION=_precision(dy2.dtype), UPCAST=_upcast(dy2.dtype))
    dscale = scale.new_empty(scale.shape) if need_scale else None
    db = dy2.new_empty((n,)) if need_bias else None
    with _on_device(dy2):
        if meta is None:
            ran = {}

            def grid(META):  # evaluated last for the launch that runs: records its config, for this call only
                ran.update(META)
                return (triton.cdiv(n, META["BLOCK_N"]) * triton.cdiv(k, META["BLOCK_K"]), split)
            with _tune_lock:
                _wgrad_tuned[grid](*args, **flags)
        else:
            grid = (triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(k, meta["BLOCK_K"]), split)
            _wgrad_kernel[grid](*args, **flags, **meta)
            ran = meta
        # the partials it wrote: k-tile rows, and for λ [1] one column per n-tile
        written, n_tiles = triton.cdiv(k, ran["BLOCK_K"]), triton.cdiv(n, ran["BLOCK_N"])
        assert written <= k_tiles, (written, k_tiles)
        if need_scale or need_bias:
            programs = 1 if scalar and not need_bias else triton.cdiv(n, FINALIZE_META["BLOCK_N"])
            _finalize_kernel[(programs,)](
                dlam_part, db_part if db_part is not None else dlam_part,
                dscale if dscale is not None else dlam_part, db if db is not None else dlam_part,
                n, split, written, n_tiles, k_tiles * n,
                NEED_SCALE=need_scale, NEED_BIAS=need_bias, SCALAR_LAM=scalar, **FINALIZE_META)
    return dw, daux, dscale, db
