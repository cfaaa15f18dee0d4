"""Whole-model tools: add multimodal pathways to a model, merge them away, load and save checkpoints.

Every function that changes a model does it in place and also returns the model, so both
``add_pathways(model, aux)`` and ``model = add_pathways(model, aux)`` are right.

Layers are paired by qualified name (``blocks.3.attn.qkv`` of the target takes the auxiliary
model's ``blocks.3.attn.qkv.weight``), never by position. The auxiliary model's tokenizer and head
may differ from the target's: only the matched layers need a partner of the same shape.

Which layers (``PathwayConfig.target_modules``):

- ``None``: a preset chosen by the model family: the one preset whose every layer name is in the
  model (see ``PRESETS``). A model where no preset fits whole (say only its ``mlp.fc1``/``mlp.fc2``)
  is an error naming what matched, never a silent partial selection: pass ``target_modules``.
- a list of names or suffixes: ``"attn.qkv"`` matches ``blocks.3.attn.qkv`` (at a dot boundary,
  so it does not match ``blocks.3.xattn.qkv``); a full name matches only itself.
- a string: a regular expression matched against the whole qualified name
  (``r"blocks\\.(0|1)\\.mlp\\.fc\\d"``), or the name of a preset (``"timm_vit"``).

``exclude_modules`` (default ``("head",)``) removes a module and everything under it, matching
contiguous dotted components anywhere in the name (``"head"`` excludes ``head`` and ``head.fc``).
"""
from __future__ import annotations

import argparse
import difflib
import logging
import math
import numbers
import os
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch import Tensor

from .layers import (META_NO_VALUES, FusedCrossModalLinear, check_aux_finite, check_pathway_options,
                     computed_weights, is_pathway_layer, remove_computed_hint)
from .ops.cross_modal_linear_reference import merged_weight

__all__ = [
    "PRESETS",
    "CHECKPOINT_SUFFIXES",
    "checkpoint_format",
    "PathwayConfig",
    "add_pathways",
    "merge_pathways",
    "mark_only_scales_trainable",
    "param_groups",
    "reparameterize_aux_into_target_model",
    "load_checkpoint",
    "save_checkpoint",
    "merge_state_dict",
    "is_pathway_state_dict",
]

logger = logging.getLogger("m2pt_kernels")

# Layer-name presets by model family (suffixes at a dot boundary).
PRESETS: Dict[str, Tuple[str, ...]] = {
    # timm VisionTransformer (and m2pt_kernels.models, which uses timm's block names)
    "timm_vit": ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"),
    # Hugging Face ViT, transformers >= 5 (ViTAttention.q_proj/k_proj/v_proj/o_proj, ViTMLP.fc1/fc2,
    # under ``layers.<i>``)
    "hf_vit": ("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj",
               "mlp.fc1", "mlp.fc2"),
    # Hugging Face ViT, transformers 4.x (``encoder.layer.<i>``: ViTSelfAttention.query/key/value,
    # ViTSelfOutput.dense, ViTIntermediate.dense, ViTOutput.dense)
    "hf_vit_legacy": ("attention.attention.query", "attention.attention.key", "attention.attention.value",
                      "attention.output.dense", "intermediate.dense", "output.dense"),
    # Hugging Face CLIP / SigLIP / SigLIP2 encoders (CLIPAttention.q_proj/k_proj/v_proj/out_proj under
    # ``self_attn``, CLIPMLP.fc1/fc2 under ``mlp``)
    "hf_clip": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                "mlp.fc1", "mlp.fc2"),
}

# what load_checkpoint reads and save_checkpoint writes (`m2pt merge` and the examples check against it)
# (``.tar``: timm's train.py writes ``model_best.pth.tar`` / ``last.pth.tar`` / ``checkpoint-N.pth.tar``
# with torch.save)
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".tar", ".safetensors")


def checkpoint_format(path: Union[str, "os.PathLike[str]"]) -> str:
    """The format of a checkpoint path, from its suffix: one of ``CHECKPOINT_SUFFIXES``, lower-case.
    Any other suffix is a ValueError that names the path and the suffixes supported."""
    path = _fspath(path, "checkpoint_format")
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in CHECKPOINT_SUFFIXES:
        raise ValueError(f"unknown checkpoint format {suffix or '(no suffix)'!r} of {path!r}; "
                         f"use one of {', '.join(CHECKPOINT_SUFFIXES)}")
    return suffix


def _fspath(path, where: str) -> str:
    """``path`` as a str, or a TypeError naming ``where``'s path argument (not os.fspath's bare one)."""
    if not isinstance(path, (str, bytes, os.PathLike)):
        raise TypeError(f"{where}: path must be a file path (a str or os.PathLike), got {path!r} "
                        f"({type(path).__name__}); pass the checkpoint file's name")
    return os.fsdecode(path)


def _check_model(model, where: str, what: str = "model") -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{where}: {what} must be an nn.Module, got {type(model).__name__}")


_WRAPPER_KEYS = ("state_dict", "model", "module", "model_state_dict", "model_state")
_KEY_PREFIXES = ("module.", "_orig_mod.")
_NO_PATHWAYS = ("this checkpoint has no pathways (no *.aux_weight / *.cross_modal_scale keys): "
                "it is already merged or a plain model")

AuxSource = Union[nn.Module, Mapping[str, Tensor], str, "os.PathLike[str]"]


@dataclass
class PathwayConfig:
    """Which layers get a pathway, and how each pathway layer is built.

    target_modules: ``None`` (preset by model family), a list of names/suffixes, or a regex string
        (or a preset name) matched against the full qualified name.
    exclude_modules: names whose modules (and everything under them) never get a pathway.
    aux_trainable: W' is trained (Parameter) or frozen (persistent buffer).
    scale_init: initial λ (0: the converted model computes exactly what the target did).
    per_channel_scale: one λ per output channel ([out_features]) instead of one per layer ([1]).
    """

    target_modules: Optional[Union[str, Sequence[str]]] = None
    exclude_modules: Union[str, Sequence[str]] = ("head",)
    aux_trainable: bool = True
    scale_init: float = 0.0
    per_channel_scale: bool = False

    def __post_init__(self):
        self.scale_init = check_pathway_options("PathwayConfig", aux_trainable=self.aux_trainable,
                                                scale_init=self.scale_init, per_channel_scale=self.per_channel_scale)
        for what in ("target_modules", "exclude_modules"):  # a bad regex now, not at add_pathways
            if isinstance(getattr(self, what), str):
                _check_regex(getattr(self, what), what)


# ---------------------------------------------------------------------------- name matching
def _suffix_match(name: str, pattern: str) -> bool:
    return name == pattern or name.endswith("." + pattern)


