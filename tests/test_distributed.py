"""DDP and FSDP2 (``fully_shard``) with pathways: 2 processes must match 1 process on the same global batch.

CPU: gloo, 2 ranks, launched by tests/dist_worker.py (one launch runs every scenario; ~25 s here).
GPU (marked ``gpu``): NCCL, one rank per device (2 when there are 2, else 1), same scenarios.

What is compared, per scenario (DDP / FSDP2 × frozen / trainable W' × λ [1] / [N]; FSDP2 with a bf16
MixedPrecisionPolicy too, within bf16's tolerance):
- the gradients of W, b, λ (and W' when trainable) after the first backward, against one process
  on the whole global batch (the ranks see halves; mean-loss gradients are averaged by DDP/FSDP2);
- every parameter after two SGD-momentum steps, and every buffer (W' frozen: unchanged, equal on
  all ranks even though rank 1 built a different W' on purpose);
- the no-grad forward before and after a step (the merged-weight path must see the new weights);
- that a frozen W' is a buffer: not among DDP's / FSDP2's parameters, a plain full-size tensor
  after ``fully_shard`` (not a sharded DTensor), and that the consistency checker catches ranks
  that disagree.
"""
from __future__ import annotations

import pytest
import torch

import dist_worker as w
from helpers import rel_err

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")

SCENARIOS = list(w.SCENARIOS)


def _gloo_ok() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_gloo_available()


@pytest.fixture(scope="module")
def gloo_results(tmp_path_factory):
    if not _gloo_ok():
        pytest.skip("gloo backend not available")
    return w.launch(SCENARIOS, world_size=2, backend="gloo", timeout=180,
                    out_dir=tmp_path_factory.mktemp("gloo"))


@pytest.fixture(scope="module")
def references():
    return {name: w.single_process_reference(name) for name in SCENARIOS}


def _compare(name, records, ref, tol, device="cpu"):
    wrapper, aux_trainable, per_channel, sync = w.SCENARIOS[name]
    for rank, rec in enumerate(records):
        where = f"{name} rank {rank}"
        # gradients of the first step: every trainable tensor, including λ and (trainable) W'
        assert set(rec["grads"]) == set(ref["grads"]), where
        assert any(k.endswith("cross_modal_scale") for k in rec["grads"]), where
        assert any(k.endswith("aux_weight") for k in rec["grads"]) == aux_trainable, where
        if name.endswith("_probe"):  # linear probing: only λ and the head have gradients
            assert all(k.endswith("cross_modal_scale") or k.startswith("head.") for k in rec["grads"]), where
        for key, g in ref["grads"].items():
            err = rel_err(rec["grads"][key], g)
            assert err < tol, f"{where}: grad of {key} differs from one process: rel err {err:.2e}"
        for key, p in ref["params"].items():
            err = rel_err(rec["params"][key], p)
            assert err < tol, f"{where}: {key} after {w.STEPS} steps: rel err {err:.2e}"
        for key, b in ref["buffers"].items():  # frozen W' unchanged, and rank 1's perturbation repaired
            assert torch.equal(rec["buffers"][key], b), f"{where}: buffer {key} differs from one process"
        for when in ("nograd_before", "nograd_after"):
            err = rel_err(rec[when], ref[when])
            assert err < tol, f"{where}: {when} output rel err {err:.2e}"
        assert rel_err(rec["nograd_after"], rec["nograd_before"]) > 1e-3, f"{where}: the step changed nothing"
        # the "_cached" scenarios really went through the layers' merged-weight cache, the others not
        # (train mode and disable_merged_weight_cache leave it empty)
        assert rec["cache_filled"] == name.endswith("_cached"), f"{where}: merged-weight cache use not as planned"
        info = rec["info"]
        if not aux_trainable:
            assert info["n_aux_buffers"] == 8, where  # 2 blocks × qkv, proj, fc1, fc2
            if len(records) > 1:  # rank 1 built a different W' on purpose
                assert info["checker_caught_mismatch"], f"{where}: check_aux_buffers_consistent missed a mismatch"
            assert not info.get("aux_in_ddp_params", False) and not info.get("aux_in_fsdp_params", False), where
        if sync == "helper":
            assert info["broadcast_returns_model"], where
        if wrapper == "fsdp2":
            assert info["sharded_param_types"] == ["DTensor"], where
            if not aux_trainable:
                assert info["aux_buffer_types"] == ["Tensor"] and info["aux_buffer_shapes_full"], where
    # all ranks end with the same model
    for key in records[0]["params"]:
        for rec in records[1:]:
            assert torch.equal(rec["params"][key], records[0]["params"][key]), f"{name}: {key} differs across ranks"


@pytest.mark.parametrize("name", SCENARIOS)
def test_two_gloo_ranks_match_one_process(name, gloo_results, references):
    _compare(name, gloo_results[name], references[name], tol=w.MIXED_PRECISION_TOL if name.endswith("_mp") else 1e-5)


