"""The ``m2pt`` command end to end: demo (tiny size, twice for determinism), info, merge on both
checkpoint formats and on bad input, bench dispatch."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from m2pt_kernels.baselines import PaperCrossModalReparamLinear
from m2pt_kernels.cli import main
from m2pt_kernels.models import vit_for_images, vit_for_point_clouds

BLOCK_LINEARS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
TINY = ["--aux-steps", "12", "--steps", "16", "--seeds", "2", "--eval-every", "8", "--timing-repeats", "2",
        "--no-progress"]

HAS_DEMO_DEPS = all(__import__("importlib").util.find_spec(m) for m in ("sklearn", "matplotlib", "safetensors"))


def _target():
    return vit_for_images(img_size=8, patch_size=4, in_chans=1, embed_dim=16, depth=2, num_heads=2,
                          mlp_ratio=2.0, num_classes=4)


def _aux():
    return vit_for_point_clouds(num_groups=4, group_size=4, hidden=8, embed_dim=16, depth=2, num_heads=2,
                                mlp_ratio=2.0, num_classes=3)


def _run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


# ---------------------------------------------------------------- demo

@pytest.fixture(scope="module")
def demo_reports(tmp_path_factory):
    if not HAS_DEMO_DEPS:
        pytest.skip("m2pt demo needs scikit-learn, matplotlib and safetensors (pip install 'm2pt_kernels[demo]')")
    reports = []
    for i in range(2):
        out = tmp_path_factory.mktemp(f"demo{i}")
        assert main(["demo", "--out", str(out), *TINY]) == 0
        with open(out / "report.json") as f:
            reports.append((out, json.load(f)))
    return reports


def test_demo_writes_a_sane_report(demo_reports):
    out, rep = demo_reports[0]
    assert (out / "training_curves.png").stat().st_size > 10_000
    assert (out / "target_merged.safetensors").exists() and (out / "target_with_pathways.safetensors").exists()
    assert rep["config"]["steps"] == 16 and rep["config"]["seeds"] == 2 and rep["config"]["aux_steps"] == 12
    assert 0.0 <= rep["auxiliary"]["test_acc"] <= 1.0
    assert len(rep["auxiliary"]["curve"]["train_loss"]) == 12
    summary = rep["target"]["summary"]
    for v in ("baseline", "control", "m2pt"):
        runs = rep["target"]["runs"][v]
        assert len(runs) == 2 and [r["curve"]["test_acc_step"] for r in runs] == [[8, 16], [8, 16]]
        assert all(0.0 <= r["test_acc"] <= 1.0 and r["time_per_step_s"] > 0 for r in runs)
        assert all(all(torch.isfinite(torch.tensor(r["curve"]["train_loss"]))) for r in runs)
        accs = [r["test_acc"] for r in runs]
        assert summary[v]["test_acc_mean"] == pytest.approx(sum(accs) / 2)
    for v in ("control", "m2pt"):  # λ of 4 blocks x 4 linears, moved off its init 0
        lam = summary[v]["scales_mean"]
        assert sorted(lam) == sorted(f"blocks.{i}.{n}" for i in range(4) for n in BLOCK_LINEARS)
        assert any(abs(x) > 0 for x in lam.values())
    assert rep["target"]["runs"]["baseline"][0]["scales"] == {}
    m = rep["merge"]
    assert m["max_abs_diff_logits"] < 1e-4 and m["argmax_agreement"] == 1.0
    assert m["max_abs_diff_logits_training_path"] < 1e-4
    assert m["reload_strict_max_abs_diff"] == 0.0
    assert m["params_merged"] == m["params_baseline"] < m["params_with_pathways"]
    assert all(t > 0 for t in m["inference_median_s"].values())


def test_demo_is_deterministic(demo_reports):
    (_, a), (_, b) = demo_reports

    def numbers(rep):
        t = rep["target"]["runs"]
        return (rep["auxiliary"]["curve"]["train_loss"], rep["auxiliary"]["test_acc"],
                {v: [(r["curve"]["train_loss"], r["curve"]["test_acc"], r["scales"]) for r in t[v]] for v in t},
                rep["merge"]["max_abs_diff_logits"])

    assert numbers(a) == numbers(b)


def test_demo_merged_checkpoint_loads_into_plain_model(demo_reports):
    from m2pt_kernels.demo import build_target
    from m2pt_kernels.pathways import is_pathway_state_dict, load_checkpoint

    out, _ = demo_reports[0]
    sd = load_checkpoint(str(out / "target_merged.safetensors"))
    assert not is_pathway_state_dict(sd)
    build_target(0).load_state_dict(sd, strict=True)
    assert is_pathway_state_dict(load_checkpoint(str(out / "target_with_pathways.safetensors")))


def test_demo_bad_options(capsys, tmp_path):
    rc, _, err = _run(capsys, "demo", "--steps", "0", "--out", str(tmp_path))
    assert rc == 2 and "--steps" in err and "Traceback" not in err
    rc, _, err = _run(capsys, "demo", "--device", "nonsense", "--out", str(tmp_path))
    assert rc == 2 and "device" in err


@pytest.mark.parametrize("argv,backend,in_err", [
    (["--lr", "-1"], None, "--lr must be a positive number"),
    (["--aux-lr", "0"], None, "--aux-lr must be a positive number"),
    (["--scale-lr-mult", "nan"], None, "--scale-lr-mult must be a positive number"),
    (["--timing-repeats", "0"], None, "--timing-repeats must be >= 1"),
    (["--threads", "-1"], None, "--threads"),
    (["--threads", "0"], None, "--threads"),
    (["--out", "{afile}"], None, "{afile}"),  # an existing regular file
    (["--out", "{afile}/sub"], None, "{afile}/sub"),  # cannot be created
    (["--device", "mps"], None, "--device mps"),
    (["--device", "xpu"], None, "--device xpu"),
    (["--device", "meta"], None, "--device meta"),
    (["--device", "cuda:99"], None, "--device cuda:99"),
    # $M2PT_BACKEND: unknown, or a backend that cannot run on CPU tensors (triton without the interpreter)
    (["--device", "cpu"], "bogus", "unknown m2pt_kernels backend 'bogus' (from $M2PT_BACKEND)"),
    (["--device", "cpu"], "triton", "'triton'"),
    (["--device", "cpu"], "cuda", "'cuda'"),
])
def test_demo_refuses_bad_values_before_training(argv, backend, in_err, monkeypatch, capsys, tmp_path):
    """Each bad value is one line, exit 2, nothing trained: not a traceback from torch half-way through."""
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if backend is not None:
        monkeypatch.setenv("M2PT_BACKEND", backend)
    argv = [a.format(afile=afile) for a in argv]
    out_args = [] if "--out" in argv else ["--out", str(tmp_path / "report")]
    rc, out, err = _run(capsys, "demo", *TINY, *out_args, *argv)
    assert rc == 2 and "Traceback" not in err and err.count("\n") == 1, err
    assert in_err.format(afile=afile) in err
    assert out == "" and not (tmp_path / "report").exists()  # nothing ran, not even the first line


# ---------------------------------------------------------------- info / bench / usage

def test_info_in_process(capsys):
    rc, out, _ = _run(capsys, "info")
    assert rc == 0 and "torch" in out and "reference" in out and "yes" in out
    rc, out, _ = _run(capsys, "info", "--json")
    info = json.loads(out)
    assert rc == 0 and info["torch"] == torch.__version__ and info["backends"]["reference"]["available"]
    assert set(info["backends"]) == {"reference", "triton", "cuda"}
    assert all(b["why"] for b in info["backends"].values())


def test_info_as_subprocess():
    env = dict(os.environ)
    proc = subprocess.run([sys.executable, "-m", "m2pt_kernels", "info"], capture_output=True, text=True,
                          timeout=120, env=env, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr
    assert "m2pt_kernels" in proc.stdout and "backends" in proc.stdout and "reference" in proc.stdout


def test_usage_errors(capsys):
    assert _run(capsys, "frobnicate")[0] == 2
    assert _run(capsys, "merge", "only-one-arg")[0] == 2
    assert _run(capsys)[0] == 2
    assert _run(capsys, "--help")[0] == 0


def test_bench_forwards_its_arguments(monkeypatch, capsys):
    import types
    seen = {}
    fake = types.ModuleType("m2pt_kernels.bench")
    fake.main = lambda argv=None: seen.setdefault("argv", argv) and 0
    monkeypatch.setitem(sys.modules, "m2pt_kernels.bench", fake)
    assert main(["bench", "--quick", "--out", "x.json"]) == 0
    assert seen["argv"] == ["--quick", "--out", "x.json"]


@pytest.mark.skipif(__import__("importlib").util.find_spec("m2pt_kernels.bench") is None,
                    reason="m2pt_kernels.bench not in this tree")
def test_bench_help_reaches_the_suite(capsys):
    rc, out, _ = _run(capsys, "bench", "--help")
    assert rc == 0 and "usage:" in out


@pytest.mark.skipif(__import__("importlib").util.find_spec("m2pt_kernels.bench") is None,
                    reason="m2pt_kernels.bench not in this tree")
@pytest.mark.parametrize("argv,in_err", [
    (["--providers", "foo"], "error: m2pt bench: unknown provider 'foo'"),  # used to print nothing
    (["--models", "foo"], "unknown model(s) ['foo']"),  # used to time zero cases and exit 0
    (["--layers", "qkv,nope"], "unknown layer(s) ['nope']"),
    (["--M", "0"], "token counts must be positive integers"),
    (["--models", "vit_b16"], "no case matches"),  # not in the --tiny grid
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "nonsense"], "--device"),
])
def test_bench_user_errors_are_one_clear_line(argv, in_err, capsys):
    rc, _, err = _run(capsys, "bench", "--tiny", "--device", "cpu", "--no-save", "--no-whole-model", *argv)
    assert rc == 2 and in_err in err and "Traceback" not in err, err


def test_bench_missing_module_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "m2pt_kernels.bench", None)  # import raises ModuleNotFoundError
    rc, _, err = _run(capsys, "bench")
    assert rc == 2 and "m2pt_kernels.bench" in err and "Traceback" not in err


# ---------------------------------------------------------------- merge

def _ours_checkpoint(path):
    """A target trained with this package's pathways: FusedCrossModalLinear layers, λ moved off 0."""
    from m2pt_kernels.pathways import add_pathways, save_checkpoint
    model = add_pathways(_target(), _aux())
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("cross_modal_scale"):
                p.copy_(torch.randn_like(p))
    save_checkpoint(model.state_dict(), str(path))
    return model.eval()


