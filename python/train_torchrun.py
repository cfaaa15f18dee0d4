#!/usr/bin/env python
"""Train a small ViT with multimodal pathways on several processes (DDP or FSDP2), on synthetic data.

    torchrun --nproc_per_node=2 python/train_torchrun.py --strategy ddp
    torchrun --nproc_per_node=2 python/train_torchrun.py --strategy fsdp2 --amp bf16
    torchrun --nproc_per_node=8 python/train_torchrun.py --strategy fsdp2 --embed-dim 384 --depth 12 --heads 6

On GPUs it uses NCCL (one process per GPU); without GPUs it uses gloo on the CPU. Without torchrun
it runs as a single process. The target is an image ViT (``m2pt_kernels.models``, timm block
names); the auxiliary model is a point-cloud transformer of the same width and depth, randomly
initialized unless ``--aux-checkpoint`` gives its weights. Every ``attn.qkv``, ``attn.proj``,
``mlp.fc1`` and ``mlp.fc2`` gets a pathway.

A frozen auxiliary weight (the default) is a buffer: DDP does not all-reduce it and FSDP2 does not
shard it; it is broadcast once from rank 0 (``broadcast_aux_buffers``) and checked on every rank
(``check_aux_buffers_consistent``). ``--aux-trainable`` makes it a Parameter, reduced/sharded like W.

The last line on rank 0 is a JSON summary (``{"final_loss": ..., ...}``) for scripts and tests.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import inspect
import json
import math
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _example_common as common  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="M2PT pathways under DDP / FSDP2 with torchrun (synthetic data, small ViT).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--strategy", choices=("ddp", "fsdp2"), default="ddp",
                   help="DistributedDataParallel, or FSDP2 (torch.distributed.fsdp.fully_shard per block)")
    pos_int, pos_float = common.positive_int, common.positive_float
    p.add_argument("--steps", type=pos_int, default=20, help="optimizer steps")
    p.add_argument("--batch-size", type=pos_int, default=8, help="samples per process per micro-batch")
    p.add_argument("--grad-accum", type=pos_int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=pos_float, default=1e-3)
    p.add_argument("--scale-lr-mult", type=pos_float, default=10.0,
                   help="λ's learning rate = lr x this (pathways.param_groups; λ gets no weight decay)")
    p.add_argument("--weight-decay", type=common.nonnegative_float, default=0.05,
                   help="for weight matrices only (not biases, norms, position embeddings, tokens or λ)")
    p.add_argument("--img-size", type=pos_int, default=32)
    p.add_argument("--patch-size", type=pos_int, default=4)
    p.add_argument("--embed-dim", type=pos_int, default=64)
    p.add_argument("--depth", type=pos_int, default=4)
    p.add_argument("--heads", type=pos_int, default=4)
    p.add_argument("--num-classes", type=pos_int, default=10)
    p.add_argument("--aux-checkpoint", default=None,
                   help="state_dict of the auxiliary model (.pt/.pth/.safetensors); default: random weights")
    p.add_argument("--aux-trainable", action="store_true", help="train W' too (a Parameter, not a buffer)")
    p.add_argument("--per-channel-scale", action="store_true", help="λ of shape [out_features] instead of [1]")
    p.add_argument("--only-scales", action="store_true",
                   help="the paper's linear probing: train only λ and the head")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none",
                   help="torch.autocast dtype (fp16 uses torch.amp.GradScaler)")
    p.add_argument("--checkpointing", action="store_true",
                   help="activation checkpointing around each block (use_reentrant=False)")
    p.add_argument("--compile", action="store_true", help="torch.compile each block (before wrapping)")
    p.add_argument("--kernel-backend", default="auto", choices=("auto", "reference", "triton", "cuda"),
                   help="m2pt_kernels backend (auto: triton on CUDA, reference on the CPU)")
    p.add_argument("--save", default=None,
                   help="write the full (unsharded) model state_dict here at the end (rank 0); the suffix sets "
                        "the format: .safetensors, or .pt/.pth/.bin/.ckpt/.pth.tar (torch.save)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=pos_int, default=5, help="print every this many steps (rank 0)")
    return p.parse_args(argv)


def check_args(args) -> None:
    """What can be refused before any process group, model or step: a one-line error, the same on every rank."""
    if args.embed_dim % args.heads:
        sys.exit(f"error: --embed-dim {args.embed_dim} is not divisible by --heads {args.heads}")
    if args.img_size % args.patch_size:
        sys.exit(f"error: --img-size {args.img_size} is not a multiple of --patch-size {args.patch_size}")
    if args.kernel_backend != "auto":
        import m2pt_kernels
        ok, why = m2pt_kernels.backend_status()[args.kernel_backend]
        if not ok:
            sys.exit(f"error: --kernel-backend {args.kernel_backend} is not available here: {why} "
                     f"(available: {', '.join(m2pt_kernels.available_backends())}, or auto)")
    common.check_checkpoint_options({"--aux-checkpoint": args.aux_checkpoint}, "--save", args.save)


# ------------------------------------------------------------------------------------------ setup
def init_distributed():
    """torchrun's environment, or a one-process group when started without torchrun."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend, timeout=timedelta(minutes=5))
    return device, backend


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_model(args, device):
    from m2pt_kernels.models import vit_for_images, vit_for_point_clouds
    from m2pt_kernels.pathways import PathwayConfig, add_pathways, mark_only_scales_trainable

    torch.manual_seed(args.seed)  # same initial weights on every rank (DDP/FSDP2 also sync them)
    target = vit_for_images(img_size=args.img_size, patch_size=args.patch_size, embed_dim=args.embed_dim,
                            depth=args.depth, num_heads=args.heads, num_classes=args.num_classes)
    aux = vit_for_point_clouds(num_groups=16, group_size=16, embed_dim=args.embed_dim, depth=args.depth,
                               num_heads=args.heads, num_classes=40)
    config = PathwayConfig(aux_trainable=args.aux_trainable, per_channel_scale=args.per_channel_scale)
    try:
        add_pathways(target, args.aux_checkpoint or aux, config)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as exc:  # e.g. a checkpoint of another shape
        sys.exit(f"error: add_pathways: {common.one_line(exc)}")
    if args.only_scales:
        mark_only_scales_trainable(target)
    return target.to(device)