def test_reference_is_not_trivial(references):
    """The single-process oracle itself moves λ, W and (trainable) W' — the comparison can fail."""
    ref = references["ddp_trainable_scalar"]
    for key, g in ref["grads"].items():
        assert g.abs().sum() > 0, f"zero gradient for {key}"


def test_distributed_helpers_need_a_process_group():
    from m2pt_kernels.distributed import broadcast_aux_buffers
    model = w.build_model(False, False)
    if torch.distributed.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        broadcast_aux_buffers(model)


def test_disable_merged_weight_cache_returns_model_and_turns_cache_off():
    from m2pt_kernels.distributed import disable_merged_weight_cache
    from m2pt_kernels.layers import FusedCrossModalLinear
    model = w.build_model(False, True)
    assert disable_merged_weight_cache(model) is model
    layers = [m for m in model.modules() if isinstance(m, FusedCrossModalLinear)]
    assert layers and all(m.cache_merged_weight is False for m in layers)
    x, _ = w.global_batch(0)
    with torch.no_grad():
        y = model(x)
    assert all(m._cache is None for m in layers)
    model.zero_grad()
    ref = model(x)  # the fused training path
    assert rel_err(y, ref) < 1e-5


def test_distributed_helpers_refuse_a_model_without_pathways():
    """Called before add_pathways they used to do nothing: the cache stayed on once pathways came."""
    from m2pt_kernels.distributed import (broadcast_aux_buffers, check_aux_buffers_consistent,
                                          disable_merged_weight_cache)
    from m2pt_kernels.models import vit_for_images
    plain = vit_for_images(img_size=8, patch_size=4, in_chans=1, embed_dim=8, depth=1, num_heads=2)
    for helper in (disable_merged_weight_cache, broadcast_aux_buffers, check_aux_buffers_consistent):
        with pytest.raises(ValueError, match=rf"{helper.__name__}: the model \(VisionTransformer\) has no pathway "
                                             r"layers .*call it after m2pt_kernels.add_pathways"):
            helper(plain)
    from m2pt_kernels.baselines import PaperCrossModalReparamLinear
    for paper, name in ((torch.nn.Sequential(PaperCrossModalReparamLinear(4, 3)), "'0'"),
                        (PaperCrossModalReparamLinear(4, 3), r"'\(root\)'")):
        for helper in (disable_merged_weight_cache, broadcast_aux_buffers, check_aux_buffers_consistent):
            with pytest.raises(ValueError, match=rf"{helper.__name__}: the pathway layers of this model .*{name}.* "
                                                 r"are the paper's CrossModalReparamLinear.*nothing to do"):
                helper(paper)


@pytest.fixture
def one_process_group(tmp_path):
    """A gloo group of this process alone (world size 1), destroyed afterwards."""
    dist = torch.distributed
    if not _gloo_ok():
        pytest.skip("gloo backend not available")
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_src_must_be_a_rank_of_the_group(one_process_group):
    """gloo said only 'invalid root rank: 5' (src=5) or 'Must specify global_rank' (src=None)."""
    from m2pt_kernels.distributed import broadcast_aux_buffers, check_aux_buffers_consistent
    model = w.build_model(False, False, depth=1)
    for helper in (broadcast_aux_buffers, check_aux_buffers_consistent):
        with pytest.raises(ValueError, match=rf"{helper.__name__}: src=5 is not a rank of the default process "
                                             r"group \(world size 1: ranks 0..0\); pass one of them"):
            helper(model, src=5)
        for bad in (None, "0", True):
            with pytest.raises(TypeError, match=rf"{helper.__name__}: src must be an int, the global rank .* "
                                                 f"got {type(bad).__name__}"):
                helper(model, src=bad)
    assert broadcast_aux_buffers(model, src=0) is model
    check_aux_buffers_consistent(model, src=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs at least 1 CUDA device")
@pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_nccl_available()),
                    reason="NCCL not available")
def test_nccl_ranks_match_one_process(tmp_path):
    """One rank per GPU (NCCL refuses two ranks on one device): 2 ranks with 2 GPUs, else 1."""
    world = min(2, torch.cuda.device_count())
    results = w.launch(SCENARIOS, world_size=world, backend="nccl", timeout=300, out_dir=tmp_path)
    for name in SCENARIOS:
        ref = w.single_process_reference(name, device="cuda:0")
        tol = 1e-4 if torch.get_float32_matmul_precision() == "highest" else 1e-3
        _compare(name, results[name], ref, tol=w.MIXED_PRECISION_TOL if name.endswith("_mp") else tol, device="cuda")


# ============================================================================ the torchrun example
EXAMPLE = w.REPO / "python" / "train_torchrun.py"
TINY = ["--embed-dim", "32", "--depth", "2", "--heads", "2", "--img-size", "16", "--batch-size", "4",
        "--log-every", "1"]


