"""The benchmark suite itself: schema, counting, target logic, budget planning, that every provider
computes the same function, and smoke runs of the quick mode and of benchmarks/gpu_check.sh.

No test here asserts a timing: the numbers are measured and recorded, never judged in CI.
"""
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

from m2pt_kernels import bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _args(**kw):
    ns = bench.build_parser().parse_args([])
    ns.max_reps = kw.pop("max_reps", 200)
    ns.target_s = kw.pop("target_s", 0.15)
    for k, v in kw.items():
        setattr(ns, k, v)
    return ns


# ---------------------------------------------------------------------------- counting
def test_layer_shapes_and_grid():
    assert bench.layer_shape("qkv", 768) == (768, 2304)
    assert bench.layer_shape("proj", 1024) == (1024, 1024)
    assert bench.layer_shape("fc1", 768) == (768, 3072)
    assert bench.layer_shape("fc2", 1024) == (4096, 1024)
    grid = bench.full_grid()
    p0 = [c for c in grid if c.priority == 0]
    assert {(c.layer, c.M) for c in p0} == {(l, m) for l in bench.LAYERS for m in bench.M_FULL}
    assert all(c.model == "vit_b16" and c.dtype == "bf16" and c.aux_trainable and c.pass_ == "fwd+bwd" for c in p0)
    assert max(c.M for c in grid) >= 50432
    assert {c.dtype for c in grid} == {"bf16", "fp16", "fp32"}
    assert {c.pass_ for c in grid} == set(bench.PASSES)
    assert {c.model for c in grid} == {"vit_b16", "vit_l16"}
    assert len({c.key() for c in grid}) == len(grid)


def test_flops_and_bytes_by_hand():
    c = bench.Case("x", "m", M=2, K=3, N=5, dtype="bf16", aux_trainable=True, pass_="fwd")
    assert bench.case_flops(c) == 2 * 2 * 5 * 3
    # fwd: x (6) + W, W' (30) + b (5) + y (10) elements, 2 bytes each
    assert bench.case_bytes(c) == (6 + 30 + 5 + 10) * 2
    bwd = bench.Case("x", "m", 2, 3, 5, "fp32", True, "bwd")
    # bwd: dy 10, x 6, W W' 30 in; dx 6, dW 15, db 5, dW' 15 out; 4 bytes each
    assert bench.case_bytes(bwd) == (10 + 6 + 30 + 6 + 15 + 5 + 15) * 4
    frozen = bench.Case("x", "m", 2, 3, 5, "fp32", False, "bwd")
    assert bench.case_bytes(frozen) == bench.case_bytes(bwd) - 15 * 4
    probe = bench.Case("x", "m", 2, 3, 5, "fp32", True, "probe")
    assert bench.case_flops(probe) == 3 * 2 * 2 * 5 * 3
    fwd_fp32 = bench.Case("x", "m", 2, 3, 5, "fp32", True, "fwd")
    assert bench.case_bytes(probe) == bench.case_bytes(fwd_fp32) + (10 + 6 + 30 + 6) * 4


def test_quantile_matches_numpy():
    np = pytest.importorskip("numpy")
    vals = [float(v) for v in torch.rand(37).tolist()]
    for q in (0.2, 0.5, 0.8):
        assert math.isclose(bench.quantile(vals, q), float(np.quantile(vals, q)), rel_tol=1e-12)
    med, (lo, hi) = bench.summarize(vals)
    assert lo <= med <= hi


def test_paired_ratio_cancels_drift_between_rounds():
    # Ours is 3% faster than paper in every round, while the machine slows down 40% over the run and
    # the two sides' samples are spread unevenly over it: the paired ratio sees 0.97, the ratio of
    # the two overall medians does not.
    slow = [1.0 + 0.4 * r / 19 for r in range(20)]
    paper = [2.0 * s for s in slow]
    ours = [0.97 * 2.0 * s for s in slow]
    r = bench.paired_ratio(ours, paper)
    assert math.isclose(r["median"], 0.97, rel_tol=1e-12) and r["rounds"] == 20
    assert r["ci95"][0] <= 0.97 <= r["ci95"][1]
    skewed = bench.quantile(ours[10:] + ours[10:], 0.5) / bench.quantile(paper, 0.5)
    assert skewed > 1.0  # what unpaired medians make of the same machine
    noisy = bench.paired_ratio([o * (1 + 0.02 * (-1) ** i) for i, o in enumerate(ours)], paper)
    assert noisy["ci95"][0] < noisy["median"] < noisy["ci95"][1]
    assert noisy == bench.paired_ratio([o * (1 + 0.02 * (-1) ** i) for i, o in enumerate(ours)], paper)  # seeded
    assert bench.paired_ratio([], []) is None


