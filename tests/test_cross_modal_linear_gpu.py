"""Triton backend on a CUDA device at ViT sizes: every gradient vs float64, fp32 (TF32 and IEEE),
bf16, fp16, both kernel orientations, the autotuner, split-M linear probing, memory, and
torch.compile(fullgraph=True) with inductor. Skipped without CUDA (marker ``gpu``).

Device time is scarce: the orientation tests force one config each (no autotuning); only
``test_autotune_*`` benchmark the config lists.
"""
import pytest
import torch

from m2pt_kernels import cross_modal_linear, use_backend

from helpers import rel_err, reference64, tolerance

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

if torch.cuda.is_available():
    from m2pt_kernels.ops import cross_modal_linear_triton as triton_backend

DEVICE = "cuda"
# (tokens, K, N): ViT-B/16 at 224 px, one image (197 tokens) and a batch of 8 (1576): qkv, fc1, fc2.
QKV_1 = (197, 768, 2304)
FC1_8 = (1576, 768, 3072)
FC2_8 = (1576, 3072, 768)
# (name, dtype, float32 matmul precision)
MODES = [
    ("fp32-tf32", torch.float32, "high"),
    ("fp32-ieee", torch.float32, "highest"),
    ("bf16", torch.bfloat16, "highest"),
    ("fp16", torch.float16, "highest"),
]
GEMM_PLAIN = dict(BLOCK_M=128, BLOCK_C=128, BLOCK_R=32, GROUP_M=8, SWAP_AB=False, num_warps=4, num_stages=3)
GEMM_SWAP = dict(BLOCK_M=64, BLOCK_C=128, BLOCK_R=32, GROUP_M=8, SWAP_AB=True, num_warps=4, num_stages=3)
WGRAD = dict(BLOCK_N=128, BLOCK_K=128, BLOCK_M=32, GROUP_N=8, num_warps=4, num_stages=3)


@pytest.fixture
def matmul_precision():
    before = torch.get_float32_matmul_precision()
    yield torch.set_float32_matmul_precision
    torch.set_float32_matmul_precision(before)


def make_inputs(m, k, n, dtype, *, per_channel=True, bias=True, train_weights=True, lead=None):
    x = torch.randn(*(lead or (m,)), k, device=DEVICE, dtype=dtype)
    w = (torch.randn(n, k, device=DEVICE) / k ** 0.5).to(dtype)
    a = (torch.randn(n, k, device=DEVICE) / k ** 0.5).to(dtype)
    s = torch.randn(n if per_channel else 1, device=DEVICE)
    b = torch.randn(n, device=DEVICE, dtype=dtype) if bias else None
    for t, grad in ((x, True), (w, train_weights), (a, train_weights), (s, True), (b, True)):
        if t is not None:
            t.requires_grad_(grad)
    return x, w, a, s, b


def check(inputs, dtype):
    dy = torch.randn(*inputs[0].shape[:-1], inputs[1].shape[0], device=DEVICE, dtype=dtype)
    with use_backend("triton"):
        y = cross_modal_linear(*inputs)
    y.backward(dy)
    y_ref, grads_ref = reference64(*inputs, dy)
    tol = tolerance(dtype, DEVICE)
    assert y.dtype == dtype
    errors = {"y": rel_err(y, y_ref)}
    for name, t, g_ref in zip(("dx", "dW", "dW'", "dλ", "db"), inputs, grads_ref):
        if t is not None and t.requires_grad:
            assert t.grad is not None and t.grad.dtype == t.dtype and t.grad.shape == t.shape, name
            errors[name] = rel_err(t.grad, g_ref)
        elif t is not None:
            assert t.grad is None, f"{name} written though not requested"
    assert all(e < tol for e in errors.values()), (errors, tol)


