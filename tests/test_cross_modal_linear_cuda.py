"""CUDA C++ backend of cross_modal_linear (csrc/) against the float64 reference.

Needs a CUDA device and the built extension (``M2PT_FORCE_CUDA_BUILD=1 python setup.py build_ext
--inplace``); skipped otherwise. Covers M in {1, 7, 64, 65, 197, 1576} (the GEMV path for M <= 64,
the tiled path above), odd and ViT-sized K / N, bf16 / fp16 / fp32 ("highest" = FFMA, "high" = tf32),
bias or none, λ of shape [1] or [N], every gradient, linear probing (only λ and x need gradients),
batched and non-contiguous x, and determinism of dλ.
"""
import functools

import pytest
import torch

from m2pt_kernels import available_backends

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
    tf32 = dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest"
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