def _component_match(name: str, pattern: str) -> bool:
    """``pattern``'s dotted components appear contiguously in ``name`` (module or anything under it)."""
    return ("." + name + ".").find("." + pattern + ".") >= 0


def _matches_target(name: str, spec: Union[str, Sequence[str]]) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(_suffix_match(name, p) for p in spec)


def _excluded(name: str, spec: Union[str, Sequence[str], None]) -> bool:
    if not spec:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None or any(
            re.fullmatch(spec, ".".join(name.split(".")[:i])) for i in range(1, name.count(".") + 1))
    return any(_component_match(name, p) for p in spec)


def _check_regex(spec: str, what: str) -> None:
    try:
        re.compile(spec)
    except re.error as exc:
        raise ValueError(f"PathwayConfig.{what}: {spec!r} is not a valid regular expression ({exc}); a string is "
                         "matched as a regex against the full qualified name: fix or escape it (re.escape), or pass a "
                         "list of names or suffixes instead") from None


def _check_spec(spec, what: str):
    if isinstance(spec, str):
        _check_regex(spec, what)
    if spec is None or isinstance(spec, str):
        return spec
    if isinstance(spec, Iterable):
        spec = tuple(spec)
        bad = [p for p in spec if not isinstance(p, str) or not p]
        if not bad:
            return spec
    raise TypeError(f"PathwayConfig.{what} must be None, a regex string or a list of non-empty names, got {spec!r}")


def _linear_names(model: nn.Module) -> List[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) or is_pathway_layer(m)]


def _select(model: nn.Module, config: PathwayConfig) -> Tuple[List[str], str]:
    """Qualified names of the modules that get a pathway, and a description of how they were chosen."""
    target = _check_spec(config.target_modules, "target_modules")
    exclude = _check_spec(config.exclude_modules, "exclude_modules")
    names = [n for n, _ in model.named_modules() if n]
    if isinstance(target, str) and target in PRESETS:
        target, how = PRESETS[target], f"preset {target!r}"
    elif target is None:
        best = _pick_preset(model, exclude)
        target, how = PRESETS[best], f"preset {best!r}"
    else:
        how = f"regex {target!r}" if isinstance(target, str) else f"names {list(target)}"
    selected = [n for n in names if _matches_target(n, target) and not _excluded(n, exclude)]
    if not selected:
        raise ValueError(_no_match_message(model, target, exclude))
    return selected, how


def _pick_preset(model: nn.Module, exclude) -> str:
    """The preset for ``target_modules=None``: the one whose every suffix names a linear layer of the
    model. Presence is judged before ``exclude_modules``, so excluding a layer kind on purpose (say
    ``attn.qkv``) keeps the preset; the exclusion then applies to the selection."""
    def present(sufs, names):
        return [suf for suf in sufs if any(_suffix_match(n, suf) for n in names)]

    linears = _linear_names(model)
    found = {p: present(sufs, linears) for p, sufs in PRESETS.items()}
    whole = [p for p, sufs in PRESETS.items() if len(found[p]) == len(sufs)]
    if len(whole) > 1:  # a model with two families: what the user excluded may leave one of them whole
        kept = [n for n in linears if not _excluded(n, exclude)]
        whole = [p for p in whole if len(present(PRESETS[p], kept)) == len(PRESETS[p])] or whole
    if len(whole) == 1:
        return whole[0]
    if len(whole) > 1:
        raise ValueError(
            f"add_pathways: more than one preset fits this model whole ({', '.join(whole)}): it holds layers of "
            "several model families, and which ones get pathways is your choice. Pass PathwayConfig("
            "target_modules=...) explicitly: a preset name, a list of names or suffixes, or a regex string.")
    partial = [p for p in PRESETS if found[p]]
    if not partial:
        raise ValueError(_no_match_message(model, None, exclude))
    shown = "; ".join(f"{p!r} has {', '.join(found[p])} but not {', '.join(s for s in PRESETS[p] if s not in found[p])}"
                      for p in partial)
    suffixes = sorted({".".join(n.split(".")[-2:]) for n in linears})
    raise ValueError(
        f"add_pathways: no preset fits this model whole ({shown}). target_modules=None picks a preset only "
        "when the model has every layer it names; a part of one would silently leave the other layers (often "
        f"the attention) without a pathway. Linear-layer suffixes in the model: {suffixes[:20]}. Pass "
        "PathwayConfig(target_modules=[...]) explicitly with the names or suffixes of the layers to pair, or a "
        "regex string.")


def _no_match_message(model: nn.Module, target, exclude) -> str:
    linears = _linear_names(model)
    presets = "; ".join(f"{k}: {', '.join(v)}" for k, v in PRESETS.items())
    if target is None:
        head = "add_pathways: no module of this model matches a preset layer-name list"
        wanted: List[str] = [s for v in PRESETS.values() for s in v]
    elif isinstance(target, str):
        head = f"add_pathways: no module name fully matches the regex {target!r}"
        wanted = [target]
    else:
        head = f"add_pathways: no module matches target_modules={list(target)}"
        wanted = list(target)
    suffixes = sorted({".".join(n.split(".")[-2:]) for n in linears})
    near: List[str] = []
    for w in wanted:
        near += difflib.get_close_matches(w, suffixes + linears, n=3, cutoff=0.4)
    near = list(dict.fromkeys(near))[:8]
    excl = f" (after excluding {exclude!r})" if exclude else ""
    return (f"{head}{excl}. Nearest linear-layer names: {near or suffixes[:8] or 'none: the model has no nn.Linear'}. "
            f"Linear-layer suffixes in the model: {suffixes[:20]}. Presets: {presets}. "
            "Pass PathwayConfig(target_modules=[...]) with names or suffixes, or a regex string.")


def _get_parent(model: nn.Module, name: str) -> Tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


# The hooks a replacement layer takes over from the layer it replaces (add_pathways, merge_pathways). Not the
# state_dict / load_state_dict hooks: those belong to the layer's own class (a pathway layer registers its own).
_CARRIED_HOOKS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
                  "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_backward_pre_hooks",
                  "_backward_hooks", "_is_full_backward_hook")


def _carry_hooks(old: nn.Module, new: nn.Module) -> nn.Module:
    """``new`` shares ``old``'s forward / backward hook dicts (the same objects, not copies, so the handles the
    user holds still remove them); returns ``new``. Only attributes both have (older torch lacks some)."""
    missing = object()
    for attr in _CARRIED_HOOKS:
        hooks = getattr(old, attr, missing)
        if hooks is not missing and getattr(new, attr, missing) is not missing:
            setattr(new, attr, hooks)
    return new


