"""pytest-benchmark suite for ``m2pt::cross_modal_linear``: every provider, one shape at a time.

CPU (default): small ViT-Ti-like shapes in fp32, seconds in all. ``M2PT_BENCH_FULL=1`` on a GPU:
the four ViT-B/16 linears in bf16 at M = 197 … 50,432. Compare providers with
``--benchmark-group-by=param:case``. The timed function synchronizes the GPU, so wall-clock times
are device times plus launch overhead.
"""
import os

import pytest
import torch

from m2pt_kernels import bench

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FULL = os.environ.get("M2PT_BENCH_FULL", "0") not in ("", "0")


def _cases():
    if FULL and DEVICE.type == "cuda":
        return [c for c in bench.full_grid() if c.priority == 0]
    out = []
    for layer in ("qkv", "fc2"):
        K, N = bench.layer_shape(layer, bench.MODELS["vit_ti16"])
        out.append(bench.Case(layer, "vit_ti16", 197, K, N, "fp32", True, "fwd+bwd"))
    K, N = bench.layer_shape("fc1", bench.MODELS["vit_ti16"])
    out.append(bench.Case("fc1", "vit_ti16", 197, K, N, "fp32", True, "probe"))
    return out


CASES = _cases()
STATUS = bench.provider_status(DEVICE)
PROVIDERS = [p for p in bench.PROVIDERS if p != "paper_compiled" or FULL]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", CASES, ids=[c.label().replace(" ", "_") for c in CASES])
def test_cross_modal_linear(benchmark, case, provider):
    if not STATUS[provider]["ok"]:
        pytest.skip(f"{provider}: {STATUS[provider]['reason']}")
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    sets = [bench._random_set(case, DEVICE, gen) for _ in range(bench.n_input_sets(case, DEVICE))]
    insts = [bench.make_instance(provider, case, d, None) for d in sets]
    state = {"i": 0}

    def step():
        inst = insts[state["i"] % len(insts)]
        state["i"] += 1
        inst.clear_grads()
        inst.fn().backward(inst.dy)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark.extra_info.update({"provider": provider, "flops": bench.case_flops(case), "case": case.label()})
    with insts[0].backend_ctx():
        benchmark.pedantic(step, rounds=20 if DEVICE.type == "cpu" else 100, warmup_rounds=3)
    assert insts[0].x.grad is None or torch.isfinite(insts[0].x.grad).all()