@pytest.mark.parametrize("swap", [False, True], ids=["plain", "swap_ab"])
@pytest.mark.parametrize("mode", MODES, ids=[m[0] for m in MODES])
@pytest.mark.parametrize("shape", [QKV_1, FC1_8], ids=["qkv_197", "fc1_1576"])
def test_vit_shapes_against_float64(shape, mode, swap, matmul_precision):
    _, dtype, precision = mode
    matmul_precision(precision)
    inputs = make_inputs(*shape, dtype, per_channel=swap)
    with triton_backend.config_override(gemm=GEMM_SWAP if swap else GEMM_PLAIN, wgrad=WGRAD):
        check(inputs, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_autotune_fc2_batch(dtype, matmul_precision):
    matmul_precision("high")
    check(make_inputs(*FC2_8, dtype, lead=(8, 197)), dtype)
    for tuned, configs in ((triton_backend._gemm_tuned, triton_backend.GEMM_CONFIGS),
                           (triton_backend._wgrad_tuned, triton_backend.WGRAD_CONFIGS)):
        assert tuned.best_config in configs


def test_every_autotune_config_is_correct():
    """Each config as the autotuner would launch it; a wrong-but-fast config must never win."""
    for kind, configs in (("gemm", triton_backend.GEMM_CONFIGS), ("wgrad", triton_backend.WGRAD_CONFIGS)):
        for config in configs:
            with triton_backend.config_override(**{kind: config.all_kwargs()}):
                try:
                    check(make_inputs(*QKV_1, torch.bfloat16), torch.bfloat16)
                except AssertionError as exc:
                    raise AssertionError(f"{kind} config {config}: {exc}") from None
                except Exception as exc:  # out of shared memory etc.: the autotuner skips these
                    if "OutOfResources" not in type(exc).__name__:
                        raise


@pytest.mark.parametrize("tokens", [1576, 8 * 1576])
def test_linear_probe_split_m(tokens):
    """Frozen W, W': dλ (and dx, db) only, with M split over programs when N·K tiles are few."""
    inputs = make_inputs(tokens, 768, 768, torch.bfloat16, train_weights=False)
    check(inputs, torch.bfloat16)
    assert triton_backend._split_m(tokens, 768, 768, False, torch.device(DEVICE)) >= (2 if tokens > 1576 else 1)


@pytest.mark.parametrize("swap", [False, True], ids=["plain", "swap_ab"])
def test_awkward_shapes(swap):
    """M = 1, K and N not tile multiples, non-contiguous x, λ [1]."""
    gemm = GEMM_SWAP if swap else GEMM_PLAIN
    with triton_backend.config_override(gemm=gemm, wgrad=WGRAD):
        check(make_inputs(1, 769, 301, torch.float16, per_channel=False), torch.float16)
        x, w, a, s, b = make_inputs(0, 200, 130, torch.bfloat16)
        x = torch.randn(203, 3, 37, device=DEVICE, dtype=torch.bfloat16)[:200].movedim(0, -1).requires_grad_(True)
        check((x, w, a, s, b), torch.bfloat16)
        y = triton_backend.forward(torch.empty(0, 200, device=DEVICE, dtype=torch.bfloat16), w, a, s, b)
        assert y.shape == (0, 130)


@pytest.mark.parametrize("swap", [False, True], ids=["plain", "swap_ab"])
def test_forward_never_allocates_the_merged_weight(swap):
    x, w, a, s, b = (t.detach() if t is not None else None for t in make_inputs(*QKV_1, torch.bfloat16))
    with triton_backend.config_override(gemm=GEMM_SWAP if swap else GEMM_PLAIN):
        triton_backend.forward(x, w, a, s, b)  # compile outside the measurement
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        y = triton_backend.forward(x, w, a, s, b)
        torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    assert extra <= y.untyped_storage().nbytes() + 4096 < w.untyped_storage().nbytes(), extra


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_torch_compile_fullgraph_inductor(dtype):
    torch._dynamo.reset()
    x, w, a, s, b = make_inputs(*QKV_1, dtype, lead=(1, 197))
    dy = torch.randn(1, 197, QKV_1[2], device=DEVICE, dtype=dtype)

    def f(x, w, a, s, b):
        return torch.nn.functional.gelu(cross_modal_linear(x, w, a, s, b))

    with use_backend("triton"):
        y_eager = f(x, w, a, s, b)
        grads_eager = torch.autograd.grad(y_eager, (x, w, a, s, b), dy)
        compiled = torch.compile(f, fullgraph=True, backend="inductor")
        y = compiled(x, w, a, s, b)
        grads = torch.autograd.grad(y, (x, w, a, s, b), dy)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5  # inductor's fused gelu rounds differently in bf16
    assert rel_err(y, y_eager) < tol
    for g, ge in zip(grads, grads_eager):
        assert rel_err(g, ge) < tol