# ---------------------------------------------------------------------------- checkpoints
def _unwrap(obj, where: str) -> Dict[str, Tensor]:
    """Descend ``model`` / ``module`` / ``state_dict`` nesting, drop ``module.`` prefixes, keep tensors."""
    seen = 0
    while isinstance(obj, Mapping) and seen < 8:
        seen += 1
        # A wrapper key holding a mapping is a nested state_dict even when tensors sit next to it
        # (the ImageNet example's {"state_dict": sd, "best_acc1": tensor, ...}): a state_dict's own
        # values are tensors, never mappings. One holding a whole pickled module ({"model": module,
        # "epoch": 3}) is unwrapped like a bare module, below.
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), (Mapping, nn.Module))), None)
        if inner is None:
            break
        obj = inner
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, Mapping):
        raise TypeError(f"{where}: expected a state_dict (a mapping of names to tensors), got {type(obj).__name__}")
    sd = OrderedDict((k, v) for k, v in obj.items() if isinstance(k, str) and isinstance(v, Tensor))
    if not sd:
        keys = list(obj.keys())[:10]
        raise ValueError(f"{where}: no tensors found (top-level keys: {keys}); expected a state_dict, or a "
                         f"checkpoint holding one under one of {list(_WRAPPER_KEYS)}")
    # torch.optim.swa_utils.AveragedModel (EMA / SWA) keeps its model under ``module.`` next to its own
    # ``n_averaged`` counter: that counter is not a weight of the model
    if "n_averaged" in sd and any(k.startswith("module.") for k in sd):
        del sd["n_averaged"]
    for prefix in _KEY_PREFIXES:
        if all(k.startswith(prefix) for k in sd):
            sd = OrderedDict((k[len(prefix):], v) for k, v in sd.items())
    return sd


def load_checkpoint(path: Union[str, "os.PathLike[str]"], *, weights_only: bool = True) -> Dict[str, Tensor]:
    """The state_dict in a ``.pth`` / ``.pt`` / ``.bin`` / ``.ckpt`` / ``.tar`` (timm's ``model_best.pth.tar``)
    / ``.safetensors`` file, on the CPU.

    Training checkpoints are unwrapped (``{"model": sd, "optimizer": ...}``, ``{"state_dict": sd}``,
    ``{"module": sd}``) and DDP's ``module.`` / torch.compile's ``_orig_mod.`` prefixes dropped. Pickle
    files are read with ``torch.load(weights_only=True)`` (``argparse.Namespace`` entries such as MAE's
    ``args`` are allowed); pass ``weights_only=False`` only for files you trust.
    """
    path = _fspath(path, "load_checkpoint")
    if not os.path.exists(path):
        raise FileNotFoundError(f"load_checkpoint: no such file: {path!r}")
    if os.path.isdir(path):
        raise IsADirectoryError(f"load_checkpoint: {path!r} is a directory; pass the checkpoint file inside it")
    try:
        suffix = checkpoint_format(path)
    except ValueError as exc:
        raise ValueError(f"load_checkpoint: {exc}") from None
    if suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as exc:  # optional dependency
            raise ImportError("load_checkpoint: reading .safetensors needs the safetensors package "
                              "(pip install safetensors)") from exc
        try:
            obj = load_file(path, device="cpu")
        except Exception as exc:  # safetensors' SafetensorError (a corrupt or misnamed file), OSError, ...
            detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            with open(path, "rb") as f:
                head = f.read(4)
            pickled = head[:2] == b"PK" or head[:1] == b"\x80"  # torch.save's zip or legacy pickle
            hint = ": it looks like a torch.save file; rename it to .pth" if pickled else "; is the file complete?"
            raise RuntimeError(f"load_checkpoint: could not read {path!r} as a safetensors file ({detail}){hint}"
                               ) from exc
        return _unwrap(obj, f"load_checkpoint({path!r})")
    safe = getattr(torch.serialization, "safe_globals", None)
    try:
        if weights_only and safe is not None:
            with safe([argparse.Namespace]):
                obj = torch.load(path, map_location="cpu", weights_only=True)
        else:
            obj = torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()] or [type(exc).__name__]
        detail = next((ln for ln in lines if "Unsupported" in ln), lines[0])[:300]
        if weights_only and ("Unsupported global" in detail or "Unsupported class" in detail):
            raise RuntimeError(
                f"load_checkpoint: {path!r} holds Python objects that torch.load(weights_only=True) refuses "
                f"({detail}). If you trust the file, call load_checkpoint(path, weights_only=False), or "
                "re-save only its state_dict.") from exc
        raise RuntimeError(f"load_checkpoint: could not read {path!r} as a PyTorch checkpoint ({detail})") from exc
    return _unwrap(obj, f"load_checkpoint({path!r})")


def save_checkpoint(state_dict: Mapping[str, Tensor], path: Union[str, "os.PathLike[str]"]) -> None:
    """Write ``state_dict`` as ``.safetensors`` or with ``torch.save``
    (``.pth``/``.pt``/``.bin``/``.ckpt``/``.tar``)."""
    path = _fspath(path, "save_checkpoint")
    if isinstance(state_dict, nn.Module):
        state_dict = state_dict.state_dict()
    try:
        suffix = checkpoint_format(path)
    except ValueError as exc:
        raise ValueError(f"save_checkpoint: {exc}") from None
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"save_checkpoint: state_dict must be a mapping of names to tensors (a model's "
                        f"state_dict()) or an nn.Module, got {type(state_dict).__name__}")
    if not state_dict:
        raise ValueError(f"save_checkpoint: the state_dict is empty: nothing to write to {path!r} (load_checkpoint "
                         "would find no tensors in it); pass the model's state_dict()")
    bad = [k for k in state_dict if not isinstance(k, str)]
    if bad:
        raise TypeError(f"save_checkpoint: keys must be str (parameter names such as 'blocks.0.attn.qkv.weight'); "
                        f"key {bad[0]!r} is {type(bad[0]).__name__}: load_checkpoint would find no tensors under it. "
                        "Save the model's state_dict(), or convert the keys with str()")
    bad = [k for k, v in state_dict.items() if not isinstance(v, Tensor)]
    if bad:
        raise TypeError(f"save_checkpoint: values must be tensors; not tensors: {bad[:5]}")
    bad = [k for k, v in state_dict.items() if v.is_meta]
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise ValueError(f"save_checkpoint: {bad[0]!r} is on the meta device{more}: {META_NO_VALUES}. Load the weights "
                         "first (model.to_empty(device='cpu'), then load_state_dict), then save")
    if suffix == ".safetensors":
        try:
            from safetensors.torch import save_file
        except ImportError as exc:
            raise ImportError("save_checkpoint: writing .safetensors needs the safetensors package "
                              "(pip install safetensors)") from exc
        out, seen = {}, set()
        for k, v in state_dict.items():  # safetensors refuses shared or non-contiguous storage
            t = v.detach().cpu().contiguous()
            key = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else None
            if key in seen:
                t = t.clone()
            seen.add(key)
            out[k] = t
        save_file(out, path)
        # safetensors writes through a private temporary file (mode 0600): give the checkpoint the mode any
        # new file gets (what torch.save's files get), so that a serving user can read a deployed model
        os.chmod(path, 0o666 & ~_umask())
    else:
        torch.save(OrderedDict((k, v.detach()) for k, v in state_dict.items()), path)


