"""Multi-process harness for tests/test_distributed.py: the launcher, the worker and the shared setup.

The launcher starts ``world_size`` plain subprocesses of this file (one per rank). The parent owns
a ``TCPStore`` bound to port 0 (the OS picks a free port, so there is no race for it) and the
workers join it: no fixed ports, no environment left behind. Every launch is time-bounded; on a
timeout or a failing rank all ranks are killed and the error carries each rank's output tail.

The worker runs every scenario asked for in one process group (process start-up and gloo set-up
dominate on a small CPU machine) and saves, per scenario and rank, the step-0 gradients, the
parameters and buffers after training, and the no-grad outputs before and after an optimizer step.
The parent test runs the same steps in one process on the whole global batch and compares.
"""
from __future__ import annotations

import argparse
import gc
import inspect
import os
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

GLOBAL_BATCH = 8
STEPS = 2
LR = 0.05
NUM_CLASSES = 5
IMG = 16

# name -> (wrapper, aux_trainable, per_channel_scale, how frozen aux buffers are made consistent)
#   "ddp-init":      DDP's own broadcast at construction (default DDP arguments)
#   "helper":        m2pt_kernels.distributed.broadcast_aux_buffers, then DDP without per-forward
#                    buffer sync / FSDP2 (which never syncs buffers)
#   "none":          nothing to sync (the auxiliary weights are parameters)
# "_probe": the paper's linear probing (mark_only_scales_trainable: only λ and the head train; W is a
# frozen Parameter, which FSDP2 still shards and DDP leaves out of the reduction).
# "_cached": trained in eval mode with the merged-weight cache on, so the no-grad forward after the
# optimizer step checks that the cache was invalidated (under FSDP2 the unsharded parameters are
# refilled without a version-counter bump; the layer's global optimizer-step counter covers that).
SCENARIOS = {
    "ddp_frozen_scalar": ("ddp", False, False, "ddp-init"),
    "ddp_frozen_channel_cached": ("ddp", False, True, "helper"),
    "ddp_trainable_scalar": ("ddp", True, False, "none"),
    "fsdp2_frozen_scalar": ("fsdp2", False, False, "helper"),
    "fsdp2_frozen_channel_cached": ("fsdp2", False, True, "helper"),
    "fsdp2_trainable_channel": ("fsdp2", True, True, "none"),
    "ddp_frozen_channel_probe": ("ddp", False, True, "helper"),
    "fsdp2_frozen_scalar_probe": ("fsdp2", False, False, "helper"),
    "fsdp2_frozen_channel_mp": ("fsdp2", False, True, "helper"),
}
# "_mp": FSDP2's MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32): the forward sees W, b, λ
# (and a trainable W') in bf16 but a frozen W' (a buffer, never cast by FSDP2) in fp32. Compared with
# the fp32 single process: the whole ViT (norms, attention) computes in bf16, measured up to 2.6e-2
# relative error on a gradient; W' left out of the forward would be far beyond the tolerance. (Not a
# single λ: its dλ sums N·K terms that cancel, and from bf16 activations it is 10% off the fp32 one.)
MIXED_PRECISION_TOL = 5e-2


# ----------------------------------------------------------------------------- shared set-up
def build_model(aux_trainable: bool, per_channel: bool, device="cpu", depth: int = 2, seed: int = 1234,
                only_scales: bool = False) -> nn.Module:
    """A tiny image ViT (width 32, depth 2) with pathways to another ViT; same on every rank."""
    from m2pt_kernels.models import vit_for_images
    from m2pt_kernels.pathways import PathwayConfig, add_pathways, mark_only_scales_trainable

    kw = dict(img_size=IMG, patch_size=4, embed_dim=32, depth=depth, num_heads=2, mlp_ratio=2.0)
    torch.manual_seed(seed)
    target = vit_for_images(num_classes=NUM_CLASSES, **kw)
    aux = vit_for_images(num_classes=3, **kw)  # another model; only its block weights are used
    with torch.no_grad():
        for p in aux.parameters():
            p.normal_(0.0, 0.05)
    add_pathways(target, aux, PathwayConfig(aux_trainable=aux_trainable, per_channel_scale=per_channel,
                                            scale_init=0.5))
    with torch.no_grad():  # distinct λ per layer / channel so every dλ is different
        for name, p in target.named_parameters():
            if name.endswith("cross_modal_scale"):
                p.uniform_(0.2, 0.8)
    if only_scales:
        mark_only_scales_trainable(target)
    return target.to(device)


