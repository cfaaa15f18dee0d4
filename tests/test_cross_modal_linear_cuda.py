"""CUDA C++ backend of cross_modal_linear (csrc/) against the float64 reference.

Needs a CUDA device and the built extension (``M2PT_FORCE_CUDA_BUILD=1 python setup.py build_ext
--inplace``); skipped otherwise. Covers M in {1, 7, 64, 65, 197, 1576} (the GEMV path for M <= 64,
the tiled path above), odd and ViT-sized K / N, bf16 / fp16 / fp32 ("highest" = FFMA, "high" = tf32),
bias or none, λ of shape [1] or [N], every gradient, linear probing (only λ and x need gradients),
batched and non-contiguous x, rows of x and dy not 16-byte aligned, and determinism of dλ. The dgrad GEMV (M <= 64) alone through
torch.ops.m2pt_cuda.dgrad: M in {1, 3, 64} against the tiled kernel at 65, strided dy, vector and
scalar W / W' loads bit-identical, deterministic, fp32 FFMA whatever the tf32 flag, and the merged
weight rounded once to the input dtype (forward GEMV too).
"""
import functools

import pytest
import torch

from m2pt_kernels import available_backends
from m2pt_kernels._precision import fp32_matmul_allows_tf32

from helpers import make_inputs, rel_err, reference64, run_backend, tolerance

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif("cuda" not in available_backends(), reason="the cuda backend (m2pt_kernels._C) is not built"),
]

DEVICE = "cuda"
TOKENS = [1, 7, 64, 65, 197, 1576]
SHAPES = [(33, 17), (768, 2304)]  # (K, N): odd, and ViT-B attn.qkv
# (dtype, float32 matmul precision): fp32 "highest" runs the FFMA kernels, "high" the tf32 ones.
DLAM_TOL, DLAM_TOL_TF32 = 1e-4, 2e-3
PRECISIONS = [(torch.bfloat16, "highest"), (torch.float16, "highest"), (torch.float32, "highest"),
              (torch.float32, "high")]


@pytest.fixture
def matmul_precision(request):
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(request.param)
    yield request.param
    torch.set_float32_matmul_precision(old)


make_inputs = functools.partial(make_inputs, device=DEVICE)
run_cuda = functools.partial(run_backend, "cuda")


def dlam_err(got, ref, x, a, dy, per_channel):
    """dλ's error on the scale of its terms: |Σ_k G⊙W'| <= ‖G_n‖·‖W'_n‖ per channel (summed over n for
    one λ): a plain relative error is meaningless when the sum cancels (seen: 1.4e-4 for fp32 in the
    emulator). dλ is fp32 for every input dtype (exact products accumulated in fp32), so its bound is
    DLAM_TOL, or DLAM_TOL_TF32 when tf32 rounds G's inputs."""
    k, n = x.shape[-1], dy.shape[-1]
    g = dy.detach().double().cpu().reshape(-1, n).t() @ x.detach().double().cpu().reshape(-1, k)
    bound = g.norm(dim=1) * a.detach().double().cpu().norm(dim=1)
    bound = bound if per_channel else bound.sum().view(1)
    return ((got.detach().double().cpu() - ref.double()).norm() / bound.norm()).item()


def check_against_reference(inputs, dy, dtype):
    y, grads = run_cuda(inputs, dy)
    tf32 = dtype == torch.float32 and fp32_matmul_allows_tf32()
    y64, grads64 = reference64(*inputs, dy)
    tol = tolerance(dtype, DEVICE)
    assert y.dtype == dtype
    assert rel_err(y, y64) < tol, ("y", rel_err(y, y64))
    names = ["dx", "dW", "dW'", "dλ", "db"]
    for name, t, g, g64 in zip(names, inputs, grads, grads64):
        if t is None or not t.requires_grad:
            assert g is None, f"{name} was computed but not asked for"
            continue
        assert g is not None, f"{name} missing"
        assert g.shape == t.shape and g.dtype == t.dtype, (name, g.shape, g.dtype)
        if name == "dλ":
            err = dlam_err(g, g64, inputs[0], inputs[2], dy, t.numel() > 1)
            assert err < (DLAM_TOL_TF32 if tf32 else DLAM_TOL), (name, err)
        else:
            err = rel_err(g, g64)
            assert err < tol, (name, err)