def _is_dtensor(t) -> bool:
    """A DTensor (FSDP2, tensor parallel), told without importing torch.distributed."""
    return type(t).__name__ == "DTensor"


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it (/proc), else set and restored."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _pathway_prefixes(state_dict: Mapping[str, Tensor]) -> List[str]:
    prefixes = []
    for k in state_dict:
        for leaf in ("aux_weight", "cross_modal_scale"):
            if k == leaf or k.endswith("." + leaf):
                p = k[: -len(leaf)]
                if p not in prefixes:
                    prefixes.append(p)
    return prefixes


def _state_dict_arg(state_dict, where: str) -> Mapping[str, Tensor]:
    """A flat state_dict as given (its keys, prefixes included, kept), or the one inside a training checkpoint
    (``{"model": sd, "epoch": 3}``, an nn.Module) unwrapped the way load_checkpoint unwraps it."""
    if isinstance(state_dict, (str, bytes, os.PathLike)):
        raise TypeError(f"{where}: state_dict must be a state_dict (a mapping of names to tensors), got the path "
                        f"{os.fsdecode(state_dict)!r}; read the file first: {where}(load_checkpoint(path))")
    if not isinstance(state_dict, (Mapping, nn.Module)):
        raise TypeError(f"{where}: state_dict must be a state_dict (a mapping of names to tensors) or a checkpoint "
                        f"holding one, got {type(state_dict).__name__}")
    if isinstance(state_dict, Mapping) and not any(
            isinstance(state_dict.get(k), (Mapping, nn.Module)) for k in _WRAPPER_KEYS):
        return state_dict
    return _unwrap(state_dict, where)


def is_pathway_state_dict(state_dict: Mapping[str, Tensor]) -> bool:
    """True when the state_dict has pathways (``*.aux_weight`` / ``*.cross_modal_scale`` keys). A training
    checkpoint (``{"model": sd, "epoch": 3}``, ...) is looked into the way ``load_checkpoint`` unwraps it."""
    return bool(_pathway_prefixes(_state_dict_arg(state_dict, "is_pathway_state_dict")))


def merge_state_dict(state_dict: Mapping[str, Tensor]) -> "OrderedDict[str, Tensor]":
    """Fold every ``<p>.aux_weight`` and ``<p>.cross_modal_scale`` into ``<p>.weight`` (``W + λ·W'``,
    fp32 math, one cast to W's dtype) and drop the two keys. Works for this package's and the paper's
    checkpoints; the input is not modified. The result loads into the unconverted architecture with the
    same key prefixes: a DDP (``module.``) or torch.compile (``_orig_mod.``) model's ``state_dict()`` keeps
    them (``load_checkpoint`` drops them when reading a file). A training checkpoint (``{"model": sd,
    "optimizer": ..., "epoch": 3}``) is unwrapped the way ``load_checkpoint`` unwraps it, and the result is
    then the flat merged state_dict alone (wrapper, other entries and those prefixes dropped).
    """
    state_dict = _state_dict_arg(state_dict, "merge_state_dict")
    prefixes = _pathway_prefixes(state_dict)
    if not prefixes:
        raise ValueError(f"merge_state_dict: {_NO_PATHWAYS}")
    sharded = [k for p in prefixes for k in (p + "weight", p + "aux_weight", p + "cross_modal_scale")
               if _is_dtensor(state_dict.get(k))]
    if sharded:
        raise ValueError(
            f"merge_state_dict: {sharded[0]!r} is a shard (DTensor: a sharded FSDP2 / tensor-parallel state_dict). "
            "Merge the full state_dict: get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, "
            "cpu_offload=True)) from torch.distributed.checkpoint.state_dict.")
    merged: Dict[str, Tensor] = {}
    for p in prefixes:
        layer = p[:-1] if p else "(top level)"
        missing = [p + k for k in ("weight", "aux_weight", "cross_modal_scale") if p + k not in state_dict]
        if missing:
            raise ValueError(f"merge_state_dict: layer {layer!r} is incomplete: missing {missing}")
        w, a, s = state_dict[p + "weight"], state_dict[p + "aux_weight"], state_dict[p + "cross_modal_scale"]
        if tuple(a.shape) != tuple(w.shape):
            raise ValueError(f"merge_state_dict: layer {layer!r}: weight has shape {list(w.shape)} but "
                             f"aux_weight has shape {list(a.shape)}")
        if s.dim() != 1 or s.shape[0] not in (1, w.shape[0]):
            raise ValueError(f"merge_state_dict: layer {layer!r}: cross_modal_scale has shape {list(s.shape)}; "
                             f"expected [1] or [{w.shape[0]}]")
        merged[p + "weight"] = merged_weight(w.detach(), a.detach().to(w.device), s.detach().to(w.device), w.dtype)
    drop = {p + k for p in prefixes for k in ("aux_weight", "cross_modal_scale")}
    return OrderedDict((k, merged.get(k, v)) for k, v in state_dict.items() if k not in drop)


# ---------------------------------------------------------------------------- pairing with the aux model
def _aux_state_dict(aux: AuxSource) -> Dict[str, Tensor]:
    if isinstance(aux, nn.Module):
        sd = aux.state_dict()
        where = f"the auxiliary model ({type(aux).__name__})"
    elif isinstance(aux, (str, os.PathLike)):
        sd = load_checkpoint(aux)
        where = f"the auxiliary checkpoint {os.fspath(aux)!r}"
    elif isinstance(aux, Mapping):
        sd = _unwrap(aux, "add_pathways(aux=state_dict)")
        where = "the auxiliary state_dict"
    else:
        raise TypeError("add_pathways: aux must be an nn.Module, a state_dict or a path to a "
                        f".pth/.pt/.safetensors file, got {type(aux).__name__}")
    prefixes = _pathway_prefixes(sd)
    if prefixes:
        raise ValueError(
            f"add_pathways: {where} has pathways itself ({len(prefixes)} layers with aux_weight / "
            f"cross_modal_scale, e.g. {prefixes[0][:-1]!r}): it is an unmerged M2PT checkpoint, not a plain "
            "model. Merge it first (m2pt_kernels.pathways.merge_state_dict or `m2pt merge IN OUT`).")
    return sd