def global_batch(step: int, device="cpu"):
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(GLOBAL_BATCH, 3, IMG, IMG, generator=g)
    y = torch.randint(0, NUM_CLASSES, (GLOBAL_BATCH,), generator=g)
    return x.to(device), y.to(device)


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR, momentum=0.9)


def _full(t):
    t = t.full_tensor() if hasattr(t, "full_tensor") else t
    return t.detach().cpu().clone()


def run_steps(model, opt, rank: int, world: int, device="cpu", call=None, cached=False) -> dict:
    """STEPS optimizer steps on this rank's slice of each global batch; what the tests compare.

    ``call``: the wrapped module to run (DDP); names and tensors are read from ``model``.
    ``cached``: run in eval mode, where the no-grad forward uses (and must invalidate) the layers'
    merged-weight cache.
    """
    call = model if call is None else call
    if cached:  # eval mode (the ViT has no dropout: same training): the no-grad path caches W + λ·W'
        call.eval()
    probe, _ = global_batch(99, device)
    record = {}
    with torch.no_grad():  # the no-grad path (merged-weight cache) before any step ...
        record["nograd_before"] = call(probe).cpu()
    record["cache_filled"] = any(getattr(m, "_cache", None) is not None for m in model.modules())
    for step in range(STEPS):
        x, y = global_batch(step, device)
        xs, ys = x.chunk(world)[rank], y.chunk(world)[rank]
        F.cross_entropy(call(xs), ys).backward()
        if step == 0:
            record["grads"] = {n: _full(p.grad) for n, p in model.named_parameters() if p.grad is not None}
        opt.step()
        opt.zero_grad(set_to_none=True)
    with torch.no_grad():  # ... and after: must see the new weights, not a stale merged weight
        record["nograd_after"] = call(probe).cpu()
    record["params"] = {n: _full(p) for n, p in model.named_parameters()}
    record["buffers"] = {n: _full(b) for n, b in model.named_buffers()}
    return record


def single_process_reference(scenario: str, device="cpu") -> dict:
    _, aux_trainable, per_channel, _ = SCENARIOS[scenario]
    model = build_model(aux_trainable, per_channel, device, only_scales=scenario.endswith("_probe"))
    return run_steps(model, make_optimizer(model), 0, 1, device, cached=scenario.endswith("_cached"))


def ddp_no_forward_buffer_sync() -> dict:
    """DDP keyword that stops re-broadcasting buffers before every forward (torch 2.14 renamed it)."""
    params = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


# ----------------------------------------------------------------------------- the worker
def _worker_scenario(name: str, rank: int, world: int, device: str) -> dict:
    import torch.distributed as dist
    from m2pt_kernels.distributed import (aux_buffers, broadcast_aux_buffers, check_aux_buffers_consistent,
                                          disable_merged_weight_cache)
    wrapper, aux_trainable, per_channel, sync = SCENARIOS[name]
    model = build_model(aux_trainable, per_channel, device, only_scales=name.endswith("_probe"))
    info = {"n_aux_buffers": len(aux_buffers(model))}
    aux_ids = {id(b) for _, b in aux_buffers(model)}
    if rank != 0:  # a rank that built different auxiliary weights: syncing must repair it
        with torch.no_grad():
            for _, b in aux_buffers(model):
                b.add_(1.0)
    if aux_buffers(model):
        try:
            check_aux_buffers_consistent(model)
            info["checker_caught_mismatch"] = False
        except RuntimeError as exc:
            info["checker_caught_mismatch"] = "differ" in str(exc)
    if sync == "helper":
        info["broadcast_returns_model"] = broadcast_aux_buffers(model) is model
    if wrapper == "ddp":
        kwargs = {} if sync == "ddp-init" else ddp_no_forward_buffer_sync()
        if device != "cpu":
            kwargs["device_ids"] = [torch.device(device).index]
        wrapped = nn.parallel.DistributedDataParallel(model, **kwargs)
        info["aux_in_ddp_params"] = any(id(p) in aux_ids for p in wrapped.parameters())
        call = wrapped
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh(torch.device(device).type, (world,))
        kwargs = {}
        if name.endswith("_mp"):
            from torch.distributed.fsdp import MixedPrecisionPolicy
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for block in model.blocks:
            fully_shard(block, mesh=mesh, **kwargs)
        fully_shard(model, mesh=mesh, **kwargs)
        if not name.endswith("_cached"):
            disable_merged_weight_cache(model)
        info["aux_in_fsdp_params"] = any(id(p) in aux_ids for p in model.parameters())
        info["aux_buffer_types"] = sorted({type(b).__name__ for _, b in aux_buffers(model)})
        info["aux_buffer_shapes_full"] = all(tuple(b.shape) == tuple(layer_w.shape) for (_, b), layer_w in zip(
            aux_buffers(model), [m.weight for m in model.modules() if hasattr(m, "cross_modal_scale")]))
        info["sharded_param_types"] = sorted({type(p).__name__ for p in model.parameters()})
        call = model
    check_aux_buffers_consistent(model)  # raises on every rank if the sync did not work
    opt = make_optimizer(model)
    record = run_steps(model, opt, rank, world, device, call=call, cached=name.endswith("_cached"))
    record["info"] = info
    dist.barrier()
    return record


