r"""The cross-modal linear op of the Multimodal Pathway method (M2PT).

Math (written once here; the kernels cite it)::

    y  = x · (W + λ·W')ᵀ + b
    x: [..., K] (any leading dims, any strides)   W, W': [N, K]   λ: [1] or [N]   b: [N] or None

    dx  = dy · (W + λ·W')
    G   = dyᵀ · x                    (x, dy flattened to [M, K], [M, N])
    dW  = G
    dW' = λ·G                        (λ broadcast over rows: λ[n]·G[n, k])
    dλ  = Σ_k G ⊙ W'                 per channel; summed over n too when λ has shape [1]
    db  = Σ_m dy
    ẏ   = ẋ·(W + λ·W')ᵀ + x·(Ẇ + λ̇·W' + λ·Ẇ')ᵀ + ḃ    (forward mode: tangents, under torch.func)

Only the gradients that are needed are computed (``needs_input_grad``): in linear probing only λ
(and x) need gradients, and then dW is never written.

Registered with ``torch.library`` in the ``m2pt`` namespace as three ops, each with a fake
implementation so ``torch.compile(fullgraph=True)`` traces them without graph breaks:

- ``m2pt::cross_modal_linear(x, weight, aux_weight, scale, bias, backend) -> y``  (autograd below)
- ``m2pt::cross_modal_linear_dgrad(dy, weight, aux_weight, scale, backend) -> dx``
- ``m2pt::cross_modal_linear_wgrad(dy, x, aux_weight, scale, need_weight, need_aux, need_scale,
  need_bias, backend) -> (dW, dW', dλ, db)``; a gradient not asked for comes back as an empty tensor.

In eager mode ``cross_modal_linear`` runs the same computation through a plain
``torch.autograd.Function`` (the custom-op wrapping costs more than a small GEMM per call); under
``torch.compile`` it calls the registered op; under ``torch.func`` transforms and forward-mode AD
it runs ``_TransformableCrossModalLinear`` (the reference math with a vmap rule and a jvp).

Each backend module (see ``m2pt_kernels._dispatch``) provides, on 2-D views::

    forward(x2, weight, aux_weight, scale, bias) -> y2                       # [M, N], x's dtype
    dgrad(dy2, weight, aux_weight, scale) -> dx2                            # [M, K]
    wgrad(dy2, x2, aux_weight, scale, need_weight, need_aux, need_scale, need_bias)
        -> (dW | None, dW' | None, dλ | None, db | None)                    # dλ in λ's dtype and shape

and may provide both in one call for the eager path (the reference does, to reuse a buffer; called
with grad mode off, on unbatched tensors)::

    backward(dy2, x2, weight, aux_weight, scale, need_x, need_weight, need_aux, need_scale, need_bias)
        -> (dx2 | None, dW | None, dW' | None, dλ | None, db | None)
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.autograd.forward_ad as _fwad
import torch.nn.functional as F
from torch import Tensor

from .. import _dispatch
from .cross_modal_linear_reference import autocast_enabled

__all__ = ["cross_modal_linear", "check_inputs"]

_EMPTY_SHAPE = (0,)
# what every backend computes; other floating dtypes (float8, ...) are refused with a clear error
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _valid_fast(x, weight, aux_weight, scale, bias, autocast: bool = False) -> bool:
    """The common, valid case in as few attribute reads as possible (this runs on every call);
    anything else goes through the full checks below, which say what is wrong. Accepts exactly what
    they accept. ``autocast``: x, W, W' and b will be cast by torch.autocast, so their dtypes need not
    agree (any floating dtype but float64, which autocast leaves alone)."""
    try:
        ws = weight.shape
        dt = weight.dtype
        dev = weight.device
        return (isinstance(x, Tensor) and isinstance(weight, Tensor) and isinstance(aux_weight, Tensor)
                and isinstance(scale, Tensor) and len(ws) == 2 and x.dim() >= 1
                and aux_weight.shape == ws and x.shape[-1] == ws[1]
                and scale.dim() == 1 and (scale.shape[0] == 1 or scale.shape[0] == ws[0])
                and (_autocastable(x, weight, aux_weight, bias) if autocast
                     else x.dtype == dt and aux_weight.dtype == dt and dt in _FLOAT_DTYPES)
                and scale.dtype in _FLOAT_DTYPES
                and x.device == dev and aux_weight.device == dev and scale.device == dev
                and (bias is None or (isinstance(bias, Tensor) and bias.dim() == 1 and bias.shape[0] == ws[0]
                                      and (autocast or bias.dtype == dt) and bias.device == dev)))
    except Exception:
        return False


def _autocastable(*tensors) -> bool:
    """Each one (or None) a floating tensor that torch.autocast casts: any floating dtype but float64."""
    return all(t is None or (t.dtype.is_floating_point and t.dtype != torch.float64) for t in tensors)


def check_inputs(
    x: Tensor,
    weight: Tensor,
    aux_weight: Tensor,
    cross_modal_scale: Tensor,
    bias: Optional[Tensor] = None,
    *,
    where: str = "cross_modal_linear",
    autocast_dtype: Optional[torch.dtype] = None,
) -> None:
    """Raise a TypeError / ValueError naming the argument at fault; return None when all is well.

    ``autocast_dtype``: the dtype ``torch.autocast`` will cast x, W, W' and b to before computing; their
    dtypes need not agree then (each may be any floating dtype but float64, which autocast leaves alone;
    λ, which is not cast, must still be one the op computes)."""
    if _valid_fast(x, weight, aux_weight, cross_modal_scale, bias, autocast_dtype is not None):
        return
    if isinstance(x, torch.fx.Proxy):  # the input check reads the first argument an FX tracer replaces
        raise TypeError(
            f"{where}: x is a torch.fx Proxy: FX symbolic tracing (torch.fx.symbolic_trace, timm's "
            "create_feature_extractor) can't trace through the op. Make FusedCrossModalLinear a leaf module "
            "(timm: timm.layers.register_notrace_module(FusedCrossModalLinear); torch.fx: a Tracer whose "
            "is_leaf_module is True for it), or merge the pathways first (m2pt_kernels.merge_pathways)")
    for arg, value in (("x", x), ("weight", weight), ("aux_weight", aux_weight),
                       ("cross_modal_scale", cross_modal_scale)):
        if not isinstance(value, Tensor):
            raise TypeError(f"{where}: {arg} must be a torch.Tensor, got {type(value).__name__}")
    if bias is not None and not isinstance(bias, Tensor):
        raise TypeError(f"{where}: bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"{where}: weight must be 2-D [N, K], got shape {list(weight.shape)}")
    n, k = weight.shape
    if aux_weight.shape != weight.shape:
        raise ValueError(
            f"{where}: weight has shape {list(weight.shape)} but aux_weight has shape "
            f"{list(aux_weight.shape)}; the auxiliary layer must have the target layer's shape [N, K]"
        )
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(
            f"{where}: x has shape {list(x.shape)}, its last dim must be in_features K={k} "
            f"(weight shape {list(weight.shape)})"
        )
    if cross_modal_scale.dim() == 0:
        raise ValueError(
            f"{where}: cross_modal_scale is a 0-d tensor; use shape [1] (one λ) or [{n}] (one per "
            "output channel), e.g. torch.zeros(1): FSDP2 refuses 0-d parameters"
        )
    if tuple(cross_modal_scale.shape) not in ((1,), (n,)):
        raise ValueError(
            f"{where}: cross_modal_scale has shape {list(cross_modal_scale.shape)}; expected [1] or "
            f"[{n}] (out_features of weight {list(weight.shape)})"
        )
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"{where}: bias has shape {list(bias.shape)}; expected [{n}] (out_features)")
    for arg, value in (("x", x), ("weight", weight), ("aux_weight", aux_weight),
                       ("cross_modal_scale", cross_modal_scale), ("bias", bias)):
        if value is None:
            continue
        if not value.is_floating_point():
            raise TypeError(f"{where}: {arg} must be a floating-point tensor, got {_name(value.dtype)}")
        if autocast_dtype is not None and arg != "cross_modal_scale":  # autocast casts it, unless float64
            if value.dtype == torch.float64:
                raise TypeError(f"{where}: {arg} is float64, which torch.autocast leaves alone while it casts "
                                f"the others to {_name(autocast_dtype)}; cast {arg} to {_name(weight.dtype)}")
        elif value.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{where}: {arg} is {_name(value.dtype)}; the op computes "
                            f"{', '.join(_name(d) for d in _FLOAT_DTYPES)}: cast it to one of those")
    if autocast_dtype is None:
        _check_same_dtypes(x, weight, aux_weight, bias, where)
    devices = {arg: value.device for arg, value in (
        ("x", x), ("weight", weight), ("aux_weight", aux_weight),
        ("cross_modal_scale", cross_modal_scale), ("bias", bias)) if value is not None}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{arg} on {dev}" for arg, dev in devices.items())
        raise ValueError(f"{where}: all tensors must be on one device, got {listed}")


def _check_same_dtypes(x, weight, aux_weight, bias, where: str) -> None:
    if aux_weight.dtype != weight.dtype:
        raise TypeError(
            f"{where}: weight is {_name(weight.dtype)} but aux_weight is {_name(aux_weight.dtype)}; "
            "cast the auxiliary weight to the target weight's dtype"
        )
    if x.dtype != weight.dtype:
        raise TypeError(
            f"{where}: x is {_name(x.dtype)} but weight is {_name(weight.dtype)}; cast them to one "
            "dtype or run under torch.autocast"
        )
    if bias is not None and bias.dtype != weight.dtype:
        raise TypeError(f"{where}: bias is {_name(bias.dtype)} but weight is {_name(weight.dtype)}")


def _impl(backend: str):
    return _dispatch.implementation(backend)


def _unflatten(t2, lead):
    # Not a view: outputs of a custom Function that are views can't be modified in place
    # (``y.add_(r)``, ``ReLU(inplace=True)``), and FSDP2 warns about modules returning views.
    if t2.dim() == len(lead) + 1:  # 2-D input: already the right shape
        return t2
    return torch.ops.aten._unsafe_view.default(t2, (*lead, t2.shape[-1]))


# The three computations on any leading dims; shared by the registered ops and the eager path.
def _forward(x, weight, aux_weight, scale, bias, backend):
    k = weight.shape[1]
    y2 = _impl(backend).forward(x if x.dim() == 2 else x.reshape(-1, k), weight, aux_weight, scale, bias)
    return _unflatten(y2, x.shape[:-1])


def _dgrad(dy, weight, aux_weight, scale, backend):
    n, k = weight.shape
    dx2 = _impl(backend).dgrad(dy if dy.dim() == 2 else dy.reshape(-1, n), weight, aux_weight, scale)
    return _unflatten(dx2, dy.shape[:-1])


def _wgrad(dy, x, aux_weight, scale, need_weight, need_aux, need_scale, need_bias, backend):
    n, k = aux_weight.shape
    if dy.dim() != 2:
        dy, x = dy.reshape(-1, n), x.reshape(-1, k)
    return _impl(backend).wgrad(dy, x, aux_weight, scale, need_weight, need_aux, need_scale, need_bias)


@torch.library.custom_op("m2pt::cross_modal_linear", mutates_args=())
def _cross_modal_linear_op(
    x: Tensor, weight: Tensor, aux_weight: Tensor, scale: Tensor, bias: Optional[Tensor], backend: str
) -> Tensor:
    return _forward(x, weight, aux_weight, scale, bias, backend)


@_cross_modal_linear_op.register_fake
def _(x, weight, aux_weight, scale, bias, backend):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("m2pt::cross_modal_linear_dgrad", mutates_args=())
def _dgrad_op(dy: Tensor, weight: Tensor, aux_weight: Tensor, scale: Tensor, backend: str) -> Tensor:
    return _dgrad(dy, weight, aux_weight, scale, backend)


@_dgrad_op.register_fake
def _(dy, weight, aux_weight, scale, backend):
    return dy.new_empty(*dy.shape[:-1], weight.shape[1])


@torch.library.custom_op("m2pt::cross_modal_linear_wgrad", mutates_args=())
def _wgrad_op(
    dy: Tensor, x: Tensor, aux_weight: Tensor, scale: Tensor,
    need_weight: bool, need_aux: bool, need_scale: bool, need_bias: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    grads = _wgrad(dy, x, aux_weight, scale, need_weight, need_aux, need_scale, need_bias, backend)
    empty = dy.new_empty(_EMPTY_SHAPE)
    return tuple(g if g is not None else empty.clone() for g in grads)


@_wgrad_op.register_fake
def _(dy, x, aux_weight, scale, need_weight, need_aux, need_scale, need_bias, backend):
    def maybe(flag, like, dtype=None):
        dtype = dtype or like.dtype
        return like.new_empty(like.shape, dtype=dtype) if flag else dy.new_empty(_EMPTY_SHAPE)
    n = aux_weight.shape[0]
    return (
        maybe(need_weight, aux_weight),
        maybe(need_aux, aux_weight),
        maybe(need_scale, scale),
        dy.new_empty((n,)) if need_bias else dy.new_empty(_EMPTY_SHAPE),
    )


def _backward(ctx, dy, dgrad, wgrad):
    """The gradients of the module docstring, only those ``needs_input_grad`` asks for."""
    x, weight, aux_weight, scale = ctx.saved_tensors
    need_x, need_w, need_aux, need_scale, need_bias = ctx.needs_input_grad[:5]
    dx = dw = daux = dscale = db = None
    if need_x:
        dx = dgrad(dy, weight, aux_weight, scale, ctx.backend)
    if need_w or need_aux or need_scale or need_bias:
        gw, gaux, gscale, gb = wgrad(dy, x, aux_weight, scale, need_w, need_aux, need_scale, need_bias, ctx.backend)
        dw = gw if need_w else None
        daux = gaux if need_aux else None
        dscale = gscale if need_scale else None
        db = gb if need_bias else None
    return dx, dw, daux, dscale, db, None


def _setup_context(ctx, inputs, output):
    x, weight, aux_weight, scale, bias, backend = inputs
    ctx.save_for_backward(x, weight, aux_weight, scale)  # inputs only: never the merged weight
    ctx.backend = backend


_cross_modal_linear_op.register_autograd(
    lambda ctx, dy: _backward(ctx, dy, torch.ops.m2pt.cross_modal_linear_dgrad,
                              torch.ops.m2pt.cross_modal_linear_wgrad),
    setup_context=_setup_context,
)


class _EagerCrossModalLinear(torch.autograd.Function):
    """The same op and autograd as the registered one, without the custom-op wrapping.

    In eager mode ``torch.library``'s dispatch costs several times a small GEMM's runtime per
    call, and every Python step between the user and the backend is paid twice per step (on the
    CPU its cost also evicts the GEMM operands from cache): this path calls the backend module
    directly and keeps only the reshapes it needs. ``torch.compile`` traces the registered op.
    Each backend gets its own subclass (``_eager_function``) with the module as a class attribute,
    so nothing but tensors goes through ``apply`` and ``ctx``.
    """

    impl = None  # the backend module, set on each subclass

    @classmethod
    def forward(cls, ctx, x, weight, aux_weight, scale, bias):
        ctx.save_for_backward(x, weight, aux_weight, scale)  # inputs only: never the merged weight
        if x.dim() == 2:
            return cls.impl.forward(x, weight, aux_weight, scale, bias)
        y2 = cls.impl.forward(x.reshape(-1, weight.shape[1]), weight, aux_weight, scale, bias)
        return _unflatten(y2, x.shape[:-1])

    @classmethod
    def backward(cls, ctx, dy):
        x, weight, aux_weight, scale = ctx.saved_tensors
        need_x, need_w, need_aux, need_scale, need_bias = ctx.needs_input_grad
        impl = cls.impl
        dy2, x2 = (dy, x) if dy.dim() == 2 else (dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1]))
        need_params = need_w or need_aux or need_scale or need_bias
        if torch.is_grad_enabled() or _functorch_active() or _legacy_batched(dy):
            # The reference's dgrad / wgrad compute the same gradients from plain torch ops, which
            # autograd records and vmap batches, where the fused kernels and the reference's out=
            # buffer reuse can't serve:
            # - backward(create_graph=True) (double backward: gradient penalties, Hessian-vector
            #   products): a kernel's gradients would be constants to the second derivative;
            # - batched cotangents (autograd.grad(is_grads_batched=True), jacobian(vectorize=True),
            #   gradcheck's batched check; the first two use torch's legacy vmap, which sets no
            #   functorch level): this backward runs on batched tensors.
            impl, both = _impl("reference"), None
        else:
            both = getattr(impl, "backward", None)
        if both is not None and need_params:
            dx, dw, daux, dscale, db = both(dy2, x2, weight, aux_weight, scale,
                                            need_x, need_w, need_aux, need_scale, need_bias)
        else:
            dx = dw = daux = dscale = db = None
            if need_x:
                dx = impl.dgrad(dy2, weight, aux_weight, scale)
            if need_params:
                dw, daux, dscale, db = impl.wgrad(dy2, x2, aux_weight, scale, need_w, need_aux, need_scale, need_bias)
        if dx is not None and dy2 is not dy:
            dx = _unflatten(dx, dy.shape[:-1])
        return dx, dw, daux, dscale, db


_eager_functions: dict[str, type] = {}


def _eager_function(backend: str) -> type:
    fn = _eager_functions.get(backend)
    if fn is None:
        fn = _eager_functions[backend] = type(
            f"_EagerCrossModalLinear_{backend}", (_EagerCrossModalLinear,),
            {"impl": _dispatch.implementation(backend), "__module__": __name__})
    return fn


class _TransformableCrossModalLinear(torch.autograd.Function):
    """The op under ``torch.func`` transforms (``grad``, ``vjp``, ``jacrev``, ``vmap``, ``jvp``,
    ``jacfwd``, ``hessian``) and forward-mode AD (``torch.autograd.forward_ad``).

    Those need an ``autograd.Function`` in the ``setup_context`` style, a vmap rule and a ``jvp``
    (the eager Function has none of them, and neither has ``torch.library``'s autograd). It runs the
    ``reference`` math, which is plain PyTorch, so ``generate_vmap_rule`` can batch the forward,
    the backward and the jvp alike (per-sample gradients ``vmap(grad(...))``, stacked-weight model
    ensembles); the fused kernels never see batched or dual tensors. The backward is built from
    differentiable ops, so transforms nest (``jacfwd(jacrev(...))``).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, aux_weight, scale, bias):
        return _forward(x, weight, aux_weight, scale, bias, "reference")

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, aux_weight, scale, bias = inputs
        ctx.save_for_backward(x, weight, aux_weight, scale)  # inputs only: never the merged weight
        ctx.save_for_forward(x, weight, aux_weight, scale)
        ctx.backend = "reference"

    @staticmethod
    def backward(ctx, dy):
        return _backward(ctx, dy, _dgrad, _wgrad)[:5]

    @staticmethod
    def jvp(ctx, x_t, weight_t, aux_t, scale_t, bias_t):
        """ẏ of the module docstring, each term only where its tangent is given; the merges in fp32
        (fp64 for fp64), rounded once to x's dtype like the forward's."""
        ref = _impl("reference")
        x, weight, aux_weight, scale = ctx.saved_tensors
        dt = x.dtype
        cd = ref._compute_dtype(weight.dtype)
        y_t = None
        if x_t is not None:
            y_t = F.linear(x_t, ref.merged_weight(weight, aux_weight, scale, dt))
        merged_t = None
        for term in ((weight_t.to(cd) if weight_t is not None else None),
                     (ref._rows(scale_t.to(cd)) * aux_weight.to(cd) if scale_t is not None else None),
                     (ref._rows(scale.to(cd)) * aux_t.to(cd) if aux_t is not None else None)):
            if term is not None:
                merged_t = term if merged_t is None else merged_t + term
        if merged_t is not None:
            term = F.linear(x, merged_t.to(dt))
            y_t = term if y_t is None else y_t + term
        if bias_t is not None:
            y_t = bias_t.expand(*x.shape[:-1], weight.shape[0]).clone() if y_t is None else y_t + bias_t
        return y_t