def _align_names(selected: List[str], aux_keys: Iterable[str], where: str) -> Tuple[str, str]:
    """(target prefix to strip, aux prefix to add) so that target layer names find aux keys.

    Exact names first; else the one wrapper prefix present on one side only (e.g. ``vit.`` of
    ViTForImageClassification vs ViTModel, or a wrapper's ``model.``) that pairs the most selected
    layers, and more of them than exact names do. It need not pair every layer: an auxiliary model
    that is shallower, or lacks a layer, is then reported as such (depth, or the missing layer by
    name) rather than as a model with other layer names.
    """
    keys = set(aux_keys)
    exact = sum((n + ".weight") in keys for n in selected)
    if exact == len(selected):
        return "", ""
    # every aux key by each of its dotted endings: ending -> the prefixes in front of it
    by_ending: Dict[str, List[str]] = {}
    for k in keys:
        parts = k.split(".")
        for j in range(len(parts)):
            by_ending.setdefault(".".join(parts[j:]), []).append(".".join(parts[:j]) + ("." if j else ""))
    hits: Dict[Tuple[str, str], int] = {}
    for n in selected:
        parts = n.split(".")
        found = set()
        for i in range(len(parts)):  # strip i leading components of the target name ...
            strip = ".".join(parts[:i]) + ("." if i else "")
            for add in by_ending.get(".".join(parts[i:]) + ".weight", ()):  # ... and add the aux key's front
                # only a wrapper prefix on one side (``vit.``, ``model.``, ``backbone.``), never a block
                # index: anything else is not pairing by name
                if (strip and add) or not (strip or add) or any(p.isdigit() for p in (strip + add).split(".")):
                    continue
                found.add((strip, add))
        for pair in found:
            hits[pair] = hits.get(pair, 0) + 1
    most = max(hits.values(), default=0)
    if most <= exact:
        return "", ""
    pairing = sorted(pair for pair, h in hits.items() if h == most)
    if len(pairing) > 1 and all(not aux_pre for _, aux_pre in pairing):
        # the target holds the towers (``image.`` and ``video.``), each pairing with the one auxiliary model
        towers = ", ".join(repr(target_pre) for target_pre, _ in pairing)
        raise ValueError(
            f"add_pathways: the target holds more than one set of layers that pairs with {where} by name (its "
            f"{towers} sub-models); add pathways to each tower you mean, e.g. add_pathways(model.image, aux), or "
            "pick its layers with target_modules.")
    if len(pairing) > 1:
        # e.g. an auxiliary model with ``video.`` and ``audio.`` towers of one architecture: which
        # one is meant is the user's choice, never the alphabet's
        shown = ", ".join(repr(aux_pre) if aux_pre else f"target's {target_pre!r} dropped"
                          for target_pre, aux_pre in pairing)
        raise ValueError(
            f"add_pathways: {where} holds more than one set of layers that pairs with the target's "
            f"{selected[0]!r}, ... by name (prefixes {shown}); pass the sub-model to pair with (e.g. "
            "aux.video instead of aux), or a state_dict holding only its keys.")
    return pairing[0]


def _block_index_counts(names: Iterable[str], containers: Iterable[str]) -> Dict[str, List[int]]:
    out: Dict[str, set] = {c: set() for c in containers}
    for n in names:
        for c in out:
            pre = c + "." if c else ""
            if n.startswith(pre):
                head = n[len(pre):].split(".", 1)[0]
                if head.isdigit():
                    out[c].add(int(head))
    return {c: sorted(v) for c, v in out.items()}


def _containers_of(name: str) -> List[str]:
    """Every numbered container on the way to ``name``: ``blocks`` for ``blocks.3.attn.qkv``;
    ``encoder.layer`` for ``encoder.layer.3.output.dense``; ``layers`` and ``layers.2.blocks`` for
    Swin's ``layers.2.blocks.5.attn.qkv`` (each stage's depth counts)."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i, p in enumerate(parts) if p.isdigit()]


def _span(ix: List[int]) -> str:
    return f"{ix[0]}-{ix[-1]}" if ix else "none"


def _check_depth(model: nn.Module, selected: List[str], aux_keys: List[str], strip: str, add: str,
                 where: str) -> None:
    """Each numbered container of the selected layers has as many blocks in the auxiliary model as in
    the target; or, when the selection covers only some of the target's blocks, exactly those."""
    containers = sorted({c for n in selected for c in _containers_of(n)})
    if not containers:
        return
    target_ix = _block_index_counts([n for n, _ in model.named_modules()], containers)
    selected_ix = _block_index_counts(selected, containers)
    mapped = [add + c[len(strip):] if c.startswith(strip) else c for c in containers]
    aux_ix_by_mapped = _block_index_counts(aux_keys, mapped)
    for c, mc in zip(containers, mapped):
        t, s, a = target_ix[c], selected_ix[c], aux_ix_by_mapped[mc]
        if len(a) == len(t) or (len(s) < len(t) and a == s):
            continue
        deeper = "deeper" if len(a) > len(t) else "shallower"
        shown = "" if not mc else f"{mc}."
        subset = (f" (the selected layers are in {c}.{_span(s)}, and the auxiliary blocks are not exactly those)"
                  if len(s) < len(t) else "")
        raise ValueError(
            f"add_pathways: {where} is {deeper} than the target: the target has {c}.{_span(t)} "
            f"({len(t)} blocks) but the auxiliary model has {shown}{_span(a)} ({len(a)} blocks){subset}. Layers "
            "are paired by name, block i with block i, so both need the same depth (the paper's code "
            "silently pairs only the first min(depth) blocks). Use an auxiliary model of the target's depth, "
            "or pass a state_dict holding only the blocks to pair and select them with target_modules.")


def _weight_read_by_parent(parent: nn.Module, name: str) -> bool:
    """timm's BEiT / EVA / Swin V2 attention: with ``q_bias``/``v_bias`` of its own it reads
    ``self.qkv.weight`` into ``F.linear`` instead of calling ``self.qkv`` (unless ``qkv_bias_separate``,
    which calls it and adds the bias after). A pathway on that ``qkv`` would never run."""
    if name.rpartition(".")[2] != "qkv" or getattr(parent, "qkv_bias_separate", False) is True:
        return False
    return any(isinstance(getattr(parent, b, None), Tensor) for b in ("q_bias", "k_bias", "v_bias"))


