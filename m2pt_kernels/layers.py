"""``FusedCrossModalLinear``: the drop-in layer of the Multimodal Pathway method.

``y = x · (W + λ·W')ᵀ + b`` (the math and every gradient: ``m2pt_kernels.ops.cross_modal_linear``).

Design decisions (each one is something a user can rely on):

- It subclasses ``nn.Module``, not ``nn.Linear``: code that selects layers by type
  (``isinstance(m, nn.Linear)``: weight-decay groups, LoRA/PEFT targeting, quantizers,
  ``add_pathways`` itself) must not mistake a pathway layer for a plain linear layer whose
  ``forward`` it could reproduce from ``weight`` and ``bias`` alone. It still exposes
  ``in_features``, ``out_features``, ``weight`` and ``bias`` like ``nn.Linear``.
- State-dict keys are the paper's (``weight``, ``bias``, ``aux_weight``, ``cross_modal_scale``), so
  checkpoints of the paper's ``CrossModalReparamLinear`` load into it and back.
- A trainable auxiliary weight is a Parameter; a frozen one is a persistent buffer: it is saved and
  moved with the module but never handed to an optimizer.
- λ (``cross_modal_scale``) stays fp32 (or fp64) when the module is cast with ``.to(bfloat16)``,
  ``.half()`` and the like: a bf16 λ near 0 cannot learn small steps. FSDP2 wants one dtype for all
  the parameters it shards together: keep the model in fp32 and use its ``MixedPrecisionPolicy``
  (the layer computes with a frozen W', a buffer FSDP2 does not cast, in W's dtype), or set
  ``keep_scale_fp32 = False`` on the layers before casting them to bf16.
- ``from_linear`` reuses the target layer's ``weight`` / ``bias`` Parameter objects (an optimizer
  built before the conversion keeps updating the right tensors); the auxiliary weight is always
  copied (the auxiliary model is never modified or aliased) and cast to W's dtype and device.
- Training runs the fused op ``m2pt_kernels.cross_modal_linear``. When no gradient can reach W, W',
  λ or b (``torch.no_grad()`` / ``inference_mode()``, or none of them requires grad), it runs one
  plain GEMM (``F.linear``) on the merged weight ``W + λ·W'``, computed in fp32 and cast once. In
  ``eval()`` mode that weight is cached until W, W' or λ change: tracked by tensor identity,
  storage pointer, dtype, device and the autograd version counter (which every in-place op bumps),
  dropped after any ``torch.optim`` optimizer step (a global step hook: fused optimizers do not
  bump version counters), on ``.to()``/``.cuda()``/..., ``load_state_dict`` and ``train()``/``eval()``. In-place writes through ``tensor.data`` (``p.data.fill_(...)``) bypass
  version counters: after those call ``clear_merged_cache()``, or write under ``torch.no_grad()``.
  ``cache_merged_weight = False`` turns the cache off (it costs one weight-sized tensor per layer).
- Under ``torch.compile`` the layer always calls the fused op (registered with ``torch.library``),
  so ``fullgraph=True`` traces it without graph breaks; the Python-side cache is never traced.
  Under ``torch.func`` transforms (``functional_call`` + ``grad`` / ``vmap`` / ``jvp`` ...) it
  always calls the op too, which runs its transformable reference path there.
- ``merge()`` returns a plain ``nn.Linear`` holding ``W + λ·W'`` (fp32 math, one cast to W's dtype)
  and a copy of the target's bias; the auxiliary model's bias is never used, as in the paper.
"""
from __future__ import annotations

import math
import numbers
import operator
import warnings
import weakref
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .ops.cross_modal_linear import check_inputs, cross_modal_linear, transforms_active
from .ops.cross_modal_linear_reference import autocast_enabled, merged_weight

__all__ = ["FusedCrossModalLinear"]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _scale_dtype(requested: torch.dtype) -> torch.dtype:
    """λ's dtype after a cast to ``requested``: never below fp32."""
    if requested.is_floating_point:
        return torch.promote_types(requested, torch.float32)
    return requested