@pytest.mark.parametrize("matmul_precision,dtype", [(p, d) for d, p in PRECISIONS],
                         indirect=["matmul_precision"], ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("m", TOKENS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("per_channel", [False, True], ids=["lam1", "lamN"])
def test_matches_reference(matmul_precision, dtype, k, n, m, bias, per_channel):
    inputs = make_inputs((m,), k, n, dtype, bias=bias, per_channel=per_channel)
    dy = torch.randn(m, n, device=DEVICE, dtype=dtype)
    check_against_reference(inputs, dy, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("lead", [(2, 19), (3, 40), (4, 197)])
def test_batched_non_contiguous_x(dtype, lead):
    inputs = make_inputs(lead, 40, 37, dtype, bias=True, per_channel=True, non_contiguous=True)
    assert not inputs[0].is_contiguous()
    dy = torch.randn(*lead, 37, device=DEVICE, dtype=dtype)
    check_against_reference(inputs, dy, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("m", [9, 97], ids=["gemv", "tiled"])
def test_rows_padded_off_the_vector_width(dtype, m):
    """x and dy as column slices of wider buffers (row strides K + 1, N + 1 with K, N multiples of 8):
    the base is aligned but later rows are not, so the kernels must take scalar loads (a 16-byte load
    there is a misaligned-address fault)."""
    k, n = 48, 40
    x, w, a, s, b = make_inputs((m,), k, n, dtype, bias=True, per_channel=True)
    x_pad = torch.empty(m, k + 1, device=DEVICE, dtype=dtype)[:, :k].copy_(x.detach()).requires_grad_(True)
    dy = torch.empty(m, n + 1, device=DEVICE, dtype=dtype)[:, :n].normal_()
    check_against_reference((x_pad, w, a, s, b), dy, dtype)


@pytest.mark.parametrize("m", [1, 197])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_probe_mode_only_lambda(dtype, m):
    """Linear probing: W and W' frozen; dλ (and dx) computed, dW / dW' never."""
    inputs = make_inputs((m,), 768, 768, dtype, bias=False, per_channel=False,
                         weight_trainable=False, aux_trainable=False)
    dy = torch.randn(m, 768, device=DEVICE, dtype=dtype)
    check_against_reference(inputs, dy, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_bias_only_gradient(dtype):
    """Only b trainable: db from the column-sum kernel (no GEMM)."""
    x, w, a, s, b = make_inputs((65,), 33, 17, dtype, bias=True, per_channel=False,
                                weight_trainable=False, aux_trainable=False)
    x.requires_grad_(False)
    s.requires_grad_(False)
    dy = torch.randn(65, 17, device=DEVICE, dtype=dtype)
    check_against_reference((x, w, a, s, b), dy, dtype)


def test_wgrad_op_lambda_only_and_deterministic():
    dy = torch.randn(1576, 2304, device=DEVICE, dtype=torch.bfloat16)
    x = torch.randn(1576, 768, device=DEVICE, dtype=torch.bfloat16)
    a = torch.randn(2304, 768, device=DEVICE, dtype=torch.bfloat16)
    for numel in (1, 2304):
        s = torch.randn(numel, device=DEVICE)
        outs = [torch.ops.m2pt_cuda.wgrad(dy, x, a, s, False, False, True, False, False) for _ in range(2)]
        dw, daux, dlam, db = outs[0]
        assert dw.numel() == 0 and daux.numel() == 0 and db.numel() == 0
        assert dlam.dtype == torch.float32 and dlam.shape == (numel,)
        assert torch.equal(outs[0][2], outs[1][2]), "dλ is not deterministic"
        g = dy.double().t() @ x.double()
        ref = (g * a.double()).sum(1)
        ref = ref if numel > 1 else ref.sum().view(1)
        assert dlam_err(dlam, ref, x, a, dy, numel > 1) < DLAM_TOL


def test_gemv_scalar_fallback_unaligned():
    """x starting at an odd element offset and K not a multiple of 8: the scalar GEMV path."""
    buf = torch.randn(7 * 43 + 1, device=DEVICE, dtype=torch.bfloat16)
    x = buf[1:].view(7, 43)
    w = torch.randn(29, 43, device=DEVICE, dtype=torch.bfloat16)
    a = torch.randn(29, 43, device=DEVICE, dtype=torch.bfloat16)
    s = torch.randn(29, device=DEVICE)
    b = torch.randn(29, device=DEVICE, dtype=torch.bfloat16)
    y = torch.ops.m2pt_cuda.forward(x, w, a, s, b, False)
    ref = x.double() @ (w.double() + s.double().view(-1, 1) * a.double()).t() + b.double()
    assert rel_err(y, ref) < 2e-2


def test_empty_tokens():
    x = torch.randn(0, 33, device=DEVICE, dtype=torch.bfloat16)
    w = torch.randn(17, 33, device=DEVICE, dtype=torch.bfloat16)
    s = torch.randn(1, device=DEVICE)
    y = torch.ops.m2pt_cuda.forward(x, w, w, s, None, False)
    assert y.shape == (0, 17)
    dw, daux, dlam, db = torch.ops.m2pt_cuda.wgrad(torch.randn(0, 17, device=DEVICE, dtype=torch.bfloat16), x, w, s,
                                                  True, True, True, True, False)
    assert dw.abs().sum() == 0 and dlam.abs().sum() == 0 and db.abs().sum() == 0


# ---- dgrad for few tokens (gemv_dgrad_kernel, M <= 64) through the op itself -------------------------
def dgrad64(dy, w, a, s):
    return dy.double() @ (w.double() + s.double().view(-1, 1) * a.double())


def dgrad_inputs(m, k, n, dtype, per_channel, strided_dy):
    w = (torch.randn(n, k, device=DEVICE) / k ** 0.5).to(dtype)
    a = (torch.randn(n, k, device=DEVICE) / k ** 0.5).to(dtype)
    s = torch.randn(n if per_channel else 1, device=DEVICE)
    if strided_dy:  # every other column of a wider buffer: strides (2N, 2)
        dy = torch.randn(m, 2 * n, device=DEVICE).to(dtype)[:, ::2]
        assert not dy.is_contiguous()
    else:
        dy = torch.randn(m, n, device=DEVICE).to(dtype)
    return dy, w, a, s


def shifted(t):
    """The same values at an odd element offset (not 16-byte aligned: the scalar loads)."""
    buf = torch.empty(t.numel() + 1, device=t.device, dtype=t.dtype)
    buf[1:] = t.reshape(-1)
    return buf[1:].view(t.shape)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("m", [1, 3, 64, 65])
@pytest.mark.parametrize("k,n", [(37, 70), (768, 2304), (3072, 768)])
@pytest.mark.parametrize("per_channel", [False, True], ids=["lam1", "lamN"])
@pytest.mark.parametrize("strided_dy", [False, True], ids=["dy", "dy-strided"])
def test_dgrad_small_m_matches_reference(dtype, m, k, n, per_channel, strided_dy):
    dy, w, a, s = dgrad_inputs(m, k, n, dtype, per_channel, strided_dy)
    dx = torch.ops.m2pt_cuda.dgrad(dy, w, a, s, False)
    assert dx.shape == (m, k) and dx.dtype == dtype and dx.is_contiguous()
    assert rel_err(dx, dgrad64(dy, w, a, s)) < tolerance(dtype, DEVICE)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("m", [1, 64])
def test_dgrad_gemv_vector_and_scalar_loads_agree(dtype, m):
    """Aligned W / W' with K % (16 / itemsize) == 0: 16-byte loads; shifted copies: scalar loads, same
    summation order, so bit-identical. Two runs are identical too (fixed-order reduction, no atomics)."""
    dy, w, a, s = dgrad_inputs(m, 768, 2304, dtype, True, True)
    vec = torch.ops.m2pt_cuda.dgrad(dy, w, a, s, False)
    assert torch.equal(vec, torch.ops.m2pt_cuda.dgrad(dy, w, a, s, False)), "dgrad GEMV is not deterministic"
    scalar = torch.ops.m2pt_cuda.dgrad(dy, shifted(w), shifted(a), s, False)
    assert torch.equal(vec, scalar)
    assert rel_err(vec, dgrad64(dy, w, a, s)) < tolerance(dtype, DEVICE)


@pytest.mark.parametrize("m", [5, 64])
def test_gemv_fp32_is_ffma_whatever_tf32(m):
    """M <= 64: forward and dgrad GEMVs multiply fp32 with FFMA; allow_tf32 changes nothing."""
    dy, w, a, s = dgrad_inputs(m, 768, 2304, torch.float32, False, False)
    assert torch.equal(torch.ops.m2pt_cuda.dgrad(dy, w, a, s, True), torch.ops.m2pt_cuda.dgrad(dy, w, a, s, False))
    x = torch.randn(m, 2304, device=DEVICE)
    wt, at = w.t().contiguous(), a.t().contiguous()
    assert torch.equal(torch.ops.m2pt_cuda.forward(x, wt, at, s, None, True),
                       torch.ops.m2pt_cuda.forward(x, wt, at, s, None, False))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("k", [8, 5], ids=["vector", "scalar"])
@pytest.mark.parametrize("m", [1, 65], ids=["gemv", "tiled"])
def test_merged_weight_rounded_once(dtype, k, m):
    """W + λ·W' formed in fp32 and rounded once to the input dtype, as the reference's merged_weight:
    W = 1 and λ·W' = 0.75 ulp(1) merge to 1 + ulp, and a difference with a weight of 1 leaves exactly
    ulp (0.75 ulp if the merge were not rounded). Every other product and sum is exact."""
    ulp = torch.finfo(dtype).eps
    w = torch.ones(2, k, device=DEVICE, dtype=dtype)
    a = torch.zeros(2, k, device=DEVICE, dtype=dtype)
    a[0] = 0.75 * ulp
    s = torch.tensor([1.0, 3.0], device=DEVICE)
    dy = torch.zeros(m, 2, device=DEVICE, dtype=dtype)
    dy[:, 0], dy[:, 1] = 1.0, -1.0
    assert torch.equal(torch.ops.m2pt_cuda.dgrad(dy, w, a, s, False), torch.full((m, k), ulp, device=DEVICE, dtype=dtype))
    x = torch.zeros(m, k, device=DEVICE, dtype=dtype)
    x[:, 0], x[:, 1] = 1.0, -1.0
    wf, af = torch.ones(1, k, device=DEVICE, dtype=dtype), torch.zeros(1, k, device=DEVICE, dtype=dtype)
    af[0, 0] = 0.75 * ulp
    y = torch.ops.m2pt_cuda.forward(x, wf, af, torch.ones(1, device=DEVICE), None, False)
    assert torch.equal(y, torch.full((m, 1), ulp, device=DEVICE, dtype=dtype))