def add_pathways(model: nn.Module, aux: AuxSource, config: Optional[PathwayConfig] = None) -> nn.Module:
    """Give every selected linear layer of ``model`` a pathway to the same-named layer of ``aux``.

    ``aux``: the auxiliary ``nn.Module``, its state_dict, or a path to a ``.pth``/``.pt``/
    ``.safetensors`` file. Its weights are copied (never modified or aliased) and cast to each target
    layer's dtype and device. The target layers' own ``weight``/``bias`` Parameters are kept, so an
    optimizer built earlier still holds them (it does not hold the new λ and W': build it after this
    call, or add them). Forward and backward hooks registered on a replaced layer are kept: they fire on
    its pathway layer, and their handles still remove them. Nothing is changed when an error is raised.
    Returns ``model``.
    """
    _check_model(model, "add_pathways")
    config = PathwayConfig() if config is None else config
    if not isinstance(config, PathwayConfig):
        raise TypeError(f"add_pathways: config must be a PathwayConfig, got {type(config).__name__}")
    check_pathway_options("add_pathways", aux_trainable=config.aux_trainable, scale_init=config.scale_init,
                          per_channel_scale=config.per_channel_scale)  # fields can change after construction
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise TypeError(
            "add_pathways: model is wrapped in DistributedDataParallel, which registered its parameters when it was "
            "built: the new λ (and a trainable W') would never be all-reduced and would drift apart across ranks. "
            "Add pathways to the plain model, then wrap it in DDP.")
    existing = [n for n, m in model.named_modules() if is_pathway_layer(m)]
    if existing:
        raise ValueError(
            f"add_pathways: this model already has pathways ({len(existing)} layers, e.g. {existing[0] or '(root)'!r}); "
            "pathways cannot be added twice. Call merge_pathways(model) first to fold them in, or start "
            "from the plain model.")
    aux_sd = _aux_state_dict(aux)
    where = f"the auxiliary model ({type(aux).__name__})" if isinstance(aux, nn.Module) else "the auxiliary weights"
    selected, how = _select(model, config)
    modules = dict(model.named_modules())
    aliases: Dict[int, List[str]] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        aliases.setdefault(id(m), []).append(n)
    for name in selected:
        m = modules[name]
        if len(aliases[id(m)]) > 1:
            raise ValueError(
                f"add_pathways: {name!r} is one module shared under several names ({aliases[id(m)]}): a pathway "
                "pairs one target layer with the same-named auxiliary layer, and a shared (tied) layer has several "
                "names. Untie it first (give each name its own copy), or exclude it with exclude_modules.")
        if not isinstance(m, nn.Linear):
            raise TypeError(f"add_pathways: {name!r} matches {how} but is a {type(m).__name__}, not an nn.Linear; "
                            "narrow target_modules (or exclude_modules) to linear layers")
        parent, _ = _get_parent(model, name)
        if isinstance(parent, nn.MultiheadAttention):
            raise TypeError(f"add_pathways: {name!r} is the out_proj of an nn.MultiheadAttention, which reads its "
                            "weight directly instead of calling it; a pathway there would be ignored. Exclude it.")
        if _weight_read_by_parent(parent, name):
            raise TypeError(
                f"add_pathways: {name!r} is not called by its parent {type(parent).__name__}: with its own q_bias / "
                "v_bias, that attention computes F.linear(x, self.qkv.weight, cat(q_bias, k_bias, "
                "v_bias)) (timm's BEiT, EVA and Swin V2), so a pathway there would be silently bypassed: λ would "
                "get no gradient and merging would change the model. Leave this layer out: "
                "exclude_modules=('head', 'attn.qkv'), or target_modules without 'attn.qkv' "
                "(e.g. ['attn.proj', 'mlp.fc1', 'mlp.fc2']).")
        computed = computed_weights(m)
        if computed:  # checked here, before any layer is replaced (from_linear would refuse it halfway)
            raise TypeError(
                f"add_pathways: {name!r} computes its {computed[0]} on every call (a parametrization such as "
                "weight_norm / spectral_norm, or a hook): a pathway layer would train a frozen snapshot of it. Remove "
                f"it first ({remove_computed_hint(m, computed[0])}) or exclude the layer.")
    aux_keys = list(aux_sd)
    strip, add = _align_names(selected, aux_keys, where)
    hits = sum(((add + n[len(strip):]) if n.startswith(strip) else n) + ".weight" in aux_sd for n in selected)
    if hits == 0:
        sample = [k for k in aux_keys if k.endswith(".weight")][:6]
        raise ValueError(
            f"add_pathways: no selected target layer has a same-named partner in {where} (target layers like "
            f"{selected[:3]}; aux keys like {sample}). Layers are paired by qualified name: the two models use "
            "different layer names (e.g. timm vs Hugging Face, or transformers 4.x vs 5.x ViT); convert the "
            "auxiliary state_dict's keys to the target's names first.")
    _check_depth(model, selected, aux_keys, strip, add, where)
    pairs = []
    for name in selected:
        target = modules[name]
        key = (add + name[len(strip):] if name.startswith(strip) else name) + ".weight"
        if key not in aux_sd:
            near = difflib.get_close_matches(key, aux_keys, n=3, cutoff=0.5)
            raise ValueError(f"add_pathways: target layer {name!r} has no partner in {where}: key {key!r} not "
                             f"found (nearest aux keys: {near or aux_keys[:5]})")
        aux_w = aux_sd[key]
        if tuple(aux_w.shape) != tuple(target.weight.shape):
            raise ValueError(f"add_pathways: layer {name!r}: the target weight has shape {list(target.weight.shape)} "
                             f"but the auxiliary {key!r} has shape {list(aux_w.shape)}; paired layers need equal "
                             "shapes (is the auxiliary model of the same width/size?)")
        if not aux_w.is_floating_point():
            raise TypeError(f"add_pathways: the auxiliary {key!r} is {aux_w.dtype}, not floating point")
        if _is_dtensor(target.weight):
            raise TypeError(
                f"add_pathways: target layer {name!r} is already sharded (its weight is a DTensor: FSDP2's "
                "fully_shard, or tensor parallelism). Add pathways to the plain model first, then shard it.")
        if target.weight.is_meta and not aux_w.is_meta:
            raise ValueError(
                f"add_pathways: target layer {name!r} is on the meta device but the auxiliary {key!r} holds values: "
                "the pathway layer keeps W' on its target's device, so the auxiliary weights would be dropped "
                "(after to_empty W' would be uninitialized memory). Materialize the target first (to_empty, then "
                "load its weights) and add pathways then; or build both on meta and load a checkpoint that has the "
                "pathways (aux_weight / cross_modal_scale keys).")
        if aux_w.is_meta and not target.weight.is_meta:
            raise ValueError(
                f"add_pathways: the auxiliary {key!r} (partner of {name!r}) is on the meta device: {META_NO_VALUES}. Load the "
                "auxiliary weights before adding pathways, e.g. aux.to_empty(device='cpu') then "
                "aux.load_state_dict(...), or pass the auxiliary checkpoint's path or state_dict instead.")
        check_aux_finite(aux_w, f"the auxiliary {key!r} (partner of {name!r})", "add_pathways")
        pairs.append((name, target, aux_w))
    for name, target, aux_w in pairs:
        layer = FusedCrossModalLinear.from_linear(
            target, aux_w, aux_trainable=config.aux_trainable, scale_init=config.scale_init,
            per_channel_scale=config.per_channel_scale)
        parent, child = _get_parent(model, name)
        setattr(parent, child, _carry_hooks(target, layer))
    logger.info("add_pathways: %d pathways (%s)%s", len(pairs), how,
                f", aux names mapped {strip!r} -> {add!r}" if (strip or add) else "")
    return model