def _paper_checkpoint(path):
    """The paper's format: its CrossModalReparamLinear in every block linear, saved as {'model': sd, ...}."""
    model, aux = _target(), _aux()
    aux_modules = dict(aux.named_modules())
    for i in range(2):
        for lin in BLOCK_LINEARS:
            name = f"blocks.{i}.{lin}"
            parent_name, _, child = name.rpartition(".")
            parent, old = model.get_submodule(parent_name), model.get_submodule(name)
            new = PaperCrossModalReparamLinear(old.in_features, old.out_features, bias=old.bias is not None,
                                               origin_layer=old, aux_weight=aux_modules[name].weight)
            with torch.no_grad():
                new.cross_modal_scale.copy_(torch.randn(1))
            setattr(parent, child, new)
    torch.save({"model": model.state_dict(), "epoch": 3, "optimizer": {"state": {}, "param_groups": []}}, path)
    return model.eval()


@pytest.mark.parametrize("fmt,in_suffix,out_suffix", [("ours", ".safetensors", ".safetensors"),
                                                     ("ours", ".safetensors", ".pth"),
                                                     ("paper", ".pth", ".safetensors"),
                                                     ("paper", ".pth", ".pth")])
def test_merge_both_formats(fmt, in_suffix, out_suffix, tmp_path, capsys):
    from m2pt_kernels.pathways import load_checkpoint
    src, dst = tmp_path / f"train{in_suffix}", tmp_path / f"merged{out_suffix}"
    trained = (_ours_checkpoint if fmt == "ours" else _paper_checkpoint)(src)
    before = src.read_bytes()
    rc, out, err = _run(capsys, "merge", str(src), str(dst))
    assert rc == 0, err
    assert "merged 8 pathway layer(s)" in out
    assert src.read_bytes() == before  # input untouched
    plain = _target().eval()
    plain.load_state_dict(load_checkpoint(str(dst)), strict=True)
    assert not any(isinstance(m, PaperCrossModalReparamLinear) for m in plain.modules())
    assert all(type(m) is nn.Linear for n, m in plain.named_modules() if n.endswith(BLOCK_LINEARS))
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), trained(x), rtol=1e-5, atol=1e-5)
    assert not any(f.name.startswith(".") for f in tmp_path.iterdir())  # no temp files left behind


