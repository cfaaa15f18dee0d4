"""pytest-benchmark suite: one ViT training step (forward, backward, AdamW) without pathways, with
the paper's layers and with ours. CPU: a 2-block width-32 ViT; GPU with M2PT_BENCH_FULL=1: ViT-B/16,
64 images, bf16 autocast."""
import contextlib
import os

import pytest
import torch
import torch.nn.functional as F

from m2pt_kernels import bench

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FULL = os.environ.get("M2PT_BENCH_FULL", "0") not in ("", "0") and DEVICE.type == "cuda"


@pytest.mark.parametrize("variant", ["plain", "paper", "ours"])
def test_vit_training_step(benchmark, variant):
    cfg = bench.VIT_CONFIGS["vit_b16" if FULL else "tiny"]
    batch = 64 if FULL else 2
    torch.manual_seed(0)
    model = bench.BenchViT(**cfg).to(DEVICE)
    if variant != "plain":
        bench.add_bench_pathways(model, variant, True, torch.Generator().manual_seed(1))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    img = torch.randn(batch, 3, cfg["img"], cfg["img"], device=DEVICE)
    label = torch.randint(0, cfg["classes"], (batch,), device=DEVICE)
    ctx = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if DEVICE.type == "cuda" else contextlib.nullcontext

    def step():
        opt.zero_grad(set_to_none=True)
        with ctx():
            out = model(img)
        loss = F.cross_entropy(out.float(), label)
        loss.backward()
        opt.step()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return loss

    benchmark.extra_info.update({"variant": variant, "tokens": batch * model.tokens})
    loss = benchmark.pedantic(step, rounds=10, warmup_rounds=2)
    assert torch.isfinite(loss)