def _fold_weight_hooks(m: nn.Module) -> None:
    """The forward pre-hooks that compute ``m``'s weight from other tensors (the hook-based weight_norm /
    spectral_norm, torch.nn.utils.prune) compute W once more (spectral_norm as in eval: no power iteration), and are
    then removed from ``m``: their result is folded into the merged weight, and the merged nn.Linear (which
    shares ``m``'s hook dicts, see _carry_hooks) has no weight_g / weight_orig / mask for them."""
    from torch.nn.utils import prune
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm
    for key, hook in list(m._forward_pre_hooks.items()):
        # with grad: W computed from Parameters that train is one itself (the merged W copies requires_grad)
        if isinstance(hook, SpectralNorm):  # no extra power iteration: the W the layer computes in eval()
            setattr(m, hook.name, hook.compute_weight(m, do_power_iteration=False))
        elif isinstance(hook, (WeightNorm, prune.BasePruningMethod)):
            hook(m, ())
        else:
            continue
        del m._forward_pre_hooks[key]


def _merge_module(m: nn.Module) -> nn.Linear:
    _fold_weight_hooks(m)
    if isinstance(m, FusedCrossModalLinear):
        return _carry_hooks(m, m.merge())
    # the paper's CrossModalReparamLinear (or a compatible layer)
    w = m.weight
    bias = getattr(m, "bias", None)
    linear = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device="meta", dtype=w.dtype)
    with torch.no_grad():
        linear.weight = nn.Parameter(merged_weight(w, m.aux_weight, m.cross_modal_scale, w.dtype),
                                     requires_grad=w.requires_grad)
        if bias is not None:
            linear.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
    linear.train(m.training)
    return _carry_hooks(m, linear)


def merge_pathways(model: nn.Module) -> nn.Module:
    """Fold every pathway (``W + λ·W'``) into a plain ``nn.Linear``; returns ``model``.

    Works on layers of this package and the paper's ``CrossModalReparamLinear``. The merged model's
    state_dict loads with ``strict=True`` into the unconverted architecture and computes the same
    function. Forward and backward hooks registered on a pathway layer are kept: they fire on its merged
    ``nn.Linear``, and their handles still remove them (a hook that reads the pathway layer's own
    attributes, such as ``cross_modal_scale``, then fails: remove it before merging). Hooks that compute
    the weight (the hook-based weight_norm / spectral_norm, ``torch.nn.utils.prune``) are folded into it
    instead. (A model that *is* one pathway layer cannot change in place: the merged layer is returned.)
    """
    _check_model(model, "merge_pathways")
    # every name of a shared (tied) layer, so each gets the one merged layer and the tie survives
    root = is_pathway_layer(model)
    found = ([("", model)] if root else
             [(n, m) for n, m in model.named_modules(remove_duplicate=False) if n and is_pathway_layer(m)])
    if not found:
        raise ValueError("merge_pathways: this model has no pathways (no FusedCrossModalLinear / "
                         "CrossModalReparamLinear layers): it is already merged or a plain model")
    for name, m in found:
        if any(_is_dtensor(t) for t in (m.weight, m.aux_weight, m.cross_modal_scale)):
            raise ValueError(
                f"merge_pathways: {name or '(root)'!r} holds sharded tensors (DTensor: FSDP2 / tensor parallel), "
                "which can't be folded in place. Merge the full state_dict instead: merge_state_dict(get_model_state_dict("
                "model, options=StateDictOptions(full_state_dict=True))) from torch.distributed.checkpoint"
                ".state_dict, then load it into the plain model.")
    if root:
        return _merge_module(model)
    merged: Dict[int, nn.Linear] = {}
    for name, m in found:
        parent, child = _get_parent(model, name)
        if getattr(parent, child) is m:  # not yet replaced through another name of a shared parent
            if id(m) not in merged:
                merged[id(m)] = _merge_module(m)
            setattr(parent, child, merged[id(m)])
    return model


def mark_only_scales_trainable(model: nn.Module, modules_to_save: Union[str, Sequence[str]] = ("head",)) -> nn.Module:
    """The paper's linear probing: only every pathway's λ and the modules in ``modules_to_save`` train.

    Pathway layers are found by type (``FusedCrossModalLinear`` or the paper's layer), not by name.
    ``modules_to_save`` matches like ``exclude_modules`` (``"head"`` is ``head`` and all under it; Hugging
    Face classifiers call it ``"classifier"``); pass ``()`` to train only λ. Returns ``model``.
    """
    _check_model(model, "mark_only_scales_trainable")
    if isinstance(modules_to_save, str):
        modules_to_save = (modules_to_save,)
    given = modules_to_save
    modules_to_save = tuple(given) if isinstance(given, Iterable) else (given,)
    bad = [p for p in modules_to_save if not isinstance(p, str)]
    if bad:
        raise TypeError(f"mark_only_scales_trainable: modules_to_save must be a module name or a list of names, got "
                        f"{given!r}; pass () to train only λ, or ('head',) (the default) to train the head too")
    layers = [m for m in model.modules() if is_pathway_layer(m)]
    if not layers:
        raise ValueError("mark_only_scales_trainable: this model has no pathways (call add_pathways first)")
    saved = {p: [n for n, _ in model.named_modules() if n and _component_match(n, p)] for p in modules_to_save}
    missing = [p for p, hits in saved.items() if not hits]
    if missing:
        top = [n for n, _ in model.named_children()]
        raise ValueError(f"mark_only_scales_trainable: no module named {missing} in the model (its top-level "
                         f"modules: {top}); pass modules_to_save=(...) with the head's name, or () to train only λ")
    for p in model.parameters():
        p.requires_grad_(False)
    for m in layers:
        m.cross_modal_scale.requires_grad_(True)
    for n, m in model.named_modules():
        if n and any(_component_match(n, p) for p in modules_to_save):
            for p in m.parameters():
                p.requires_grad_(True)
    return model