def test_merge_timm_pth_tar_checkpoint(tmp_path, capsys):
    """timm's train.py saves {'state_dict': ..., 'epoch': ...} as model_best.pth.tar: merged, also to .pth.tar."""
    import argparse
    from m2pt_kernels.pathways import load_checkpoint
    trained = _ours_checkpoint(tmp_path / "ours.safetensors")
    src, dst = tmp_path / "model_best.pth.tar", tmp_path / "merged.pth.tar"
    torch.save({"epoch": 3, "arch": "vit", "state_dict": trained.state_dict(), "version": 2,
                "args": argparse.Namespace(lr=0.1), "metric": 81.2}, src)
    rc, out, err = _run(capsys, "merge", str(src), str(dst))
    assert rc == 0, err
    assert "merged 8 pathway layer(s)" in out
    plain = _target().eval()
    plain.load_state_dict(load_checkpoint(str(dst)), strict=True)
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), trained(x), rtol=1e-5, atol=1e-5)
    assert not any(f.name.startswith(".") for f in tmp_path.iterdir())  # no temp files left behind


@pytest.mark.parametrize("error", [RuntimeError("[enforce fail at inline_container.cc:626] . open file failed"),
                                   type("SafetensorError", (Exception,), {})("Permission denied (os error 13)")])