def make_optimizer(model, args) -> torch.optim.Optimizer:
    """AdamW on ``pathways.param_groups``: λ gets no weight decay (decay would pull every pathway back
    to 0) and ``lr x --scale-lr-mult``; biases, norms, position embeddings and the class token get no
    decay; weight matrices decay. Only trainable parameters (``--only-scales``: λ and the head)."""
    from m2pt_kernels.pathways import param_groups
    return torch.optim.AdamW(param_groups(model, args.lr, weight_decay=args.weight_decay,
                                          scale_lr_mult=args.scale_lr_mult))


def _checkpointed(block: nn.Module) -> None:
    """Recompute ``block`` in backward; the module tree (and state_dict names) stay unchanged."""
    from torch.utils.checkpoint import checkpoint
    inner = block.forward
    block.forward = lambda x: checkpoint(inner, x, use_reentrant=False)


def ddp_no_forward_buffer_sync() -> dict:
    """Do not re-send buffers (the frozen W') before every forward (torch 2.14 renamed the option)."""
    params = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


def wrap(model, args, device):
    from m2pt_kernels.distributed import (broadcast_aux_buffers, check_aux_buffers_consistent,
                                          disable_merged_weight_cache)
    for block in model.blocks:
        if args.checkpointing:
            _checkpointed(block)
        if args.compile:
            block.compile()
    broadcast_aux_buffers(model)  # frozen W': one broadcast from rank 0, never again
    check_aux_buffers_consistent(model)
    if args.strategy == "ddp":
        kwargs = ddp_no_forward_buffer_sync()
        if device.type == "cuda":
            kwargs["device_ids"] = [device.index]
        return nn.parallel.DistributedDataParallel(model, **kwargs), model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    disable_merged_weight_cache(model)  # no full merged W + λ·W' per layer kept next to the shards
    return model, model


def synthetic_batch(step: int, micro: int, args, rank: int, device):
    """Images whose class sets the mean of a few channels/patches: learnable, different on each rank."""
    g = torch.Generator().manual_seed(args.seed * 1_000_003 + step * 1009 + micro * 101 + rank)
    y = torch.randint(0, args.num_classes, (args.batch_size,), generator=g)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=g)
    x += (y.view(-1, 1, 1, 1).float() / max(args.num_classes - 1, 1) - 0.5)
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def full_state_dict(model) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