# Substrings of the parameter names that never decay: position embeddings (timm ``pos_embed``, Hugging
# Face ``embeddings.position_embeddings``, CLIP's ``position_embedding``), Swin's relative position bias
# tables, and the class / distillation / register / mask tokens (what timm's ``no_weight_decay`` lists).
_NO_DECAY_NAMES = ("pos_embed", "position_embedding", "relative_position_bias_table",
                   "cls_token", "dist_token", "reg_token", "mask_token")


def _check_rate(name: str, value, tensor_ok: bool = False):
    """param_groups' numbers: finite and non-negative (a NaN lr makes every parameter NaN after one step, a
    negative λ multiplier trains λ uphill), real (a string from a config file would be repeated, not scaled)."""
    if tensor_ok and isinstance(value, Tensor) and value.numel() == 1 and value.is_floating_point():
        number = value.item()
    elif isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"param_groups: {name} must be a real number, got {value!r} ({type(value).__name__}); "
                        f"pass a float (convert a value read from a config file with float())")
    else:
        number = value = float(value)
    if not math.isfinite(number) or number < 0:
        example = dict(lr="1e-3", weight_decay="0.05", scale_lr_mult="1.0")[name]
        raise ValueError(f"param_groups: {name} must be finite and non-negative, got {number}; pass e.g. "
                         f"{name}={example}")
    return value


def param_groups(model: nn.Module, lr: float, *, weight_decay: float = 0.05,
                 scale_lr_mult: float = 1.0) -> List[dict]:
    """Optimizer parameter groups for training with pathways (trainable parameters only).

    - matrices (2-D and up) decay with ``weight_decay``, except position embeddings, relative position
      bias tables and class / distillation / register / mask tokens (names containing one of
      ``_NO_DECAY_NAMES``: timm's and Hugging Face's names);
    - biases, norms and the rest: no decay;
    - every pathway's λ (``cross_modal_scale``): no decay, learning rate ``lr * scale_lr_mult``
      (one scalar per layer, starting at 0, usually wants a larger step than the weights).
    Each group also carries ``base_lr`` for schedulers that scale it; empty groups are left out.
    ``lr``, ``weight_decay`` and ``scale_lr_mult`` are finite, non-negative real numbers (``lr`` may also be
    a one-element tensor, which torch's optimizers accept).
    """
    _check_model(model, "param_groups")
    lr = _check_rate("lr", lr, tensor_ok=True)
    weight_decay = _check_rate("weight_decay", weight_decay)
    scale_lr_mult = _check_rate("scale_lr_mult", scale_lr_mult)
    decay, no_decay, scales = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.endswith("cross_modal_scale"):
            scales.append(p)
        elif p.dim() >= 2 and not any(key in name for key in _NO_DECAY_NAMES):
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [dict(params=decay, weight_decay=weight_decay, lr=lr),
              dict(params=no_decay, weight_decay=0.0, lr=lr),
              dict(params=scales, weight_decay=0.0, lr=lr * scale_lr_mult)]
    groups = [g for g in groups if g["params"]]
    for g in groups:
        g["base_lr"] = g["lr"]
    return groups


def reparameterize_aux_into_target_model(
    target_model: nn.Module,
    aux_model: AuxSource,
    layer_names: Sequence[str] = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"),
    main_body_name: Optional[str] = "blocks",
    *,
    is_aux_trainable: bool = True,
    scale_init: float = 0.0,
    per_channel_scale: bool = False,
) -> nn.Module:
    """Drop-in for the official M2PT ``multimodal_pathway.reparameterize_aux_into_target_model``.

    Same signature and defaults: ``layer_names`` of each block ``<main_body_name>.<i>`` get a pathway
    to the same block of ``aux_model``. Differences, all on purpose: the auxiliary weights are copied
    (the paper's layer shares the auxiliary model's Parameter, so training changes the auxiliary model),
    blocks are paired by name and a depth mismatch is an error (the paper's ``zip`` silently drops the
    extra blocks), ``aux_model`` may also be a state_dict or a checkpoint path, and the fused layer is
    used. ``is_aux_trainable`` is the keyword of the later M2PT code; ``main_body_name=None`` (or "")
    treats the models themselves as the block lists. Returns ``target_model``.
    """
    fn = "reparameterize_aux_into_target_model"
    _check_model(target_model, fn, "target_model")
    if main_body_name is not None and not isinstance(main_body_name, str):
        raise TypeError(f"{fn}: main_body_name must be the name of the target's block list (a str such as "
                        f"'blocks') or None (the models are the block lists), got {main_body_name!r} "
                        f"({type(main_body_name).__name__})")
    if isinstance(layer_names, str):
        layer_names = (layer_names,)
    given = layer_names
    layer_names = tuple(given) if isinstance(given, Iterable) else (given,)
    if any(not isinstance(n, str) for n in layer_names):
        raise TypeError(f"{fn}: layer_names must be a list of the layer names inside each block (str, e.g. "
                        f"('attn.qkv', 'attn.proj', 'mlp.fc1', 'mlp.fc2'), the default), got {given!r}")
    if not layer_names:
        raise ValueError(f"{fn}: layer_names is empty: name at least one layer inside each block, e.g. "
                         "('attn.qkv', 'attn.proj', 'mlp.fc1', 'mlp.fc2') (the default)")
    body = re.escape(main_body_name) + r"\." if main_body_name else ""
    pattern = body + r"\d+\.(?:" + "|".join(re.escape(n) for n in layer_names) + ")"
    if main_body_name:
        try:
            target_model.get_submodule(main_body_name)
        except AttributeError:
            raise ValueError(f"reparameterize_aux_into_target_model: the target model has no {main_body_name!r} "
                             f"(its top-level modules: {[n for n, _ in target_model.named_children()]}); "
                             "pass main_body_name=") from None
    names = [n for n, _ in target_model.named_modules()]
    absent = [ln for ln in layer_names if not any(re.fullmatch(body + r"\d+\." + re.escape(ln), n) for n in names)]
    if absent:
        where = f"{main_body_name}.<i>" if main_body_name else "<i>"
        raise ValueError(f"reparameterize_aux_into_target_model: no {where}.{absent[0]} in the target model; "
                         f"layer_names {list(absent)} match no block layer")
    config = PathwayConfig(target_modules=pattern, exclude_modules=(), aux_trainable=is_aux_trainable,
                           scale_init=scale_init, per_channel_scale=per_channel_scale)
    return add_pathways(target_model, aux_model, config)