def test_merge_write_failure_is_one_line(error, tmp_path, capsys, monkeypatch):
    """torch.save raises RuntimeError and safetensors its own Exception type on a read-only folder: both used to
    escape as a traceback with exit 1."""
    import m2pt_kernels.pathways as pathways
    src = tmp_path / "train.safetensors"
    _ours_checkpoint(src)

    def failing_save(sd, path):
        open(path, "wb").close()  # a partial file, as a failed write can leave
        raise error

    monkeypatch.setattr(pathways, "save_checkpoint", failing_save)
    rc, _, err = _run(capsys, "merge", str(src), str(tmp_path / "merged.pth"))
    assert rc == 2 and "cannot write" in err and str(error) in err and "Traceback" not in err, err
    assert sorted(f.name for f in tmp_path.iterdir()) == ["train.safetensors"]  # no OUT, no temp file


def test_merge_bad_input(tmp_path, capsys):
    def err_of(*argv):
        rc, _, err = _run(capsys, "merge", *argv)
        assert rc == 2, (argv, err)
        assert "Traceback" not in err and err.count("\n") == 1, err
        return err

    good = tmp_path / "train.safetensors"
    _ours_checkpoint(good)
    assert "does not exist" in err_of(str(tmp_path / "missing.pth"), str(tmp_path / "o.pth"))
    # wrong format: an unknown suffix, and a file that is not a checkpoint
    txt = tmp_path / "notes.txt"
    txt.write_text("hello")
    assert "format" in err_of(str(txt), str(tmp_path / "o.pth"))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"definitely not a pickle")
    assert "cannot read" in err_of(str(junk), str(tmp_path / "o.pth"))
    junk_st = tmp_path / "junk.safetensors"
    junk_st.write_bytes(b"\x00" * 64)
    assert "cannot read" in err_of(str(junk_st), str(tmp_path / "o.pth"))
    assert "format" in err_of(str(good), str(tmp_path / "o.onnx"))
    # no pathways
    plain = tmp_path / "plain.pth"
    torch.save(_target().state_dict(), plain)
    assert "no pathways" in err_of(str(plain), str(tmp_path / "o.pth"))
    # OUT == IN, also spelled differently
    before = good.read_bytes()
    assert "same file" in err_of(str(good), str(good))
    assert "same file" in err_of(str(good), str(tmp_path / "." / "train.safetensors"))
    assert good.read_bytes() == before
    # OUT exists: refused without --force, replaced with it
    out = tmp_path / "exists.safetensors"
    out.write_bytes(b"keep me")
    assert "--force" in err_of(str(good), str(out))
    assert out.read_bytes() == b"keep me"
    assert main(["merge", str(good), str(out), "--force"]) == 0
    assert out.read_bytes() != b"keep me"
    assert "same file" in err_of(str(good), str(good), "--force")
    assert not (tmp_path / "o.pth").exists()