# ------------------------------------------------------------------------------------------ main
def main(argv=None) -> dict:
    args = parse_args(argv)
    check_args(args)
    device, backend = init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    import m2pt_kernels
    model = build_model(args, device)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_aux_buf = sum(b.numel() for n, b in model.named_buffers() if n.endswith("aux_weight"))
    wrapped, inner = wrap(model, args, device)
    opt = make_optimizer(inner, args)
    amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype is torch.float16)
    if rank == 0:
        print(f"[m2pt] {args.strategy} on {world} process(es), {backend}, device {device.type}; kernel backend "
              f"{args.kernel_backend}; trainable params {n_train:,}; frozen aux-weight buffers {n_aux_buf:,} "
              f"elements", flush=True)

    losses = []
    t0 = time.perf_counter()
    with m2pt_kernels.use_backend(args.kernel_backend):
        for step in range(args.steps):
            step_loss = torch.zeros((), device=device)
            for micro in range(args.grad_accum):
                last = micro == args.grad_accum - 1
                x, y = synthetic_batch(step, micro, args, rank, device)
                if args.strategy == "ddp":
                    sync = contextlib.nullcontext() if last else wrapped.no_sync()
                else:
                    wrapped.set_requires_gradient_sync(last)
                    sync = contextlib.nullcontext()
                with sync:
                    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                        loss = F.cross_entropy(wrapped(x), y) / args.grad_accum
                    scaler.scale(loss).backward()
                step_loss += loss.detach()
            scaler.unscale_(opt)
            if args.strategy == "ddp":
                grad_norm = torch.nn.utils.clip_grad_norm_(inner.parameters(), 1.0)
            else:  # DTensor gradients: the norm is reduced across shards
                grad_norm = torch.nn.utils.clip_grad_norm_([p for p in inner.parameters() if p.grad is not None], 1.0)
                grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            dist.all_reduce(step_loss)
            losses.append(float(step_loss) / world)
            if step % args.log_every == 0 or step == args.steps - 1:
                # full_tensor() of a sharded λ is a collective: every rank computes, rank 0 prints
                scales = [p for n, p in inner.named_parameters() if n.endswith("cross_modal_scale")]
                lam = [float((s.full_tensor() if hasattr(s, "full_tensor") else s).detach().abs().mean())
                       for s in scales]
            if rank == 0 and (step % args.log_every == 0 or step == args.steps - 1):
                print(f"[m2pt] step {step:4d}  loss {losses[-1]:.4f}  grad-norm {float(grad_norm):.3f}  "
                      f"mean |λ| {sum(lam) / max(len(lam), 1):.2e}", flush=True)
    elapsed = time.perf_counter() - t0

    from m2pt_kernels.distributed import check_aux_buffers_consistent
    from m2pt_kernels.pathways import save_checkpoint
    check_aux_buffers_consistent(inner)  # the frozen W' is still identical everywhere
    state = full_state_dict(inner) if args.save else None  # collective under FSDP2: every rank calls it
    summary = {"final_loss": losses[-1], "first_loss": losses[0], "steps": args.steps, "world_size": world,
               "strategy": args.strategy, "backend": backend, "amp": args.amp, "seconds": round(elapsed, 3),
               "finite": all(math.isfinite(v) for v in losses)}
    save_error = None
    if rank == 0:
        if state is not None:
            try:  # a state_dict of tensors: the format follows the suffix, as load_checkpoint reads it
                save_checkpoint(state, args.save)
                summary["saved"] = args.save
            except Exception as exc:  # OSError, torch's RuntimeError, safetensors' SafetensorError, ...
                save_error = f"error: --save: cannot write {args.save!r}: {common.one_line(exc, 400)}"
        if save_error is None:
            print(json.dumps(summary), flush=True)
    # The checkpoint wrappers make each block a reference cycle, so without this the DDP reducer (which
    # holds the gloo process group and its worker threads) is freed only at interpreter shutdown, where
    # the gloo threads can be destroyed unjoined ("terminate called without an active exception",
    # SIGABRT, seen in about 1 run in 10). Free it, and the process group, while Python is fully alive.
    del wrapped, inner, model, opt, scaler, state
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
    if save_error:
        sys.exit(save_error)
    return summary


if __name__ == "__main__":
    main()
