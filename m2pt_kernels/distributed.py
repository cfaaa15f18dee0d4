"""Helpers for training models with pathways under DDP and FSDP2 (``torch.distributed``).

A *frozen* auxiliary weight W' is a persistent buffer of ``FusedCrossModalLinear``, not a
Parameter: DDP never all-reduces it and FSDP2 (``fully_shard``) never shards it; every rank holds
the full W'. So it must be the same on every rank:

- DDP broadcasts all buffers from rank 0 when it is constructed, and again before *every* forward
  unless ``broadcast_buffers=False`` (torch >= 2.14: ``forward_sync_buffers=False``). Re-sending W'
  (the size of the model) each step is wasted bandwidth, since W' never changes. The older
  ``broadcast_buffers=False`` (deprecated in torch 2.14, still honoured) also skips the broadcast at
  construction, so with it call :func:`broadcast_aux_buffers` once before wrapping.
- FSDP2 never touches buffers: ranks that built W' differently stay different. Call
  :func:`broadcast_aux_buffers` once after ``fully_shard`` (or load the same checkpoint on every
  rank); :func:`check_aux_buffers_consistent` verifies it.

A *trainable* W' is a Parameter like W: all-reduced by DDP, sharded by FSDP2.

Under FSDP2 also call :func:`disable_merged_weight_cache`: in ``eval()`` the no-grad fast path of
``FusedCrossModalLinear`` caches the full merged ``W + λ·W'`` of every layer, a whole unsharded copy
of the model per rank that defeats sharding. (The cache stays correct under FSDP2 although FSDP2
refills its unsharded parameters without bumping their autograd version counters: the layer also
keys the cache on a process-wide optimizer-step counter.)
"""
from __future__ import annotations

import numbers
from typing import Iterator, List, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from .layers import FusedCrossModalLinear, is_pathway_layer

__all__ = ["aux_buffers", "broadcast_aux_buffers", "check_aux_buffers_consistent",
           "disable_merged_weight_cache"]


def _pathway_layers(model: nn.Module) -> Iterator[Tuple[str, FusedCrossModalLinear]]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    for name, module in model.named_modules():
        if isinstance(module, FusedCrossModalLinear):
            yield name, module


def _require_pathways(model: nn.Module, where: str) -> List[Tuple[str, FusedCrossModalLinear]]:
    """The pathway layers of ``model``; a ValueError when there are none (called before
    ``add_pathways``, or after ``merge_pathways``), where the helper would silently do nothing."""
    layers = list(_pathway_layers(model))
    if not layers:
        paper = [n for n, m in model.named_modules() if is_pathway_layer(m)]
        if paper:
            raise ValueError(
                f"{where}: the pathway layers of this model ({type(model).__name__}, e.g. {paper[0] or '(root)'!r}) "
                "are the paper's CrossModalReparamLinear, which keep W' as a Parameter (DDP / FSDP synchronize it) "
                "and cache no merged weight: there is nothing to do. This helper is for FusedCrossModalLinear layers")
        raise ValueError(
            f"{where}: the model ({type(model).__name__}) has no pathway layers (FusedCrossModalLinear), so "
            "there is nothing to do; call it after m2pt_kernels.add_pathways(model, aux), which creates them")
    return layers


def _check_src(src, group, where: str) -> int:
    """``src`` as an int if it is a (global) rank of ``group``, else an error naming it and the ranks
    (the collective itself would only say 'invalid root rank')."""
    import torch.distributed as dist
    if not isinstance(src, numbers.Integral) or isinstance(src, bool):
        raise TypeError(f"{where}: src must be an int, the global rank to copy from (default 0); "
                        f"got {type(src).__name__} {src!r}")
    if group is None:
        world = dist.get_world_size()
        ranks, shown = range(world), f"the default process group (world size {world}: ranks 0..{world - 1})"
    elif isinstance(group, dist.ProcessGroup):
        ranks = dist.get_process_group_ranks(group)
        shown = f"the given group (size {len(ranks)}: global ranks {ranks})"
    else:  # not a group of this rank (GroupMember.NON_GROUP_MEMBER) or not a group: torch's own handling
        return int(src)
    if src not in ranks:
        raise ValueError(f"{where}: src={src} is not a rank of {shown}; pass one of them (default 0)")
    return int(src)


