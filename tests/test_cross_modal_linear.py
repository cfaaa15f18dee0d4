"""m2pt::cross_modal_linear: every backend against the float64 reference, the op contract, errors."""
import functools
import importlib.util
import os

import pytest
import torch

import m2pt_kernels
from m2pt_kernels import cross_modal_linear, use_backend
from m2pt_kernels import _dispatch

from conftest import device_for_tests, fused_backends
from helpers import (GRAD_NAMES, TOL, check_against_reference, linear_math, make_inputs, rel_err,
                     tolerance)

DEVICE = device_for_tests()
BACKENDS = ["reference"] + fused_backends()

# (leading dims of x, K, N): M=1, odd M, M over one tile; K and N not multiples of any tile.
SHAPES = [((1,), 8, 8), ((7,), 33, 17), ((2, 37), 40, 65), ((131,), 24, 20)]


make_inputs = functools.partial(make_inputs, device=DEVICE)


check_against_reference = functools.partial(check_against_reference, device=DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lead,k,n", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("per_channel", [False, True])
def test_fp32_against_float64(backend, lead, k, n, bias, per_channel):
    inputs = make_inputs(lead, k, n, torch.float32, bias=bias, per_channel=per_channel)
    check_against_reference(backend, inputs, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lead,k,n", [SHAPES[1], SHAPES[2]])
@pytest.mark.parametrize("per_channel", [False, True])
def test_half_against_float64(backend, dtype, lead, k, n, per_channel):
    """One λ too: its dλ sums N·K products whose signs mix, the hardest gradient to keep within
    tolerance at half precision (see the reference's ``wgrad``)."""
    inputs = make_inputs(lead, k, n, dtype, per_channel=per_channel)
    check_against_reference(backend, inputs, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_scalar_dlam_when_its_terms_cancel(backend, dtype):
    """One λ, and W' drawn so that dλ = Σ G ⊙ W' is a small fraction r of its terms' norm: dλ must
    still be within the dtype's tolerance, which a dλ reduced from a G rounded to bf16 / fp16 is not
    (its error is about 2⁻⁹·‖G ⊙ W'‖ in bf16, 2⁻¹²·‖G ⊙ W'‖ in fp16: 10-20% of dλ at these r).
    r stays far above fp32's own rounding of the sum (~1e-6 of the norm)."""
    r = {torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    x = torch.randn(64, 48, device=DEVICE, dtype=dtype)
    dy = torch.randn(64, 40, device=DEVICE, dtype=dtype)
    g = dy.double().t() @ x.double()
    a = torch.randn(40, 48, device=DEVICE, dtype=torch.float64) / 48 ** 0.5
    a = a - (g * a).sum() / (g * g).sum() * g  # no part along G: Σ G ⊙ a = 0
    a = (a + r * (g * a).norm() / (g * g).sum() * g).to(dtype)  # then Σ G ⊙ a = r·‖G ⊙ a‖
    terms = g * a.double()
    ratio = abs(terms.sum().item()) / terms.norm().item()
    assert r / 3 < ratio < 3 * r, f"the draw cancels to {ratio:.2e} of its terms, not about {r:.0e}"
    w = torch.randn(40, 48, device=DEVICE, dtype=dtype) / 48 ** 0.5
    s = torch.randn(1, device=DEVICE, requires_grad=True)
    b = torch.randn(40, device=DEVICE, dtype=dtype)
    with use_backend(backend):
        cross_modal_linear(x, w, a, s, b).backward(dy)
    assert rel_err(s.grad, terms.sum().view(1)) < TOL[dtype]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("aux_trainable", [True, False])
def test_non_contiguous_x_and_frozen_aux(backend, aux_trainable):
    inputs = make_inputs((3, 11), 19, 23, torch.float32, aux_trainable=aux_trainable, non_contiguous=True)
    check_against_reference(backend, inputs, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("x_grad", [True, False])
def test_strided_and_sliced_weights(backend, per_channel, x_grad):
    """W and W' as transposed views, W' also as a column slice of a wider matrix: every gradient,
    with and without dx (the reference's eager backward reuses a buffer of W's layout for G)."""
    inputs = list(make_inputs((13,), 19, 11, torch.float32, per_channel=per_channel, strided_weight=True))
    inputs[0].requires_grad_(x_grad)
    check_against_reference(backend, inputs, torch.float32)
    for t in inputs:
        t.grad = None
    inputs[2] = (torch.randn(11, 30, device=DEVICE) / 19 ** 0.5)[:, 5:24].requires_grad_(True)
    assert not inputs[2].is_contiguous()
    check_against_reference(backend, inputs, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_aux_grad_from_the_fp32_g(backend, dtype):
    """λ frozen, W' trainable, a loss-scaled dy (as under GradScaler) whose G = dyᵀx is beyond fp16's
    range while dW' = λ·G is not: dW' comes out finite and right (λ·G from the fp32 G, as the fused
    kernels do), and exactly 0 where λ = 0, not inf or NaN."""
    x = torch.randn(64, 24, device=DEVICE, dtype=dtype)
    dy = (torch.randn(64, 16, device=DEVICE) * 2 ** 12).to(dtype)
    g = dy.double().t() @ x.double()
    w = (torch.randn(16, 24, device=DEVICE) / 24 ** 0.5).to(dtype)
    a = (torch.randn(16, 24, device=DEVICE) / 24 ** 0.5).to(dtype).requires_grad_(True)
    s = torch.rand(16, device=DEVICE) * 1e-3 + 1e-4
    s[:3] = 0
    assert dtype == torch.bfloat16 or g.abs().max() > torch.finfo(dtype).max
    with use_backend(backend):
        cross_modal_linear(x, w, a, s, None).backward(dy)
    assert torch.isfinite(a.grad).all() and (a.grad[:3] == 0).all()
    assert rel_err(a.grad, s.double().view(-1, 1) * g) < TOL[dtype]


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_probe_writes_only_scale_and_x_grads(backend):
    """Only λ and x need gradients: dW, dW' and db are never produced."""
    inputs = make_inputs((9,), 21, 14, torch.float32, weight_trainable=False, aux_trainable=False)
    inputs[4].requires_grad_(False)
    check_against_reference(backend, inputs, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lambda_zero_is_plain_linear(backend):
    x, w, a, s, b = make_inputs((5,), 16, 12, torch.float32)
    with torch.no_grad():
        s.zero_()
    with use_backend(backend):
        y = cross_modal_linear(x, w, a, s, b)
    assert rel_err(y, torch.nn.functional.linear(x.double(), w.double(), b.double())) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_merged_weight_saved_for_backward(backend):
    """The op saves its inputs only: nothing weight-sized is kept alive until backward."""
    x, w, a, s, b = make_inputs((6,), 16, 12, torch.float32)
    inputs_ptrs = {t.data_ptr() for t in (x, w, a, s)}
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), use_backend(backend):
        y = cross_modal_linear(x, w, a, s, b)
    assert saved, "nothing saved: the hook did not see the op"
    for t in saved:
        assert t.data_ptr() in inputs_ptrs, f"saved a tensor of shape {list(t.shape)} that is not an input"
    y.sum().backward()


def test_gradcheck_float64_reference():
    x, w, a, s, b = make_inputs((2, 3), 5, 4, torch.float64, per_channel=True)
    s = s.detach().double().requires_grad_(True)
    checks = dict(check_batched_grad=True, check_forward_ad=True)  # vmap over the backward; the jvp
    with use_backend("reference"):
        assert torch.autograd.gradcheck(cross_modal_linear, (x, w, a, s, b), **checks)
        s1 = torch.randn(1, dtype=torch.float64, device=DEVICE, requires_grad=True)
        assert torch.autograd.gradcheck(cross_modal_linear, (x, w, a, s1, None), **checks)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per_channel", [False, True])
def test_opcheck(backend, per_channel):
    x, w, a, s, b = make_inputs((5,), 12, 10, torch.float32, per_channel=per_channel)
    op = torch.ops.m2pt
    torch.library.opcheck(op.cross_modal_linear.default, (x, w, a, s, b, backend))
    torch.library.opcheck(op.cross_modal_linear.default, (x, w, a, s, None, backend))
    dy = torch.randn(5, 10, device=DEVICE)
    torch.library.opcheck(op.cross_modal_linear_dgrad.default, (dy, w.detach(), a.detach(), s.detach(), backend))
    for flags in [(True, True, True, True), (False, False, True, False)]:
        torch.library.opcheck(
            op.cross_modal_linear_wgrad.default, (dy, x.detach(), a.detach(), s.detach(), *flags, backend)
        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph_matches_eager(backend):
    torch._dynamo.reset()
    x, w, a, s, b = make_inputs((2, 9), 16, 12, torch.float32, per_channel=True)
    dy = torch.randn(2, 9, 12, device=DEVICE)

    def f(x, w, a, s, b):
        return cross_modal_linear(x, w, a, s, b)

    with use_backend(backend):
        y_eager = f(x, w, a, s, b)
        grads_eager = torch.autograd.grad(y_eager, (x, w, a, s, b), dy)
        compiled = torch.compile(f, fullgraph=True, backend="inductor" if DEVICE == "cuda" else "aot_eager")
        y = compiled(x, w, a, s, b)
        grads = torch.autograd.grad(y, (x, w, a, s, b), dy)
    assert rel_err(y, y_eager) < 1e-5
    for g, ge in zip(grads, grads_eager):
        assert rel_err(g, ge) < 1e-5


def test_autocast_behaves_like_f_linear():
    x = torch.randn(4, 16, device=DEVICE)
    w, a = torch.randn(8, 16, device=DEVICE), torch.randn(8, 16, device=DEVICE)
    s = torch.full((1,), 0.5, device=DEVICE, requires_grad=True)
    b = torch.randn(8, device=DEVICE)
    dtype = torch.bfloat16
    with torch.autocast(DEVICE, dtype=dtype):
        y = cross_modal_linear(x, w, a, s, b)
        y_lin = torch.nn.functional.linear(x, w + 0.5 * a, b)
    assert y.dtype == y_lin.dtype == dtype
    assert rel_err(y, y_lin) < 2e-2
    y.float().sum().backward()
    assert s.grad is not None and s.grad.dtype == torch.float32


def test_autocast_leaves_float64_alone_like_f_linear():
    x, w, a, s, b = make_inputs((5,), 16, 12, torch.float64)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        y = cross_modal_linear(x, w, a, s, b)
        assert y.dtype == torch.nn.functional.linear(x, w, b).dtype == torch.float64
        with pytest.raises(TypeError, match="x is float64 but weight is bfloat16"):
            cross_modal_linear(x, w.float(), a.float(), s, b.float())
    assert rel_err(y, linear_math(x, w, a, s.double(), b)) < 1e-12


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_inside_the_autocast_region_changes_no_gradient(backend):
    """``loss.backward()`` inside the ``with torch.autocast(...)`` block runs the backward under
    autocast; the op's backward must give the same gradients as outside it."""
    inputs = make_inputs((6,), 16, 8, torch.float32)
    grads = []
    for inside in (False, True):
        for t in inputs:
            t.grad = None
        with use_backend(backend), torch.autocast(DEVICE, dtype=torch.bfloat16):
            y = cross_modal_linear(*inputs)
            if inside:
                y.float().sum().backward()
        if not inside:
            y.float().sum().backward()
        grads.append([t.grad for t in inputs])
    for name, outside, inside in zip(GRAD_NAMES, *grads):
        assert outside.dtype == torch.float32 and torch.equal(outside, inside), name


# ---------------------------------------------------------------- bad input


def _good():
    x = torch.randn(3, 8)
    w, a = torch.randn(6, 8), torch.randn(6, 8)
    return x, w, a, torch.zeros(1), torch.zeros(6)


@pytest.mark.parametrize("change,exc,words", [
    (lambda x, w, a, s, b: (x, w, torch.randn(6, 9), s, b), ValueError, ["aux_weight", "[6, 9]", "[6, 8]"]),
    (lambda x, w, a, s, b: (torch.randn(3, 7), w, a, s, b), ValueError, ["x", "[3, 7]", "K=8"]),
    (lambda x, w, a, s, b: (x, w, a, torch.tensor(0.0), b), ValueError, ["0-d", "[1]"]),
    (lambda x, w, a, s, b: (x, w, a, torch.zeros(5), b), ValueError, ["cross_modal_scale", "[5]", "[6]"]),
    (lambda x, w, a, s, b: (x, w, a.double(), s, b), TypeError, ["float32", "float64", "aux_weight"]),
    (lambda x, w, a, s, b: (x, w, a, s, torch.zeros(5)), ValueError, ["bias", "[5]", "[6]"]),
    (lambda x, w, a, s, b: (x.half(), w, a, s, b), TypeError, ["x", "float16", "float32"]),
    (lambda x, w, a, s, b: (x, w, a, s, b.to("meta")), ValueError, ["bias on meta", "x on cpu"]),
    (lambda x, w, a, s, b: (x, w, a, 0.5, b), TypeError, ["cross_modal_scale", "float"]),
    (lambda x, w, a, s, b: (x, w[0], a[0], s, b), ValueError, ["weight", "2-D"]),
    (lambda x, w, a, s, b: (x.long(), w.long(), a.long(), s, None), TypeError, ["floating-point", "int64"]),
])
def test_bad_input_errors_name_both_sides(change, exc, words):
    with pytest.raises(exc) as info:
        cross_modal_linear(*change(*_good()))
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_unknown_backend_is_an_error():
    with pytest.raises(ValueError, match="unknown m2pt_kernels backend 'fast'"):
        with use_backend("fast"):
            pass


def test_env_var_selects_backend(monkeypatch):
    monkeypatch.setenv("M2PT_BACKEND", "reference")
    assert _dispatch.requested_backend() == "reference"
    monkeypatch.setenv("M2PT_BACKEND", "nope")
    with pytest.raises(ValueError, match="M2PT_BACKEND"):
        cross_modal_linear(*_good())
    with use_backend("reference"):  # the context manager wins over the environment
        assert _dispatch.requested_backend() == "reference"


def test_use_backend_blocks_ending_out_of_order(monkeypatch):
    """Blocks of two threads interleave: each one that ends removes its own choice, not the newest."""
    monkeypatch.delenv("M2PT_BACKEND", raising=False)
    outer, inner = use_backend("reference"), use_backend("auto")
    outer.__enter__()
    inner.__enter__()
    assert _dispatch.requested_backend() == "auto"
    outer.__exit__(None, None, None)  # the older block ends first (another thread's, say)
    assert _dispatch.requested_backend() == "auto"
    again = use_backend("reference")
    again.__enter__()
    inner.__exit__(None, None, None)
    assert _dispatch.requested_backend() == "reference"
    again.__exit__(None, None, None)
    assert _dispatch.requested_backend() == "auto" and not _dispatch._override


def test_use_backend_refuses_a_bad_name_at_the_call(monkeypatch):
    """Called without ``with`` (a forgotten ``with``, a typo), the name is checked all the same."""
    monkeypatch.delenv("M2PT_BACKEND", raising=False)
    with pytest.raises(ValueError, match=r"unknown m2pt_kernels backend 'tritonn' \(from use_backend\); choose one"):
        use_backend("tritonn")
    status = dict(_dispatch.backend_status())
    status["cuda"] = (False, "pretend: not built")
    monkeypatch.setattr(_dispatch, "backend_status", lambda: status)
    monkeypatch.setattr(_dispatch, "_usable_cache", {})  # (availability is cached per process)
    cuda = use_backend("cuda")  # availability: on entering (a decorated function is defined anywhere)

    @use_backend("cuda")
    def needs_cuda():
        return _dispatch.requested_backend()

    for enter in (cuda.__enter__, needs_cuda):
        with pytest.raises(RuntimeError, match="'cuda' is not available: pretend: not built"):
            enter()
        assert _dispatch.requested_backend() == "auto" and not _dispatch._override


def test_use_backend_object_can_be_entered_again(monkeypatch):
    """One object, entered again after its block, inside its own block, and from two threads whose
    blocks interleave with another's: each block adds its own entry and removes only that one."""
    from concurrent.futures import ThreadPoolExecutor
    monkeypatch.delenv("M2PT_BACKEND", raising=False)
    ref, auto = use_backend("reference"), use_backend("auto")
    assert not _dispatch._override  # making it selects nothing
    for _ in range(2):
        with ref as name:
            assert name == "reference" == _dispatch.requested_backend()
        assert not _dispatch._override
    with ref, auto:
        with ref:
            assert _dispatch.requested_backend() == "reference"
        assert _dispatch.requested_backend() == "auto"
    assert not _dispatch._override
    with ThreadPoolExecutor(1) as a, ThreadPoolExecutor(1) as b:  # two long-lived threads
        a.submit(ref.__enter__).result()
        auto.__enter__()
        b.submit(ref.__enter__).result()
        a.submit(ref.__exit__, None, None, None).result()  # thread a's block ends: b's entry stays on top
        assert _dispatch.requested_backend() == "reference"
        b.submit(ref.__exit__, None, None, None).result()
        assert _dispatch.requested_backend() == "auto"
        auto.__exit__(None, None, None)
    assert not _dispatch._override

    @use_backend("reference")  # as a decorator (the contextlib version was one): each call selects it
    def chosen():
        return _dispatch.requested_backend()

    with use_backend("auto"):
        assert chosen() == chosen() == "reference" and _dispatch.requested_backend() == "auto"
    assert not _dispatch._override


def test_unavailable_backend_is_an_error_not_a_fallback(monkeypatch):
    status = dict(_dispatch.backend_status())
    status["cuda"] = (False, "pretend: not built")
    monkeypatch.setattr(_dispatch, "backend_status", lambda: status)
    monkeypatch.setattr(_dispatch, "_usable_cache", {})  # (availability is cached per process)
    with pytest.raises(RuntimeError, match="'cuda' is not available: pretend: not built"):
        with use_backend("cuda"):
            pass


def test_fused_backends_are_unavailable_on_a_pre_ampere_gpu(monkeypatch):
    """The kernels need sm_80+. A machine with only a T4 (sm_75): both fused backends say so (auto
    picks the reference) instead of failing at the first launch. An H100 next to a T4: usable, but
    not on the T4 (auto: the reference there; asking for a fused backend there is an error)."""
    import types

    from m2pt_kernels.ops import cross_modal_linear_cuda as cuda_backend
    gpus = [("Tesla T4", (7, 5))]
    monkeypatch.setattr(_dispatch, "_old_gpus", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(gpus))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: gpus[i][0])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: gpus[i][1])
    fake_ext = types.SimpleNamespace(TORCH_VERSION="t", CUDA_VERSION="c", CUDA_ARCHS="8.0;9.0a")
    monkeypatch.setattr(cuda_backend, "_load", lambda: (fake_ext, None))
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, real=importlib.util.find_spec: object() if name == "triton" else real(name, *a))
    status = _dispatch.backend_status()
    for fused in ("triton", "cuda"):
        ok, why = status[fused]
        assert not ok and "compute capability 8.0 or newer" in why and "cuda:0 (Tesla T4, sm_75)" in why, why

    gpus.insert(0, ("NVIDIA H100", (9, 0)))  # cuda:0 H100, cuda:1 T4
    monkeypatch.setattr(_dispatch, "_old_gpus", None)
    status = _dispatch.backend_status()
    for fused in ("triton", "cuda"):
        ok, why = status[fused]
        assert ok and "not on cuda:1 (Tesla T4, sm_75)" in why and "H100" not in why, why
    monkeypatch.setattr(_dispatch, "backend_status", lambda: status)
    monkeypatch.setattr(_dispatch, "_usable_cache", {})

    class OnGpu:  # resolve() reads only these of x
        is_cuda = True
        dtype = torch.bfloat16

        def __init__(self, index):
            self.device = torch.device("cuda", index)

    assert _dispatch.resolve(OnGpu(0), "auto") == "triton"
    assert _dispatch.resolve(OnGpu(1), "auto") == "reference"
    assert _dispatch.resolve(OnGpu(0), "cuda") == "cuda"
    for fused in ("triton", "cuda"):
        with pytest.raises(RuntimeError, match=rf"'{fused}' can't run on cuda:1 \(Tesla T4, sm_75\)"):
            _dispatch.resolve(OnGpu(1), fused)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_fused_backend_refuses_cpu_tensors_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="triton"):
        _dispatch.resolve(torch.randn(2, 2), "triton")


def test_auto_is_reference_on_cpu_and_listed_backends():
    assert _dispatch.resolve(torch.randn(2, 2), "auto") == "reference"  # CPU tensors, GPU or not
    if DEVICE == "cuda":  # the first usable fused backend for CUDA tensors
        want = next((b for b in ("triton", "cuda") if b in m2pt_kernels.available_backends()), "reference")
        assert _dispatch.resolve(torch.randn(2, 2, device="cuda"), "auto") == want
    assert "reference" in m2pt_kernels.available_backends()
    assert set(m2pt_kernels.backend_status()) == {"reference", "triton", "cuda"}


def test_import_needs_only_torch():
    """import m2pt_kernels must not import triton or the compiled extension."""
    import subprocess
    import sys
    code = ("import sys, m2pt_kernels; "
            "bad = [m for m in ('triton', 'm2pt_kernels._C', 'timm', 'sklearn', 'matplotlib') if m in sys.modules]; "
            "assert not bad, bad")
    env = {k: v for k, v in os.environ.items() if k != "M2PT_BACKEND"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


@pytest.mark.parametrize("backend", BACKENDS)
def test_output_is_not_a_view_and_can_be_modified_in_place(backend):
    """Users write ``y.add_(r)`` or follow the layer with ``ReLU(inplace=True)``."""
    x, w, a, s, b = make_inputs((2, 5), 8, 6, torch.float32)
    with use_backend(backend):
        y = cross_modal_linear(x, w, a, s, b)
    assert y._base is None
    y.relu_()
    y.sum().backward()
    assert x.grad is not None and s.grad is not None


def test_reference_double_backward():
    """The reference backend's backward is made of differentiable torch ops, so higher-order
    gradients (``create_graph=True``) work; its buffer reuse is off in that mode."""
    d = dict(dtype=torch.float64)
    x = torch.randn(3, 2, 4, requires_grad=True, **d)
    w, a = (torch.randn(5, 4, requires_grad=True, **d) for _ in range(2))
    s, b = torch.randn(1, requires_grad=True, **d), torch.randn(5, requires_grad=True, **d)
    with use_backend("reference"):
        assert torch.autograd.gradgradcheck(cross_modal_linear, (x, w, a, s, b), check_batched_grad=True,
                                            check_fwd_over_rev=True)


# ---------------------------------------------------------------------------- torch.func transforms
def _detached(inputs, dtype=None):
    return [t.detach().to(dtype or t.dtype) if t is not None else None for t in inputs]


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_func_grad_matches_float64(backend, per_channel, bias, dtype):
    """``torch.func.grad`` through the op gives every gradient of the math (against float64)."""
    inputs = _detached(make_inputs((2, 7), 13, 9, dtype, bias=bias, per_channel=per_channel))
    dy = torch.randn(2, 7, 9, device=DEVICE, dtype=dtype)
    argnums = (0, 1, 2, 3, 4) if bias else (0, 1, 2, 3)

    def loss(x, w, a, s, b):
        return (cross_modal_linear(x, w, a, s, b) * dy).sum()

    with use_backend(backend):
        grads = torch.func.grad(loss, argnums=argnums)(*inputs)
    grads64 = torch.func.grad(lambda *t: (linear_math(*t) * dy.double()).sum(), argnums=argnums)(
        *_detached(inputs, torch.float64))
    for name, g, g64, t in zip(GRAD_NAMES, grads, grads64, inputs):
        assert g.shape == g64.shape and g.dtype == t.dtype, name  # λ's gradient in λ's fp32
        assert rel_err(g, g64) < tolerance(dtype, DEVICE), name


def test_vmap_per_sample_gradients():
    """``vmap(grad(...))`` over the samples of a batch (per-sample gradients, as DP-SGD and
    influence functions use them) equals a loop of plain autograd over the samples."""
    x, w, a, s, b = _detached(make_inputs((5, 3), 11, 6, torch.float32, per_channel=True))
    dy = torch.randn(5, 3, 6, device=DEVICE)

    def loss(w, a, s, b, xi, dyi):
        return (cross_modal_linear(xi, w, a, s, b) * dyi).sum()

    per_sample = torch.func.vmap(torch.func.grad(loss, argnums=(0, 1, 2, 3)), in_dims=(None,) * 4 + (0, 0))(
        w, a, s, b, x, dy)
    for i in range(5):
        leaves = [t.clone().requires_grad_(True) for t in (w, a, s, b)]
        (cross_modal_linear(x[i], *leaves[:3], leaves[3]) * dy[i]).sum().backward()
        for name, batched, leaf in zip(GRAD_NAMES[1:], per_sample, leaves):
            assert rel_err(batched[i], leaf.grad) < tolerance(torch.float32, DEVICE), (i, name)


def test_vmap_over_stacked_weights_and_inputs():
    """``vmap`` over stacked weights (model ensembles) and over x, forward and gradients."""
    e = 3
    x = torch.randn(e, 4, 10, device=DEVICE)
    w, a = torch.randn(e, 7, 10, device=DEVICE), torch.randn(e, 7, 10, device=DEVICE)
    s, b = torch.randn(e, 7, device=DEVICE), torch.randn(e, 7, device=DEVICE)
    ys = torch.func.vmap(cross_modal_linear)(x, w, a, s, b)
    grads = torch.func.vmap(torch.func.grad(lambda *t: cross_modal_linear(*t).square().sum(), argnums=(1, 3)))(
        x, w, a, s, b)
    for i in range(e):
        y64 = linear_math(*_detached((x[i], w[i], a[i], s[i], b[i]), torch.float64))
        assert rel_err(ys[i], y64) < tolerance(torch.float32, DEVICE)
        w64, s64 = w[i].double().requires_grad_(True), s[i].double().requires_grad_(True)
        linear_math(x[i].double(), w64, a[i].double(), s64, b[i].double()).square().sum().backward()
        tol = tolerance(torch.float32, DEVICE)
        assert rel_err(grads[0][i], w64.grad) < tol and rel_err(grads[1][i], s64.grad) < tol


@pytest.mark.parametrize("per_channel", [False, True])
def test_jvp_jacfwd_jacrev_and_hessian_match_the_math(per_channel):
    """Forward mode (``jvp`` with a tangent for every input, ``jacfwd``), reverse mode (``jacrev``)
    and both nested (``hessian``) agree with the same transforms of the math, in float64."""
    inputs = _detached(make_inputs((3,), 5, 4, torch.float64, per_channel=per_channel), torch.float64)
    tangents = [torch.randn_like(t) for t in inputs]
    with use_backend("reference"):
        y, y_t = torch.func.jvp(cross_modal_linear, tuple(inputs), tuple(tangents))
    y64, y64_t = torch.func.jvp(linear_math, tuple(inputs), tuple(tangents))
    assert rel_err(y, y64) < 1e-12 and rel_err(y_t, y64_t) < 1e-12
    for only in range(5):  # one tangent at a time: the terms that are left out must stay out
        part = [tangents[i] if i == only else torch.zeros_like(t) for i, t in enumerate(inputs)]
        f = lambda ti, i=only: cross_modal_linear(*[ti if j == i else t for j, t in enumerate(inputs)])
        f64 = lambda ti, i=only: linear_math(*[ti if j == i else t for j, t in enumerate(inputs)])
        assert rel_err(torch.func.jvp(f, (inputs[only],), (part[only],))[1],
                       torch.func.jvp(f64, (inputs[only],), (part[only],))[1]) < 1e-12, only
        jf, jr, j64 = torch.func.jacfwd(f)(inputs[only]), torch.func.jacrev(f)(inputs[only]), torch.func.jacrev(f64)(inputs[only])
        assert rel_err(jf, j64) < 1e-12 and rel_err(jr, j64) < 1e-12, only
    loss = lambda s: cross_modal_linear(inputs[0], inputs[1], inputs[2], s, inputs[4]).sin().sum()
    loss64 = lambda s: linear_math(inputs[0], inputs[1], inputs[2], s, inputs[4]).sin().sum()
    assert rel_err(torch.func.hessian(loss)(inputs[3]), torch.func.hessian(loss64)(inputs[3])) < 1e-12


def test_forward_mode_ad_with_dual_tensors():
    """``torch.autograd.forward_ad`` outside torch.func: dual x and λ give the right tangent."""
    import torch.autograd.forward_ad as fwad
    x, w, a, s, b = _detached(make_inputs((2, 5), 6, 3, torch.float32))
    x_t, s_t = torch.randn_like(x), torch.randn_like(s)
    with fwad.dual_level():
        y = cross_modal_linear(fwad.make_dual(x, x_t), w, a, fwad.make_dual(s, s_t), b)
        y_p, y_t = fwad.unpack_dual(y)
    _, y64_t = torch.func.jvp(lambda xx, ss: linear_math(xx, w.double(), a.double(), ss, b.double()),
                              (x.double(), s.double()), (x_t.double(), s_t.double()))
    tol = tolerance(torch.float32, DEVICE)
    assert rel_err(y_p, linear_math(*_detached((x, w, a, s, b), torch.float64))) < tol
    assert rel_err(y_t, y64_t) < tol


@pytest.mark.skipif(not fused_backends(), reason="no fused backend can run here")
def test_fused_backend_under_transforms_is_an_error():
    """The fused kernels take no batched or dual tensors: asking for one explicitly under a transform
    is an error that says to use the reference backend, never a silent switch."""
    x, w, a, s, b = _detached(make_inputs((3,), 8, 5, torch.float32))
    for backend in fused_backends():
        with use_backend(backend), pytest.raises(RuntimeError, match=f"backend '{backend}' can't run under "
                                                                     "torch.func transforms.*'reference'"):
            torch.func.grad(lambda ww: cross_modal_linear(x, ww, a, s, b).sum())(w)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_cotangents(backend):
    """``autograd.grad(is_grads_batched=True)`` and ``jacobian(vectorize=True)`` run the backward
    under vmap (every backend then computes it with the reference's batchable ops): the same
    gradients as one cotangent at a time."""
    inputs = make_inputs((2, 3), 7, 5, torch.float32, per_channel=True)
    with use_backend(backend):
        y = cross_modal_linear(*inputs)
    v = torch.randn(4, *y.shape, device=DEVICE)
    batched = torch.autograd.grad(y, inputs, v, is_grads_batched=True, retain_graph=True)
    for i in range(4):
        single = torch.autograd.grad(y, inputs, v[i], retain_graph=True)
        for name, gb, gs in zip(GRAD_NAMES, batched, single):
            assert rel_err(gb[i], gs) < tolerance(torch.float32, DEVICE), (i, name)
    with use_backend(backend):
        jac = torch.autograd.functional.jacobian(cross_modal_linear, tuple(inputs), vectorize=True)
        jac_loop = torch.autograd.functional.jacobian(cross_modal_linear, tuple(inputs))
    for name, jv, jl in zip(("x", "W", "W'", "λ", "b"), jac, jac_loop):
        assert rel_err(jv, jl) < tolerance(torch.float32, DEVICE), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_every_backend(backend):
    """backward(create_graph=True) then a second derivative (a gradient penalty ‖∂L/∂x‖²): every
    backend's first-order gradients must carry a graph (the fused kernels record none, so their
    backward then runs the reference's ops), and the second-order gradients match float64."""
    inputs = make_inputs((2, 3), 7, 5, torch.float32, per_channel=True)

    def penalty(x, w, a, s, b, op):
        gx, = torch.autograd.grad(op(x, w, a, s, b).square().sum(), x, create_graph=True)
        return gx.square().sum()

    with use_backend(backend):
        grads = torch.autograd.grad(penalty(*inputs, cross_modal_linear), inputs)
    leaves64 = [t.detach().double().requires_grad_(True) for t in inputs]
    grads64 = torch.autograd.grad(penalty(*leaves64, linear_math), leaves64)
    for name, g, g64 in zip(GRAD_NAMES, grads, grads64):
        assert rel_err(g, g64) < tolerance(torch.float32, DEVICE), name