def check_flag(where: str, name: str, value) -> bool:
    """A boolean option: a bool, 0 / 1, or a numpy / torch 0-d bool (a string such as "False" would be
    true). Returns it as a bool."""
    if not (isinstance(value, bool) or (isinstance(value, numbers.Integral) and value in (0, 1))
            or (getattr(value, "dtype", None) is not None and str(value.dtype) in ("bool", "torch.bool")
                and getattr(value, "ndim", None) == 0)):
        raise TypeError(f"{where}: {name} must be True or False, got {value!r} ({type(value).__name__})")
    return bool(value)


def check_size(where: str, name: str, value, minimum: int = 0) -> int:
    """A size or count (a layer's ``in_features``, a model's ``depth``): an integer ≥ ``minimum`` (Python,
    NumPy or a 0-d integer tensor, as ``nn.Linear`` takes them; not a bool: ``int(2.7)`` would silently
    build a layer of size 2). Returns it as an int; else a TypeError (not an integer) or a ValueError
    (too small) naming it. The one size rule of the package (layers, the ViT, the point-cloud helpers)."""
    kind = {0: "a non-negative integer", 1: "a positive integer"}.get(minimum, f"an integer ≥ {minimum}")
    try:
        if isinstance(value, bool) or (isinstance(value, Tensor) and value.dtype == torch.bool):
            raise TypeError  # operator.index(torch.tensor(True)) is 1
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{where}: {name} must be {kind}, got {value!r} ({type(value).__name__}); "
                        f"pass int({name}) if it is a whole number held in another type") from None
    if value < minimum:
        raise ValueError(f"{where}: {name} must be {kind}, got {value}")
    return value


def is_pathway_layer(m) -> bool:
    """``m`` is a pathway layer: ours, or the paper's ``CrossModalReparamLinear`` (any layer holding W, W'
    and λ as ``weight``, ``aux_weight``, ``cross_modal_scale``): its ``weight`` alone is not the function it
    computes. The one test of it in the package (from_linear, add_pathways, merge_pathways, ...)."""
    if isinstance(m, FusedCrossModalLinear):
        return True
    return all(isinstance(getattr(m, n, None), Tensor) for n in ("weight", "aux_weight", "cross_modal_scale"))


def check_pathway_options(where: str, *, aux_trainable, scale_init, per_channel_scale) -> float:
    """The options every pathway constructor takes, checked before anything is built: the flags are
    bools (a string such as "False" would be true), λ's initial value a finite real number (NaN or inf
    would make every output and gradient non-finite from the first step). Returns ``scale_init`` as a float."""
    check_flag(where, "aux_trainable", aux_trainable)
    check_flag(where, "per_channel_scale", per_channel_scale)
    if isinstance(scale_init, Tensor) and scale_init.numel() == 1 and scale_init.dtype != torch.bool \
            and not scale_init.is_complex():
        scale_init = scale_init.item()
    if isinstance(scale_init, bool) or not isinstance(scale_init, numbers.Real):
        raise TypeError(f"{where}: scale_init (λ's initial value) must be a real number, got {scale_init!r} "
                        f"({type(scale_init).__name__})")
    if not math.isfinite(scale_init):
        raise ValueError(f"{where}: scale_init (λ's initial value) must be finite, got {scale_init}")
    return float(scale_init)


# Why a tensor on the meta device can't be used (the errors about meta tensors share it)
META_NO_VALUES = "it holds no values (built under torch.device('meta') or init_empty_weights, and never loaded)"


