"""Shared test helpers: float64 reference, relative-norm error, tolerances by dtype."""
import torch

from m2pt_kernels._precision import fp32_matmul_allows_tf32

# rel-norm error bounds by dtype (developers' guide): fp32 1e-4 (tf32 on GPU 1e-3), bf16/fp16 2e-2.
TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2}


def tolerance(dtype: torch.dtype, device: str) -> float:
    if dtype == torch.float32 and device == "cuda" and fp32_matmul_allows_tf32():
        return 1e-3
    return TOL[dtype]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert torch.isfinite(out).all(), "non-finite values in output"
    denom = ref.norm().item()
    return (out - ref).norm().item() / (denom if denom > 0 else 1.0)


def linear_math(x, weight, aux_weight, scale, bias=None):
    """y = x·(W + λ·W')ᵀ + b straight from the math (materialized merge), in whatever dtype it is
    given: the oracle, differentiable by autograd and by every torch.func transform."""
    return torch.nn.functional.linear(x, weight + scale.view(-1, 1) * aux_weight, bias)


def reference64(x, weight, aux_weight, scale, bias, dy):
    """y and every gradient in float64, straight from the math (materialized merge + autograd)."""
    leaves = [t.detach().double().cpu().requires_grad_(True) if t is not None else None
              for t in (x, weight, aux_weight, scale, bias)]
    y = linear_math(*leaves)
    y.backward(dy.detach().double().cpu())
    return y.detach(), [t.grad if t is not None else None for t in leaves]


def make_inputs(lead, k, n, dtype, *, device, bias=True, per_channel=False, aux_trainable=True,
                weight_trainable=True, non_contiguous=False, strided_weight=False):
    """Fresh random (x, W, W', λ, b) with the requested grads; never zeros.

    ``non_contiguous``: x[..., K] is a strided view of a larger, transposed buffer.
    ``strided_weight``: W and W' are transposed views (column-major [N, K]).
    """
    if non_contiguous:
        x = torch.randn(k + 3, *lead, device=device, dtype=dtype)[:k].movedim(0, -1)
        assert not x.is_contiguous()
    else:
        x = torch.randn(*lead, k, device=device, dtype=dtype)
    if strided_weight:
        w = (torch.randn(k, n, device=device) / k ** 0.5).to(dtype).t()
        a = (torch.randn(k, n, device=device) / k ** 0.5).to(dtype).t()
    else:
        w = (torch.randn(n, k, device=device) / k ** 0.5).to(dtype)
        a = (torch.randn(n, k, device=device) / k ** 0.5).to(dtype)
    s = torch.randn(n if per_channel else 1, device=device, dtype=torch.float32)
    b = torch.randn(n, device=device, dtype=dtype) if bias else None
    x.requires_grad_(True)
    w.requires_grad_(weight_trainable)
    a.requires_grad_(aux_trainable)
    s.requires_grad_(True)
    if b is not None:
        b.requires_grad_(True)
    return x, w, a, s, b


def run_backend(backend, inputs, dy):
    """y and the grads of every input (None where not requested) through one backend."""
    from m2pt_kernels import cross_modal_linear, use_backend
    with use_backend(backend):
        y = cross_modal_linear(*inputs)
    y.backward(dy)
    return y, [t.grad if t is not None else None for t in inputs]


GRAD_NAMES = ("dx", "dW", "dW'", "dλ", "db")


def check_against_reference(backend, inputs, dtype, *, device):
    """y and every requested gradient within the dtype's tolerance of the float64 reference;
    gradients not requested must not be written."""
    dy = torch.randn(*inputs[0].shape[:-1], inputs[1].shape[0], device=device, dtype=dtype)
    y, grads = run_backend(backend, inputs, dy)
    y_ref, grads_ref = reference64(*inputs, dy)
    tol = tolerance(dtype, device)
    assert y.dtype == dtype and y.shape == y_ref.shape
    assert rel_err(y, y_ref) < tol, "y"
    for name, t, g, g_ref in zip(GRAD_NAMES, inputs, grads, grads_ref):
        if t is None:
            continue
        if not t.requires_grad:
            assert g is None, f"{name} was written though not requested"
            continue
        assert g is not None, f"{name} missing"
        assert g.dtype == t.dtype and g.shape == t.shape, name
        assert rel_err(g, g_ref) < tol, (name, rel_err(g, g_ref))