def worker_main(argv=None) -> None:
    import torch.distributed as dist
    p = argparse.ArgumentParser()
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world-size", type=int, required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--backend", default="gloo")
    p.add_argument("--scenarios", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--collective-timeout", type=float, default=60.0)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    device = "cpu"
    if a.backend == "nccl":
        torch.cuda.set_device(a.rank)
        device = f"cuda:{a.rank}"
    store = dist.TCPStore("127.0.0.1", a.port, is_master=False, timeout=timedelta(seconds=a.collective_timeout))
    dist.init_process_group(a.backend, store=store, rank=a.rank, world_size=a.world_size,
                            timeout=timedelta(seconds=a.collective_timeout))
    try:
        for name in a.scenarios.split(","):
            record = _worker_scenario(name, a.rank, a.world_size, device)
            torch.save(record, Path(a.out) / f"{name}.rank{a.rank}.pt")
    finally:
        gc.collect()  # DDP reducers caught in reference cycles release the gloo group before it is destroyed
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- the launcher
def launch(scenarios, world_size: int = 2, backend: str = "gloo", timeout: float = 150.0,
           out_dir=None) -> dict:
    """Run the scenarios on ``world_size`` ranks; return ``{scenario: [record of rank 0, rank 1, ...]}``."""
    import torch.distributed as dist
    out_dir = Path(out_dir or tempfile.mkdtemp(prefix="m2pt_dist_"))
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=timeout))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    procs, logs = [], []
    try:
        for rank in range(world_size):
            log = open(out_dir / f"rank{rank}.log", "w+")
            logs.append(log)
            cmd = [sys.executable, "-u", __file__, "--rank", str(rank), "--world-size", str(world_size),
                   "--port", str(store.port), "--backend", backend, "--scenarios", ",".join(scenarios),
                   "--out", str(out_dir)]
            procs.append(subprocess.Popen(cmd, env=env, cwd=str(REPO), stdout=log, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + timeout
        failed = None
        while any(p.poll() is None for p in procs):
            bad = [r for r, p in enumerate(procs) if p.poll() not in (None, 0)]
            if bad:
                failed = f"rank {bad[0]} exited with code {procs[bad[0]].returncode}"
                break
            if time.monotonic() > deadline:
                failed = f"timed out after {timeout:.0f} s"
                break
            time.sleep(0.2)
        if failed is None:
            bad = [r for r, p in enumerate(procs) if p.returncode != 0]
            if bad:
                failed = f"rank {bad[0]} exited with code {procs[bad[0]].returncode}"
        if failed is not None:
            raise RuntimeError(f"distributed run ({backend}, {world_size} ranks, {scenarios}) failed: {failed}\n"
                               + "\n".join(_tail(log, r) for r, log in enumerate(logs)))
    finally:
        for p in procs:  # clean teardown: nothing of ours outlives the launch
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
        for log in logs:
            log.close()
        del store
    return {name: [torch.load(out_dir / f"{name}.rank{r}.pt", weights_only=False) for r in range(world_size)]
            for name in scenarios}


def _tail(log, rank: int, chars: int = 3000) -> str:
    log.flush()
    log.seek(0)
    text = log.read()
    return f"--- rank {rank} output (last {chars} chars) ---\n{text[-chars:]}"


if __name__ == "__main__":
    worker_main()