def transforms_active() -> bool:
    """``torch.func`` transforms or forward-mode AD are active: ``cross_modal_linear`` then runs
    ``_TransformableCrossModalLinear`` (one C call and one attribute read; checked on every eager call)."""
    return _functorch_active() or _fwad._current_level >= 0


def _under_transforms(x, weight, aux_weight, scale, bias, backend: str) -> Tensor:
    if backend != "reference" and _dispatch.requested_backend() != "auto":
        raise RuntimeError(
            f"m2pt_kernels backend {backend!r} can't run under torch.func transforms (grad, vmap, jvp, ...) "
            "or forward-mode AD: its kernels take no batched or dual tensors. Use the 'reference' backend "
            "there ('auto' picks it by itself)")
    return _TransformableCrossModalLinear.apply(x, weight, aux_weight, scale, bias)


def _autocast_args(dtype: torch.dtype, *tensors):
    """What autocast does to ``F.linear``'s arguments: floating-point tensors to ``dtype``, except
    float64 ones (autocast leaves those alone; a mix of float64 and other dtypes is then an error)."""
    return tuple(t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64
                 else t for t in tensors)


def cross_modal_linear(
    x: Tensor,
    weight: Tensor,
    aux_weight: Tensor,
    cross_modal_scale: Tensor,
    bias: Optional[Tensor] = None,
) -> Tensor:
    """``y = x · (W + λ·W')ᵀ + b`` without materializing ``W + λ·W'`` (see the module docstring).

    ``x``: [..., K], ``weight``/``aux_weight``: [N, K], ``cross_modal_scale`` (λ): [1] or [N],
    ``bias``: [N] or None. The output has x's dtype; accumulation is in fp32 and λ stays in its own
    (fp32) dtype. Under ``torch.autocast`` x, W, W' and b are cast like ``F.linear`` casts them.
    The backend comes from ``m2pt_kernels.use_backend`` / ``$M2PT_BACKEND`` / ``auto``.
    """
    compiling = torch.compiler.is_compiling()
    if compiling or _any_autocast_enabled():
        device_type = x.device.type if isinstance(x, Tensor) else "cpu"
        if autocast_enabled(device_type):
            x, weight, aux_weight, bias = _autocast_args(torch.get_autocast_dtype(device_type),
                                                         x, weight, aux_weight, bias)
    check_inputs(x, weight, aux_weight, cross_modal_scale, bias)  # one fast check when all is well
    backend = _dispatch.resolve(x)
    if compiling:
        return torch.ops.m2pt.cross_modal_linear(x, weight, aux_weight, cross_modal_scale, bias, backend)
    if _functorch_active() or _fwad._current_level >= 0:  # transforms_active(), inlined: every call
        return _under_transforms(x, weight, aux_weight, cross_modal_scale, bias, backend)
    return _eager_function(backend).apply(x, weight, aux_weight, cross_modal_scale, bias)


# One C call that says whether autocast is on for any device type (eager only; the per-device check
# above decides). Torch versions without it always take the per-device check.
_any_autocast_enabled = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)
_functorch_active = torch._C._are_functorch_transforms_active
_legacy_batched = torch._C._functorch.is_legacy_batchedtensor