def test_rotated_order_puts_every_provider_after_every_other():
    names = ["plain", "paper", "reference"]
    orders = [bench._rotated(names, r) for r in range(3)]
    assert orders[0] == names and all(sorted(o) == sorted(names) for o in orders)
    assert {o[0] for o in orders} == set(names)
    assert bench._rotated([], 4) == []


def test_floor_uses_measured_ceilings():
    peaks = {"matmul_tflops": 500.0, "copy_gbps": 4000.0, "matmul_dtype": "bfloat16"}
    assert math.isclose(bench.floor_ms(10 ** 12, 10 ** 6, "bf16", peaks), 2.0)  # compute-bound: 1e12/5e14 s
    assert math.isclose(bench.floor_ms(10 ** 6, 4 * 10 ** 9, "bf16", peaks), 1.0)  # memory-bound
    assert bench.floor_ms(1, 1, "fp32", peaks) is None  # a bf16 ceiling says nothing about fp32


# ---------------------------------------------------------------------------- same function
@pytest.mark.parametrize("pas", ["fwd+bwd", "probe"])
@pytest.mark.parametrize("aux_trainable", [True, False])
def test_providers_compute_the_same_function(pas, aux_trainable):
    """paper, auto and reference get the same inputs and must give the same y and gradients, so
    the suite compares like with like; plain (no pathway) must differ (λ ≠ 0)."""
    case = bench.Case("fc1", "tiny", 13, 24, 40, "fp32", aux_trainable, pas)
    data = bench._random_set(case, torch.device("cpu"), torch.Generator().manual_seed(3))
    assert float(data["lam"].abs().min()) > 0 and float(data["x"].abs().sum()) > 0
    outs = {}
    for p in ("plain", "paper", "auto", "reference"):
        inst = bench.make_instance(p, case, data, None)
        with inst.backend_ctx():
            y = inst.fn()
        y.backward(inst.dy)
        outs[p] = (y.detach(), inst.x.grad, {n: t.grad for n, t in inst.named_grads.items()})
        expected_grads = 2 if pas == "probe" else (5 if aux_trainable or p == "plain" else 4)
        if p == "plain":
            expected_grads = 1 if pas == "probe" else 3
        assert len(inst.grads) == expected_grads, (p, [tuple(t.shape) for t in inst.grads])
        assert all(t.grad is not None for t in inst.grads)
    for p in ("auto", "reference"):
        assert torch.allclose(outs[p][0], outs["paper"][0], rtol=1e-5, atol=1e-5)
        assert outs[p][2].keys() == outs["paper"][2].keys()  # x, and W, b, λ, W' as the case trains them
        for name, g in outs[p][2].items():
            assert torch.allclose(g, outs["paper"][2][name], rtol=1e-5, atol=1e-5), (p, name)
    assert not torch.allclose(outs["plain"][0], outs["paper"][0], rtol=1e-3, atol=1e-3)