def aux_buffers(model: nn.Module) -> List[Tuple[str, Tensor]]:
    """``(qualified name, tensor)`` of every frozen auxiliary weight (a buffer) in ``model``."""
    return [(f"{name}.aux_weight" if name else "aux_weight", layer.aux_weight)
            for name, layer in _pathway_layers(model) if not layer.aux_trainable]


def _default_group_check(where: str) -> None:
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"{where}: torch.distributed is not initialized; call "
                           "torch.distributed.init_process_group first (torchrun sets up the environment)")


def _collective_device(model: nn.Module, group) -> torch.device:
    """Where a small bookkeeping tensor must live for this group's backend (NCCL: CUDA only)."""
    import torch.distributed as dist
    for t in list(model.parameters()) + list(model.buffers()):
        if t.device.type != "meta":
            return t.device
    if "nccl" in str(dist.get_backend(group)).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_aux_buffers(model: nn.Module, src: int = 0, group=None) -> nn.Module:
    """Copy every frozen auxiliary weight of ``model`` from rank ``src`` to all ranks, in place.

    Works on a plain model, a DDP-wrapped one and one after ``fully_shard`` (buffers stay plain
    tensors there). Collective: every rank must call it. Returns ``model``. A model without pathway
    layers (before ``add_pathways``) is a ValueError: there would be nothing to copy.
    """
    layers = _require_pathways(model, "broadcast_aux_buffers")
    _default_group_check("broadcast_aux_buffers")
    src = _check_src(src, group, "broadcast_aux_buffers")
    import torch.distributed as dist
    for _, buf in aux_buffers(model):
        with torch.no_grad():
            dist.broadcast(buf, src=src, group=group)
    for _, layer in layers:
        layer.clear_merged_cache()  # drop anything merged from the old W'
    return model


def check_aux_buffers_consistent(model: nn.Module, src: int = 0, group=None) -> None:
    """Raise a RuntimeError on every rank if any frozen auxiliary weight differs from rank ``src``'s.

    The error names the layers and the ranks that differ. Collective: every rank must call it; it
    sends every buffer once, so use it at setup time, not every step. A model without pathway layers
    (before ``add_pathways``) is a ValueError: there would be nothing to check.
    """
    _require_pathways(model, "check_aux_buffers_consistent")
    _default_group_check("check_aux_buffers_consistent")
    src = _check_src(src, group, "check_aux_buffers_consistent")
    import torch.distributed as dist
    buffers = aux_buffers(model)
    mismatched = []
    for name, buf in buffers:
        ref = buf.detach().clone()
        dist.broadcast(ref, src=src, group=group)
        if not torch.equal(ref, buf):
            mismatched.append(name)
    device = _collective_device(model, group)
    flags = torch.zeros(dist.get_world_size(group), dtype=torch.int32, device=device)
    flags[dist.get_rank(group)] = len(mismatched)
    dist.all_reduce(flags, group=group)
    bad_ranks = [r for r, n in enumerate(flags.tolist()) if n]
    if bad_ranks:
        mine = f"; on this rank: {mismatched[:5]}{' ...' if len(mismatched) > 5 else ''}" if mismatched else ""
        raise RuntimeError(
            f"frozen auxiliary weights differ from rank {src}'s on rank(s) {bad_ranks}{mine}. Load the same "
            "auxiliary checkpoint on every rank, or call m2pt_kernels.distributed.broadcast_aux_buffers(model)")


def disable_merged_weight_cache(model: nn.Module) -> nn.Module:
    """Turn off the merged-weight cache of every pathway layer (for FSDP2; see the module docstring).

    The no-grad path still runs one GEMM on ``W + λ·W'``, computed afresh each call. Returns ``model``.
    Call it after ``add_pathways``: on a model without pathway layers it is a ValueError, since the
    layers it would set up do not exist yet.
    """
    for _, layer in _require_pathways(model, "disable_merged_weight_cache"):
        layer.cache_merged_weight = False
        layer.clear_merged_cache()
    return model