def test_demo_fails_when_its_merge_check_fails(monkeypatch, tmp_path, capsys):
    """The demo checks what it reports: a merge that changes the function is exit 1, not a printed number."""
    if not HAS_DEMO_DEPS:
        pytest.skip("m2pt demo needs scikit-learn, matplotlib and safetensors")
    import m2pt_kernels.pathways as pathways
    real = pathways.merge_pathways

    def corrupting_merge(model):
        merged = real(model)
        with torch.no_grad():
            next(m for m in merged.modules() if isinstance(m, nn.Linear)).weight[0, 0] += 1.0
        return merged

    monkeypatch.setattr(pathways, "merge_pathways", corrupting_merge)
    rc, out, err = _run(capsys, "demo", "--out", str(tmp_path), "--aux-steps", "1", "--steps", "2", "--seeds", "1",
                        "--eval-every", "2", "--timing-repeats", "1", "--no-progress")
    assert rc == 1 and "the merged model does not compute what the model with pathways did" in err, (out, err)
    assert "Traceback" not in err and (tmp_path / "report.json").exists()


def test_demo_as_a_module_runs_the_cli(tmp_path):
    """python -m m2pt_kernels.demo used to import, do nothing and exit 0."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                       os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-m", "m2pt_kernels.demo", "--steps", "0", "--out", str(tmp_path / "r")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2 and "error: m2pt demo: --steps must be >= 1" in r.stderr, r


def test_demo_without_tqdm_and_matplotlib(monkeypatch, tmp_path, capsys):
    if not HAS_DEMO_DEPS:
        pytest.skip("m2pt demo needs scikit-learn and safetensors")
    for mod in ("tqdm", "tqdm.auto", "matplotlib", "matplotlib.pyplot"):
        monkeypatch.setitem(sys.modules, mod, None)  # import raises ImportError
    rc, out, _ = _run(capsys, "demo", "--out", str(tmp_path), "--aux-steps", "2", "--steps", "4", "--seeds", "1",
                      "--eval-every", "2", "--timing-repeats", "1")
    assert rc == 0
    assert "auxiliary (point clouds): 2/2" in out  # plain progress lines instead of bars
    assert "matplotlib is not installed" in out
    rep = json.loads((tmp_path / "report.json").read_text())
    assert "png" not in rep and not (tmp_path / "training_curves.png").exists()
    assert rep["target"]["summary"]["m2pt"]["test_accs"]


def test_demo_restores_torch_global_settings(tmp_path, capsys):
    if not HAS_DEMO_DEPS:
        pytest.skip("m2pt demo needs scikit-learn, matplotlib and safetensors")
    before = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled())
    rc, _, _ = _run(capsys, "demo", "--out", str(tmp_path), "--aux-steps", "1", "--steps", "2", "--seeds", "1",
                    "--eval-every", "2", "--timing-repeats", "1", "--threads", "1", "--no-progress")
    assert rc == 0
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == before


def test_demo_saves_and_restores_fp32_flags_under_the_new_api(restore_fp32_precision):
    """The demo saves torch's TF32 settings and puts them back. After torch's newer
    fp32_precision API is used, reading the legacy allow_tf32 raises: the demo reads the new one."""
    from m2pt_kernels import demo
    if not demo._FP32_NEW_API:
        pytest.skip("this torch has no fp32_precision API")
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    with pytest.raises(RuntimeError):
        torch.backends.cuda.matmul.allow_tf32  # noqa: B018 -- what the demo used to read
    flags = demo._fp32_flags()
    demo._set_fp32_flags("ieee", "ieee")
    assert demo._fp32_flags() == ("ieee", "ieee")
    demo._set_fp32_flags(*flags)
    assert demo._fp32_flags() == flags == ("tf32", torch.backends.cudnn.fp32_precision)