def test_bench_vit_pathways_and_merge():
    cfg = bench.VIT_CONFIGS["tiny"]
    torch.manual_seed(0)
    model = bench.BenchViT(**cfg)
    img = torch.randn(2, 3, cfg["img"], cfg["img"])
    plain_out = model(img)
    used = bench.add_bench_pathways(model, "ours", True, torch.Generator().manual_seed(1))
    assert "Linear" in used
    names = [n for n, m in model.named_modules() if hasattr(m, "cross_modal_scale")]
    assert len(names) == 4 * cfg["depth"] and "blocks.0.attn.qkv" in names
    out = model(img)
    assert not torch.allclose(out, plain_out, atol=1e-4)  # λ ≠ 0: the pathway changes the output
    with torch.no_grad():
        ref = model(img)
    merged, how = bench.merge_bench_pathways(model)
    assert how
    assert all(type(getattr(p, n)) is torch.nn.Linear for p, n in bench._pathway_targets(merged))
    with torch.no_grad():
        assert torch.allclose(merged(img), ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- targets and budget
def _case(layer, M, ms, peak=None, K=768, N=768):
    return {"layer": layer, "model": "vit_b16", "M": M, "K": K, "N": N, "dtype": "bf16", "aux_trainable": True,
            "pass": "fwd+bwd", "priority": 0, "ms": ms, "ms_spread": {p: [v, v] for p, v in ms.items()},
            "peak_mb": peak or {p: None for p in ms}, "tflops": {p: 1.0 for p in ms},
            "flops": 6 * M * K * N, "bytes_min": 1000, "floor_ms": 0.01, "errors": {}}


def test_evaluate_targets_met_and_missed():
    aux_mb = 768 * 768 * 2 / bench.MB
    res = {"device_type": "cuda", "peaks": {"matmul_tflops": 700.0, "copy_gbps": 4000.0},
           "cases": [
               _case("qkv", 197, {"plain": 1.0, "paper": 2.0, "auto": 1.10, "paper_compiled": 1.2},
                     {"plain": 10.0, "auto": 10.0 + aux_mb, "paper": 20.0}),
               _case("proj", 1576, {"plain": 1.0, "paper": 1.2, "auto": 1.06},
                     {"plain": 10.0, "auto": 10.0 + aux_mb + 5.0, "paper": 20.0}),
               _case("fc1", 12608, {"plain": 1.0, "paper": 1.01, "auto": 1.015}),
           ],
           "whole_model": {"variants": {"plain": {"ms": 100.0}, "ours": {"ms": 104.0}}, "config": {}, "batch": 1},
           "skipped": {}}
    t = bench.evaluate_targets(res)

    def find(name, case_prefix=None):
        hits = [x for x in t if x["target"] == name and (case_prefix is None or x.get("case", "").startswith(case_prefix))]
        assert len(hits) == 1, (name, case_prefix, hits)
        return hits[0]

    assert find("auto <= limit x plain", "vit_b16.qkv")["status"] == "met"          # 1.10 <= 1.15
    assert find("auto <= limit x plain", "vit_b16.proj")["status"] == "missed"      # 1.06 > 1.05
    assert find("auto <= limit x plain", "vit_b16.fc1")["status"] == "met"          # 1.015 <= 1.02
    assert find("auto >= 1.5x faster than paper at M=197")["status"] == "met"       # 2.0 / 1.1
    assert find("auto never slower than paper", "vit_b16.fc1")["status"] == "missed"
    assert find("auto never slower than paper_compiled", "vit_b16.qkv")["status"] == "met"
    assert find("auto never slower than paper_compiled", "vit_b16.proj")["status"] == "not measured"
    assert find("auto peak memory <= plain + aux grad", "vit_b16.qkv")["status"] == "met"
    assert find("auto peak memory <= plain + aux grad", "vit_b16.proj")["status"] == "missed"
    whole = find("whole ViT step ours <= 1.03x no pathways")
    assert whole["status"] == "missed" and math.isclose(whole["value"], 1.04)
    missed = find("auto <= limit x plain", "vit_b16.proj")
    assert {"flops", "bytes_min", "achieved_tflops", "fraction_of_matmul_peak"} <= set(missed["cost"])
    assert not any(x["informational"] for x in t)
    assert "MISSED" in bench.format_targets(t)


def test_plan_cases_keeps_priority_and_fits_budget():
    dev = torch.device("cuda")  # only device.type is read: no GPU needed
    peaks = {"matmul_tflops": 700.0, "copy_gbps": 4000.0}
    grid = bench.full_grid()
    provs = list(bench.PROVIDERS)
    kept, dropped = bench.plan_cases(grid, provs, dev, peaks, _args(budget_s=None))
    assert len(kept) == len(grid) and not dropped
    kept, dropped = bench.plan_cases(grid, provs, dev, peaks, _args(budget_s=150.0, model_reserve_s=20.0))
    assert dropped and kept
    assert [c.priority for c in kept] == sorted(c.priority for c in kept)
    assert all(c.priority == 0 for c in kept[:16]) and len([c for c in kept if c.priority == 0]) == 16
    assert max(c.priority for c in kept) <= min(d["priority"] for d in dropped) + 1
    est = sum(bench.estimate_case_s(c, provs, dev, peaks, _args(), set()) for c in kept)
    assert est > 0


# ---------------------------------------------------------------------------- schema
def _minimal_results():
    return {k: None for k in bench.RESULT_KEYS} | {
        "schema_version": bench.SCHEMA_VERSION, "cases": [_case("qkv", 197, {"plain": 1.0, "auto": 1.1})],
        "skipped": {}, "targets": [], "dropped": []}


def test_validate_results_rejects_broken_files():
    ok = _minimal_results()
    bench.validate_results(ok)
    bad = _minimal_results()
    del bad["peaks"]
    with pytest.raises(ValueError, match="peaks"):
        bench.validate_results(bad)
    bad = _minimal_results()
    bad["cases"][0]["ms"]["nope"] = 1.0
    with pytest.raises(ValueError, match="nope"):
        bench.validate_results(bad)
    bad = _minimal_results()
    bad["cases"][0]["ms_spread"]["auto"] = [2.0, 3.0]
    with pytest.raises(ValueError, match="spread"):
        bench.validate_results(bad)
    bad = _minimal_results()
    bad["cases"][0]["ms"]["auto"] = float("nan")
    with pytest.raises(ValueError, match="positive time"):
        bench.validate_results(bad)
    bad = _minimal_results()
    del bad["cases"][0]["flops"]
    with pytest.raises(ValueError, match="flops"):
        bench.validate_results(bad)


# ---------------------------------------------------------------------------- smoke runs
def test_quick_mode_tiny_writes_valid_results(tmp_path, capsys):
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    rc = bench.main(["--tiny", "--no-compile", "--out", str(out), "--plot", str(png), "--target-s", "0.02"])
    assert rc == 0
    printed = capsys.readouterr().out
    res = json.loads(out.read_text())
    bench.validate_results(res)
    assert res["complete"] and res["device_type"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert {c["pass"] for c in res["cases"]} == set(bench.PASSES)
    for c in res["cases"]:
        assert {"plain", "paper", "auto", "reference"} <= set(c["ms"]), c["errors"]
        assert c["flops"] > 0 and c["bytes_min"] > 0
    assert "paper_compiled" in res["skipped"]
    if not torch.cuda.is_available():
        assert "triton" in res["skipped"] and "cuda" in res["skipped"]
        assert all(v is None for c in res["cases"] for v in c["peak_mb"].values())
    for c in res["cases"]:
        paired = c["paired_x_paper"]
        assert {"plain", "auto", "reference"} <= set(paired)
        assert all(p["ci95"][0] <= p["median"] <= p["ci95"][1] and p["rounds"] >= 1 for p in paired.values())
    wm = res["whole_model"]["variants"]
    assert {"plain", "paper", "ours"} <= set(wm) and wm["plain"]["tokens_per_s"] > 0
    assert {"ours/paper", "ours_aux_frozen/paper_aux_frozen", "ours/plain"} == set(res["whole_model"]["paired"])
    assert "ours ÷ paper, per round" in printed and "Paired per-round ratios" in printed
    mi = res["merge_inference"]
    assert mi["module_types_identical"] is True and mi["merged_vs_unmerged_rel_err"] < 1e-5
    assert png.stat().st_size > 1000
    assert "| model | layer | M |" in printed and "Targets" in printed
    assert printed.rstrip().splitlines()[-1].startswith(("Skipped", "Inference", "|"))


@pytest.mark.slow
def test_paper_compiled_provider_runs(tmp_path):
    out = tmp_path / "c.json"
    rc = bench.main(["--tiny", "--providers", "plain,paper_compiled,paper", "--passes", "fwd+bwd",
                     "--no-whole-model", "--out", str(out), "--target-s", "0.02"])
    assert rc == 0
    res = json.loads(out.read_text())
    bench.validate_results(res)
    for c in res["cases"]:
        assert "paper_compiled" in c["ms"], c["errors"]


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    """benchmarks/gpu_check.sh end to end in its tiny CPU mode (about a minute)."""
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), M2PT_GPU_CHECK_DRY="1", PYTHON=sys.executable, M2PT_COMMIT="test")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh")], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert set(files) == {"env.txt", "build.log", "tests.log", "bench.log", "results.json", "plot.png", "summary.txt"}
    assert len(files) <= 8 and all((out / f).stat().st_size < 16 * 2 ** 20 for f in files)
    res = json.loads((out / "results.json").read_text())
    bench.validate_results(res)
    assert res["complete"] and res["commit"] == "test"
    tail = proc.stdout.rstrip().splitlines()
    assert any(line.startswith("| model | layer") for line in tail[-40:]), proc.stdout[-2000:]
    summary = (out / "summary.txt").read_text()
    assert "bench: rc=0" in summary and "build: ok" in summary, summary
    # the test stage really ran pytest on the GPU tests (here all skipped: no CUDA device)
    ran = re.search(r"tests -m gpu: rc=0 .*?(\d+) skipped", summary)
    assert ran and int(ran.group(1)) >= 100, summary