def _is_fake(t: Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake
    return is_fake(t)


def check_aux_finite(aux: Tensor, what: str, where: str) -> None:
    """Refuse an auxiliary weight holding inf / NaN (a corrupt checkpoint): W' enters every output as
    λ·W', and 0·inf is NaN, so the model would compute NaN from its first step even at λ = 0.
    ``what`` names the tensor (the auxiliary key and its partner layer), ``where`` the caller."""
    if aux.is_meta or _is_fake(aux):  # no values to check (shapes only: meta, FakeTensorMode, tracing)
        return
    bad = aux.numel() - int(torch.isfinite(aux).sum())
    if bad:
        raise ValueError(
            f"{where}: {what} has {bad} non-finite value{'s' if bad > 1 else ''} (inf / NaN): W' enters every "
            "output as λ·W', and 0·inf is NaN, so every output would be NaN even at λ = 0. Is the auxiliary "
            "checkpoint corrupt?")


_MISSING = object()  # FusedCrossModalLinear.forward: a name not in the module's parameter / buffer dicts

# Every optimizer step anywhere in the process bumps this counter, and the merged-weight cache keys on
# it: torch's fused optimizer kernels (``fused=True``) update parameters without bumping their
# autograd version counters, so version counters alone would miss those steps.
_OPTIMIZER_STEPS = [0]
_STEP_HOOK = []


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    _OPTIMIZER_STEPS[0] += 1


def _ensure_step_hook() -> None:
    if not _STEP_HOOK:
        from torch.optim import optimizer as optim_module
        _STEP_HOOK.append(optim_module.register_optimizer_step_post_hook(_count_optimizer_step))


def _tensor_key(t: Tensor):
    """What identifies the *contents* of ``t`` for the merged-weight cache."""
    return (weakref.ref(t), t.data_ptr(), t._version, t.dtype, t.device, tuple(t.shape))


def _same_tensor(key, t: Tensor) -> bool:
    ref, ptr, version, dtype, device, shape = key
    return (ref() is t and ptr == t.data_ptr() and version == t._version and dtype == t.dtype
            and device == t.device and shape == tuple(t.shape))


def computed_weights(linear: nn.Module) -> list:
    """The names among ``weight`` / ``bias`` whose value ``linear`` computes on every call instead of
    holding it as a Parameter: a parametrization (``parametrizations.weight_norm`` / ``spectral_norm``)
    or the older hook-based ``torch.nn.utils.weight_norm`` / ``spectral_norm`` (a plain tensor attribute
    that a forward pre-hook recomputes). A pathway layer built from them would train a frozen snapshot."""
    from torch.nn.utils import parametrize
    return [n for n in ("weight", "bias") if parametrize.is_parametrized(linear, n)
            or (isinstance(getattr(linear, n, None), Tensor) and linear._parameters.get(n) is None
                and n not in linear._buffers)]


def remove_computed_hint(linear: nn.Module, name: str) -> str:
    """How to turn ``linear.<name>`` back into a plain Parameter (see ``computed_weights``)."""
    from torch.nn.utils import parametrize
    if parametrize.is_parametrized(linear, name):
        return f"torch.nn.utils.parametrize.remove_parametrizations(module, {name!r})"
    if hasattr(linear, name + "_orig") and hasattr(linear, name + "_mask"):  # torch.nn.utils.prune
        return f"torch.nn.utils.prune.remove(module, {name!r})"
    return "torch.nn.utils.remove_weight_norm(module) / remove_spectral_norm(module), whichever hook it has"


class FusedCrossModalLinear(nn.Module):
    """Linear layer with a cross-modal pathway: ``y = x · (W + λ·W')ᵀ + b``.

    Args:
        in_features, out_features, bias: as for ``nn.Linear``.
        aux_weight: the auxiliary model's weight W' ([out_features, in_features]); copied, cast to
            this layer's dtype and device. ``None`` holds zeros, to be filled by ``load_state_dict``.
        aux_trainable: W' is a Parameter (True) or a frozen persistent buffer (False).
        scale_init: initial λ (the paper uses 0, so the layer starts as the target layer).
        per_channel_scale: λ of shape [out_features] instead of [1].

    Create one from an existing layer with ``FusedCrossModalLinear.from_linear(linear, aux)``.
    """

    cache_merged_weight: bool = True
    keep_scale_fp32: bool = True  # False: λ follows .to(dtype) / .half() like every other tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        aux_weight: Optional[Tensor] = None,
        aux_trainable: bool = True,
        scale_init: float = 0.0,
        per_channel_scale: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        where = type(self).__name__
        scale_init = check_pathway_options(where, aux_trainable=aux_trainable, scale_init=scale_init,
                                           per_channel_scale=per_channel_scale)
        self.in_features = check_size(where, "in_features", in_features)
        self.out_features = check_size(where, "out_features", out_features)
        bias = check_flag(where, "bias", bias)
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty((self.out_features, self.in_features), **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self.scale_init = float(scale_init)
        self.reset_parameters()
        if aux_weight is None:
            aux = torch.zeros_like(self.weight, requires_grad=False)
        else:
            aux = self._copy_aux(aux_weight, self.weight, "aux_weight", where, expected=(
                f"a torch.Tensor (use {where}.from_linear(linear, aux_linear) for a module)"))
        self._aux_is_zeros = aux_weight is None
        self._set_aux(aux, aux_trainable)
        self.cross_modal_scale = nn.Parameter(self._new_scale(self.scale_init, per_channel_scale, self.weight.device))
        self._cache: Optional[tuple] = None

    # ------------------------------------------------------------------ construction helpers
    def reset_parameters(self) -> None:
        """nn.Linear's initialization of W and b, λ back to ``scale_init``, and W' back to zeros when the
        layer was built without one (``aux_weight=None``) and none was loaded since. A W' copied from an
        auxiliary model or loaded by ``load_state_dict`` is left alone: it is data, not an initialization
        (after ``to_empty`` load it with ``load_state_dict``).
        Tensors on the meta device are skipped (this is what ``to_empty`` + ``reset_parameters`` of a
        meta-built model calls)."""
        self._cache = None
        with torch.no_grad():
            if self.weight.device.type != "meta":
                nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
            if self.bias is not None and self.bias.device.type != "meta":
                bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
                nn.init.uniform_(self.bias, -bound, bound)
            scale = self._parameters.get("cross_modal_scale")  # absent when __init__ calls this
            if scale is not None and scale.device.type != "meta":
                scale.fill_(getattr(self, "scale_init", 0.0))
            aux = self._parameters.get("aux_weight", self._buffers.get("aux_weight"))
            if aux is not None and aux.device.type != "meta" and getattr(self, "_aux_is_zeros", False):
                aux.zero_()

    def _new_scale(self, scale_init: float, per_channel: bool, device) -> Tensor:
        n = self.out_features if per_channel else 1
        return torch.full((n,), float(scale_init), dtype=torch.float32, device=device)

    @staticmethod
    def _copy_aux(aux: Tensor, like: Tensor, what: str, where: str, expected: str) -> Tensor:
        """A checked copy of the auxiliary weight ``aux`` for the target weight ``like``; ``what`` names
        ``aux``, ``where`` the caller, ``expected`` what the caller takes."""
        if not isinstance(aux, Tensor):
            raise TypeError(f"{where}: {what} must be {expected}, got {type(aux).__name__}")
        if tuple(aux.shape) != tuple(like.shape):
            raise ValueError(
                f"{where}: the target weight has shape {list(like.shape)} but {what} has "
                f"shape {list(aux.shape)}; the auxiliary layer must have the target layer's shape "
                "[out_features, in_features]")
        if not aux.is_floating_point():
            raise TypeError(f"{where}: {what} must be floating point, got {_dtype_name(aux.dtype)}")
        if like.is_meta and not aux.is_meta:
            raise ValueError(
                f"{where}: the target weight is on the meta device but {what} holds values: the pathway layer "
                "keeps W' on its target's device, so they would be dropped (after to_empty W' would be "
                "uninitialized memory). Materialize the target first (to_empty, then load its weights) and build "
                "the pathway then; or build both on meta and load a checkpoint that has the pathways "
                "(aux_weight / cross_modal_scale keys).")
        if aux.is_meta and not like.is_meta:
            raise ValueError(
                f"{where}: {what} is on the meta device: {META_NO_VALUES}. Load the auxiliary weights first (e.g. to_empty(device="
                "'cpu') then load_state_dict(...)), or build the layer without them and load a checkpoint that "
                "has the pathways.")
        check_aux_finite(aux, what, where)
        # Always a fresh copy: the auxiliary model is never modified nor aliased.
        return aux.detach().to(device=like.device, dtype=like.dtype, copy=True)

    def _set_aux(self, aux: Tensor, trainable: bool) -> None:
        if trainable:
            self.aux_weight = nn.Parameter(aux, requires_grad=True)
        else:
            self.register_buffer("aux_weight", aux, persistent=True)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Module,
        aux: Union[nn.Module, Tensor],
        *,
        aux_trainable: bool = True,
        scale_init: float = 0.0,
        per_channel_scale: bool = False,
    ) -> "FusedCrossModalLinear":
        """The pathway layer for ``linear`` with the auxiliary weight of ``aux``.

        ``linear``'s ``weight`` and ``bias`` Parameter objects are reused (not copied), so an
        optimizer that already holds them stays valid; ``aux`` (an ``nn.Linear`` or a weight tensor)
        is copied and cast to ``linear.weight``'s dtype and device. Bias-free layers work.
        ``linear`` must be an ``nn.Linear`` (or a subclass) without a pathway, ``aux`` a plain layer (a
        pathway layer is merged first) holding finite values; a meta ``linear`` takes only a meta ``aux``.
        """
        where = f"{cls.__name__}.from_linear"
        scale_init = check_pathway_options(where, aux_trainable=aux_trainable, scale_init=scale_init,
                                           per_channel_scale=per_channel_scale)
        if is_pathway_layer(linear):
            raise ValueError(f"{where}: this layer already has a pathway (it is a {type(linear).__name__} holding "
                             "aux_weight / cross_modal_scale); merge it first (m2pt_kernels.merge_pathways(layer) returns "
                             "the plain nn.Linear)")
        weight = getattr(linear, "weight", None)
        if not isinstance(linear, nn.Linear) or not isinstance(weight, Tensor) or weight.dim() != 2:
            raise TypeError(
                f"{where}: linear must be an nn.Linear (or a subclass), got {type(linear).__name__}: another "
                "module's 2-D weight need not be a linear layer's [out_features, in_features] (nn.Embedding; "
                "Hugging Face's Conv1D stores it transposed). Build FusedCrossModalLinear(in_features, "
                "out_features, aux_weight=...) and copy that layer's weight in the right layout instead.")
        if isinstance(aux, nn.Module):
            if is_pathway_layer(aux):
                raise ValueError(
                    f"{where}: aux ({type(aux).__name__}) has a pathway itself (aux_weight / cross_modal_scale): "
                    "its weight alone is not the function it computes (W + λ·W'). Merge it first "
                    "(m2pt_kernels.merge_pathways(aux) returns the plain nn.Linear) and pass that.")
            aux_w = getattr(aux, "weight", None)
            if not isinstance(aux, nn.Linear) or not isinstance(aux_w, Tensor):
                raise TypeError(f"{where}: aux must be an nn.Linear (or its weight tensor), got {type(aux).__name__}: "
                                "another module's weight need not be laid out [out_features, in_features] (Hugging "
                                "Face's Conv1D stores it transposed); pass the auxiliary model's nn.Linear")
        else:
            aux_w = aux
        computed = computed_weights(linear)
        if computed:
            raise TypeError(
                f"FusedCrossModalLinear.from_linear: {type(linear).__name__}.{computed[0]} is computed on every call "
                "(a parametrization such as weight_norm / spectral_norm, or a hook), not a Parameter: the pathway "
                f"layer would train a frozen snapshot of it. Remove it first ({remove_computed_hint(linear, computed[0])}"
                "), or leave this layer out of target_modules")
        bias = getattr(linear, "bias", None)
        layer = cls(weight.shape[1], weight.shape[0], bias=bias is not None, aux_trainable=aux_trainable,
                    scale_init=scale_init, per_channel_scale=per_channel_scale, device="meta", dtype=weight.dtype)
        aux_copy = cls._copy_aux(aux_w, weight, "the auxiliary weight", where, expected="a torch.Tensor or an nn.Linear")
        layer.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight.detach())
        if bias is not None:
            layer.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias.detach())
        del layer.aux_weight
        layer._set_aux(aux_copy, aux_trainable)
        layer._aux_is_zeros = False
        layer.cross_modal_scale = nn.Parameter(layer._new_scale(scale_init, per_channel_scale, weight.device))
        layer.train(linear.training)
        return layer

    # ------------------------------------------------------------------ properties
    @property
    def aux_trainable(self) -> bool:
        return isinstance(self.aux_weight, nn.Parameter)

    @property
    def per_channel_scale(self) -> bool:
        return self.cross_modal_scale.numel() > 1

    # ------------------------------------------------------------------ the merged-weight cache
    def clear_merged_cache(self) -> None:
        """Drop the cached ``W + λ·W'`` (needed only after in-place writes through ``tensor.data``)."""
        self._cache = None

    def _merged_for_inference(self, dtype: torch.dtype, weight: Tensor, aux_weight: Tensor, scale: Tensor) -> Tensor:
        """``W + λ·W'`` of the tensors ``forward`` read, cached across eval calls (keyed on them)."""
        _ensure_step_hook()
        srcs = (weight, aux_weight, scale)
        cache = self._cache
        if (cache is not None and cache[0] == (dtype, _OPTIMIZER_STEPS[0])
                and all(_same_tensor(k, t) for k, t in zip(cache[1], srcs))
                and not (cache[2].is_inference() and not torch.is_inference_mode_enabled())):
            return cache[2]
        with torch.no_grad():
            merged = merged_weight(weight, aux_weight, scale, dtype)
        # inference tensors track no version counter (and change in place inside inference_mode without
        # a trace): never cached
        if self.cache_merged_weight and not self.training and not any(t.is_inference() for t in srcs):
            self._cache = ((dtype, _OPTIMIZER_STEPS[0]), tuple(_tensor_key(t) for t in srcs), merged)
        return merged

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor) -> Tensor:
        # On the CPU this layer must be no slower than the paper's, so the training call stays lean:
        # `self.weight` goes through nn.Module.__getattr__ (about 0.5 µs a read, four reads a call),
        # a dict lookup costs 0.02 µs. A name missing from the dicts (a parametrization moves it to a
        # property) takes the general lookup.
        params = self._parameters
        weight = params.get("weight", _MISSING)
        aux_weight = params.get("aux_weight", self._buffers.get("aux_weight", _MISSING))
        scale = params.get("cross_modal_scale", _MISSING)
        bias = params.get("bias", _MISSING)
        if weight is _MISSING or aux_weight is _MISSING or scale is _MISSING or bias is _MISSING:
            weight, aux_weight, scale, bias = self.weight, self.aux_weight, self.cross_modal_scale, self.bias
        if aux_weight.dtype is not weight.dtype:
            # FSDP2's MixedPrecisionPolicy casts the Parameters (W, b, a trainable W') for the forward
            # but not a frozen W', a buffer: compute with it in W's dtype, as if it were a Parameter
            aux_weight = aux_weight.to(weight.dtype)
        tracing = torch.jit.is_tracing()  # not torch._C._is_tracing: dynamo folds this one, breaks on that one
        if not tracing and (torch.is_grad_enabled() and (weight.requires_grad or aux_weight.requires_grad
                                                         or scale.requires_grad
                                                         or (bias is not None and bias.requires_grad))
                            or torch.compiler.is_compiling() or transforms_active()):
            return cross_modal_linear(x, weight, aux_weight, scale, bias)
        # No gradient can reach W, W', λ or b: one plain GEMM on the cached merged weight (the cache
        # keys on data pointers, which batched and dual tensors of torch.func transforms don't have).
        # torch.jit.trace records plain ops (the paper's W + λ·W', then F.linear), never the cache: a
        # trace then follows the parameters, and its graph is the same on every call.
        device_type = x.device.type if isinstance(x, Tensor) else "cpu"
        if isinstance(x, Tensor) and autocast_enabled(device_type) \
                and x.dtype != torch.float64 and weight.dtype != torch.float64:  # autocast leaves float64 alone
            dtype = torch.get_autocast_dtype(device_type)
            check_inputs(x, weight, aux_weight, scale, bias, where=type(self).__name__, autocast_dtype=dtype)
        else:
            check_inputs(x, weight, aux_weight, scale, bias, where=type(self).__name__)
            dtype = weight.dtype
        if tracing:
            return F.linear(x, merged_weight(weight, aux_weight, scale, dtype), bias)
        return F.linear(x, self._merged_for_inference(dtype, weight, aux_weight, scale), bias)

    def __prepare_scriptable__(self):
        # torch.jit.script calls this on every submodule before compiling: say what to do instead of
        # failing inside the compiler on the first attribute it can't type
        raise RuntimeError(
            f"{type(self).__name__} can't be compiled by torch.jit.script: its forward dispatches to Python "
            "kernels. For deployment, merge the pathways first (m2pt_kernels.merge_pathways(model) turns each "
            "one into a plain nn.Linear, which scripts); torch.jit.trace, torch.export and torch.compile take "
            "the pathway model as it is")

    # ------------------------------------------------------------------ merge
    def merged_weight(self) -> Tensor:
        """``W + λ·W'`` computed in fp32 (fp64 for fp64 weights) and cast once to W's dtype (detached)."""
        with torch.no_grad():
            return merged_weight(self.weight, self.aux_weight, self.cross_modal_scale, self.weight.dtype)

    def merge(self) -> nn.Linear:
        """A plain ``nn.Linear`` computing the same function: weight ``W + λ·W'``, the target's bias."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device="meta", dtype=self.weight.dtype)
        linear.weight = nn.Parameter(self.merged_weight(), requires_grad=self.weight.requires_grad)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=self.bias.requires_grad)
        linear.train(self.training)
        return linear

    # ------------------------------------------------------------------ dtype/device moves, loading
    def _apply(self, fn, recurse=True):
        # Keep λ (and its grad) at fp32 or wider under .to(bf16)/.half(): apply the cast to learn the
        # target device/dtype, then move the original values there in fp32 (no rounding through bf16).
        scale = self._scale_tensor() if self.keep_scale_fp32 else None
        grad = scale.grad if scale is not None else None

        def cast_keeping_scale(t):
            out = fn(t)
            if (t is scale or (grad is not None and t is grad)) and isinstance(out, Tensor) \
                    and out.is_floating_point():
                want = _scale_dtype(out.dtype)
                if out.dtype != want:
                    out = t.detach().to(device=out.device, dtype=want)
            return out

        self._cache = None
        return super()._apply(cast_keeping_scale, recurse)

    def _scale_tensor(self) -> Optional[Tensor]:
        """The λ Parameter itself: ``cross_modal_scale``, or its original under a parametrization."""
        scale = self._parameters.get("cross_modal_scale")
        if scale is None and "parametrizations" in self._modules:
            param = getattr(self._modules["parametrizations"], "cross_modal_scale", None)
            scale = getattr(param, "original", None)
        return scale

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        self._cache = None
        # torch passes strict=True here whatever the caller asked for, and raises on any error message:
        # an error here would refuse load_state_dict(..., strict=False) too. W' and λ missing from the
        # checkpoint are reported as missing keys (an error with strict=True, returned with strict=False);
        # the warning says what that means for a pathway layer.
        if prefix + "weight" in state_dict and not any(
                prefix + k in state_dict for k in ("aux_weight", "cross_modal_scale")):
            warnings.warn(
                "FusedCrossModalLinear: the checkpoint has no pathway for this layer (no aux_weight / "
                "cross_modal_scale keys): it is a plain or merged checkpoint. W and b are loaded, W' and λ keep "
                "their values. That is right for the target's own pretrained weights; a merged checkpoint "
                "(W + λ·W' folded in) belongs in the plain model (load it there, or before add_pathways).",
                stacklevel=2)
        if prefix + "aux_weight" in state_dict:
            self._aux_is_zeros = False  # W' now holds loaded data: reset_parameters leaves it alone
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        # load_state_dict(assign=True) puts the checkpoint's own tensor in place: keep λ at fp32 or wider
        scale = self._parameters.get("cross_modal_scale") if self.keep_scale_fp32 else None
        if scale is not None and scale.is_floating_point() and scale.dtype != _scale_dtype(scale.dtype):
            self.cross_modal_scale = nn.Parameter(scale.detach().to(_scale_dtype(scale.dtype)),
                                                  requires_grad=scale.requires_grad)

    def train(self, mode: bool = True):
        self._cache = None
        return super().train(mode)

    def __getstate__(self):
        state = dict(super().__getstate__())
        state["_cache"] = None  # weakrefs do not pickle / deepcopy
        return state

    def extra_repr(self) -> str:
        parts = [f"in_features={self.in_features}", f"out_features={self.out_features}",
                 f"bias={self.bias is not None}",
                 f"aux={'trainable' if self.aux_trainable else 'frozen'}"]
        scale = self.cross_modal_scale
        if scale.numel() > 1:
            parts.append(f"scale=per-channel[{scale.numel()}]")
        elif scale.device.type == "meta":
            parts.append("scale=[1] (meta)")
        else:
            parts.append(f"scale={float(scale.detach().float().cpu()[0]):.4g}")
        return ", ".join(parts)