def _torchrun(args, tmp_path, timeout=120, nproc=2, **extra_env):
    import json
    import os
    import subprocess
    import sys
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(EXAMPLE), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **extra_env)
    env.pop("RANK", None)
    proc = subprocess.run(cmd, env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    summaries = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1, proc.stdout  # printed by rank 0 only
    return summaries[0], proc.stdout


def test_torchrun_example_help():
    import subprocess
    import sys
    out = subprocess.run([sys.executable, str(EXAMPLE), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--strategy" in out.stdout and "fsdp2" in out.stdout


@pytest.mark.skipif(not _gloo_ok(), reason="gloo backend not available")
def test_torchrun_example_ddp_two_processes(tmp_path):
    summary, log = _torchrun(["--strategy", "ddp", "--steps", "4", "--grad-accum", "2", "--amp", "bf16",
                              "--checkpointing", *TINY], tmp_path)
    assert summary["world_size"] == 2 and summary["strategy"] == "ddp" and summary["backend"] == "gloo"
    assert summary["finite"] and summary["final_loss"] < summary["first_loss"], log


def _trainable_and_frozen_aux(log: str) -> tuple[int, int]:
    import re
    found = re.search(r"trainable params ([\d,]+); frozen aux-weight buffers ([\d,]+) elements", log)
    assert found, log[-2000:]
    return tuple(int(g.replace(",", "")) for g in found.groups())


@pytest.mark.skipif(not _gloo_ok(), reason="gloo backend not available")
def test_torchrun_example_ddp_linear_probe_fp16(tmp_path):
    """--only-scales (the paper's linear probing) with --amp fp16 (GradScaler) and an explicit
    --kernel-backend: only the λ and the head train, W' stays a frozen buffer."""
    summary, log = _torchrun(["--strategy", "ddp", "--steps", "4", "--only-scales", "--amp", "fp16",
                              "--kernel-backend", "reference", *TINY], tmp_path)
    assert summary["amp"] == "fp16" and summary["finite"] and summary["world_size"] == 2, log
    trainable, frozen_aux = _trainable_and_frozen_aux(log)
    assert trainable < 1000 < frozen_aux  # 8 λ + a 32-wide head; 2 blocks × 4 layers of W'
    assert "kernel backend reference" in log


@pytest.mark.slow
@pytest.mark.skipif(not _gloo_ok(), reason="gloo backend not available")
def test_torchrun_example_fsdp2_compiled_blocks_aux_trainable(tmp_path):
    """--compile (each block compiled before fully_shard) with --aux-trainable (W' sharded and
    trained like W): trains, and no W' is left as a buffer."""
    summary, log = _torchrun(["--strategy", "fsdp2", "--steps", "3", "--aux-trainable", "--compile", *TINY],
                             tmp_path, timeout=300, TORCHINDUCTOR_FORCE_DISABLE_CACHES="1")
    assert summary["strategy"] == "fsdp2" and summary["finite"], log
    assert summary["final_loss"] < summary["first_loss"], log
    assert _trainable_and_frozen_aux(log)[1] == 0


@pytest.mark.skipif(not _gloo_ok(), reason="gloo backend not available")
def test_torchrun_example_fsdp2_two_processes_and_saved_model_loads(tmp_path):
    from m2pt_kernels.pathways import merge_pathways
    from m2pt_kernels.layers import FusedCrossModalLinear
    saved = tmp_path / "model.pt"
    summary, log = _torchrun(["--strategy", "fsdp2", "--steps", "4", "--per-channel-scale", "--save", str(saved),
                              *TINY], tmp_path)
    assert summary["world_size"] == 2 and summary["strategy"] == "fsdp2"
    assert summary["finite"] and summary["final_loss"] < summary["first_loss"], log
    # the full (unsharded) state_dict loads into a one-process model with the same pathways
    import importlib.util
    spec = importlib.util.spec_from_file_location("train_torchrun", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    args = example.parse_args(["--per-channel-scale", *TINY])
    model = example.build_model(args, torch.device("cpu"))
    state = torch.load(saved, weights_only=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(state, strict=True)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items() if k.endswith("cross_modal_scale"))
    layer = next(m for m in model.modules() if isinstance(m, FusedCrossModalLinear))
    assert tuple(layer.cross_modal_scale.shape) == (layer.out_features,) and not layer.aux_trainable
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        y = model(x)
        merged = merge_pathways(model)
        assert rel_err(merged(x), y) < 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs at least 1 CUDA device")
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_torchrun_example_nccl(strategy, tmp_path):
    nproc = min(2, torch.cuda.device_count())
    summary, log = _torchrun(["--strategy", strategy, "--steps", "4", "--amp", "bf16", *TINY], tmp_path, nproc=nproc)
    assert summary["backend"] == "nccl" and summary["world_size"] == nproc
    assert summary["finite"] and summary["final_loss"] < summary["first_loss"], log