def test_plan_only_touches_no_device(capsys):
    """`--device cuda --plan-only` plans a GPU run on a machine without one."""
    assert bench.main(["--device", "cuda", "--mode", "full", "--budget-s", "195", "--plan-only"]) == 0
    out = capsys.readouterr().out
    keep = [l for l in out.splitlines() if l.startswith("keep")]
    assert len(keep) >= 16 and all(" p0 " in l for l in keep[:16])
    assert "dropped" in out.splitlines()[-1]


def test_run_script_honours_out_forms_and_plans_without_a_gpu(tmp_path):
    """benchmarks/run.py passes every argument through as written (``--out=PATH`` too) and only
    supplies the default folder; `--plan-only` there touches no device either."""
    script = [sys.executable, os.path.join(ROOT, "benchmarks", "run.py")]
    out = tmp_path / "eq.json"
    args = ["--tiny", "--no-compile", "--no-whole-model", "--passes", "fwd", "--target-s", "0.01", f"--out={out}"]
    run = subprocess.run(script + args, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert f"results: {out}" in run.stdout and out.is_file()
    plan = subprocess.run(script + ["--device", "cuda", "--mode", "full", "--budget-s", "195", "--plan-only"],
                          capture_output=True, text=True, timeout=120)
    assert plan.returncode == 0, plan.stderr[-2000:]
    bad = subprocess.run(script + ["--tiny", "--device"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--device: expected one argument" in bad.stderr
    assert bench.default_out(torch.device("cpu"), str(tmp_path)).startswith(str(tmp_path / ""))


def _benchmark_script(name: str):
    """A script of benchmarks/ imported as a module (benchmarks/ is not a package)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"m2pt_{name}", os.path.join(ROOT, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cpu_overhead_module():
    return _benchmark_script("cpu_overhead")


def test_cpu_overhead_benchmark_writes_paired_ratios(tmp_path):
    """benchmarks/cpu_overhead.py (the split of the reference's CPU time against the paper's layer)
    runs, checks that its variants compute the same function, and writes every ratio."""
    mod = _cpu_overhead_module()
    out = tmp_path / "overhead.json"
    threads = torch.get_num_threads()
    assert mod.main(["--shapes", "8x8", "--rounds", "2", "--reps", "2", "--threads", "1", "--out", str(out)]) == 0
    assert torch.get_num_threads() == threads  # restored
    res = json.loads(out.read_text())
    assert res["kind"] == "cpu_overhead" and res["torch"] == torch.__version__ and res["date"]
    shape = res["shapes"]["8x8"]
    assert set(shape["us"]) == set(mod.VARIANTS) and all(v > 0 for v in shape["us"].values())
    assert set(shape["x_paper"]) == set(mod.VARIANTS) - {"paper"}
    assert all(r["rounds"] == 2 for r in shape["x_paper"].values())
    assert shape["max_abs_diff_between_variants"] < 1e-5


def test_cpu_overhead_refuses_variants_that_differ(monkeypatch):
    """Timings of variants that compute different gradients would compare nothing: an error."""
    mod = _cpu_overhead_module()
    backward = mod._BareFunction.backward
    monkeypatch.setattr(mod._BareFunction, "backward",
                        staticmethod(lambda ctx, dy: tuple(g * 2 if g is not None else g for g in backward(ctx, dy))))
    with pytest.raises(RuntimeError, match="the variants disagree"):
        mod.main(["--shapes", "8x8", "--rounds", "1", "--reps", "1"])


def test_plot_script_on_every_committed_results_file(tmp_path, capsys):
    """benchmarks/plot.py draws every committed m2pt-bench result; a cpu_overhead result or a group the file
    does not hold is a one-line usage error (they used to be a ValueError traceback from deep inside)."""
    pytest.importorskip("matplotlib")
    plot = _benchmark_script("plot")
    results = os.path.join(ROOT, "benchmarks", "results")
    files = sorted(f for f in os.listdir(results) if f.endswith(".json"))
    assert files
    for name in files:
        path = os.path.join(results, name)
        with open(path) as f:
            kind = json.load(f).get("kind")
        if kind == "cpu_overhead":
            with pytest.raises(SystemExit) as exc:
                plot.main([path, "-o", str(tmp_path / "x.png")])
            assert exc.value.code == 2 and "cpu_overhead.py result" in capsys.readouterr().err
        else:
            assert plot.main([path, "-o", str(tmp_path / f"{name}.png")]) == 0, name
            assert (tmp_path / f"{name}.png").stat().st_size > 0
    main_run = os.path.join(results, "2026-11-28-cpu2-reference-vs-paper.json")
    for group in ("vit_b16", "vit_b16,bf16,fwd+bwd,trainable"):
        with pytest.raises(SystemExit) as exc:
            plot.main([main_run, "--group", group, "-o", str(tmp_path / "g.png")])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and f"--group {group!r} is not a group of this file" in err
        assert "vit_b16,fp32,fwd+bwd,trainable" in err  # the groups it does hold
    assert plot.main([main_run, "--group", "vit_s16,fp32,fwd+bwd,trainable", "-o", str(tmp_path / "s.png")]) == 0
