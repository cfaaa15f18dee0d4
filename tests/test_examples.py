"""The example scripts in python/, run as a user would: ``--help`` and a tiny synthetic run each."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("finetune_timm_with_pathways.py", "linear_probe.py", "merge_for_deployment.py")
TINY_MODEL = ["--img-size", "32", "--patch-size", "8", "--depth", "2"]
TINY_TRAIN = ["--synthetic", "--synthetic-size", "64", "--steps", "4", "--batch-size", "16", "--device", "cpu",
              *TINY_MODEL]
HAS_TIMM = __import__("importlib").util.find_spec("timm") is not None
needs_timm = pytest.mark.skipif(not HAS_TIMM, reason="the examples' runs need timm")


def _run(args, timeout=240, **kw):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=kw.get("cwd", ROOT))
    return proc


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script):
    proc = _run([os.path.join("python", script), "--help"])
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout and "Examples:" in proc.stdout


@needs_timm
def test_finetune_then_merge_for_deployment(tmp_path):
    ckpt, merged = tmp_path / "ft.pth", tmp_path / "deploy.safetensors"
    proc = _run([os.path.join(ROOT, "python", "finetune_timm_with_pathways.py"), *TINY_TRAIN, "--out", str(ckpt)],
                cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "8 pathway layers" in proc.stdout and "validation accuracy" in proc.stdout
    assert "learned λ over 8 layers" in proc.stdout and ckpt.exists()

    proc = _run([os.path.join(ROOT, "python", "merge_for_deployment.py"), str(ckpt), str(merged),
                 "--model", "vit_tiny_patch16_224", *TINY_MODEL, "--repeats", "2"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "merged 8 pathway layers" in proc.stdout and "verified: strict load" in proc.stdout
    # refuses to overwrite, and refuses a checkpoint without pathways
    proc = _run([os.path.join(ROOT, "python", "merge_for_deployment.py"), str(ckpt), str(merged)])
    assert proc.returncode != 0 and "exists" in proc.stderr
    proc = _run([os.path.join(ROOT, "python", "merge_for_deployment.py"), str(merged), str(tmp_path / "again.pth")])
    assert proc.returncode != 0 and "no pathways" in proc.stderr


@needs_timm
def test_linear_probe_trains_only_scales_and_head(tmp_path):
    out = tmp_path / "probe.safetensors"
    proc = _run([os.path.join(ROOT, "python", "linear_probe.py"), *TINY_TRAIN, "--out", str(out)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "training 8 λ tensors + head" in proc.stdout
    assert "frozen tensors unchanged" in proc.stdout and "8 W' buffers" in proc.stdout and out.exists()


def test_clear_message_without_timm(tmp_path):
    code = ("import runpy, sys; sys.modules['timm'] = None; "
            f"sys.argv = ['linear_probe.py', *{TINY_TRAIN!r}]; "
            f"runpy.run_path({os.path.join(ROOT, 'python', 'linear_probe.py')!r}, run_name='__main__')")
    proc = _run(["-c", code])
    assert proc.returncode == 1 and "needs timm" in proc.stderr and "Traceback" not in proc.stderr


def _script(name):
    """An example script imported as a module, to call its main(argv) in-process (fast)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"example_{name[:-3]}", os.path.join(ROOT, "python", name))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _exit_message(main, argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    out = capsys.readouterr().out
    assert isinstance(info.value.code, str) and info.value.code.startswith("error: "), info.value.code
    return info.value.code, out


@pytest.mark.parametrize("script", ["finetune_timm_with_pathways.py", "linear_probe.py"])
def test_train_scripts_check_out_and_device_before_training(script, tmp_path, capsys):
    main = _script(script).main
    bad = [(["--out", str(tmp_path / "nodir" / "ft.pth")], str(tmp_path / "nodir")),
           (["--out", str(tmp_path / "ft.txt")], "'.txt'")]  # m2pt merge would refuse it
    if not __import__("torch").cuda.is_available():
        bad.append((["--device", "cuda"], "--device cuda"))
    for extra, in_msg in bad:
        argv = [*TINY_TRAIN, *extra]
        if "--device" in extra:
            argv.remove("--device"), argv.remove("cpu")
        msg, out = _exit_message(main, argv, capsys)
        assert in_msg in msg and "step " not in out and "pathway layers" not in out, (extra, msg, out)
    assert not (tmp_path / "ft.txt").exists()


def _pathway_checkpoint(path, aux_shape=(4, 3)):
    import torch
    torch.save({"model": {"blk.weight": torch.randn(4, 3), "blk.bias": torch.zeros(4),
                          "blk.aux_weight": torch.randn(*aux_shape), "blk.cross_modal_scale": torch.ones(1)}}, path)


def test_merge_for_deployment_bad_output_or_checkpoint(tmp_path, capsys):
    main = _script("merge_for_deployment.py").main
    ckpt, bad = tmp_path / "ft.pth", tmp_path / "bad.pth"
    _pathway_checkpoint(ckpt)
    _pathway_checkpoint(bad, aux_shape=(2, 5))
    (tmp_path / "a_folder.pth").mkdir()
    for output, in_msg in ((tmp_path / "deploy.txt", "'.txt'"), (tmp_path / "nodir" / "x.pth", "does not exist"),
                           (tmp_path / "a_folder.pth", "folder")):
        msg, _ = _exit_message(main, [str(ckpt), str(output), "--force"], capsys)
        assert str(output) in msg and in_msg in msg, msg
    msg, _ = _exit_message(main, [str(bad), str(tmp_path / "deploy.pth")], capsys)
    assert "cannot merge" in msg and "blk" in msg and "[2, 5]" in msg, msg
    if not __import__("torch").cuda.is_available():
        msg, _ = _exit_message(main, [str(ckpt), str(tmp_path / "d.pth"), "--model", "vit_tiny_patch16_224",
                                      "--device", "cuda"], capsys)
        assert "--device cuda" in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_folder.pth", "bad.pth", "ft.pth"]
    assert main([str(ckpt), str(tmp_path / "deploy.pth")]) == 0  # the good checkpoint still merges


@needs_timm
def test_linear_probe_checks_the_frozen_aux_buffers(monkeypatch, tmp_path, capsys):
    """A frozen W' (a buffer, not a parameter) that changes during training is caught."""
    import torch

    from m2pt_kernels import FusedCrossModalLinear
    probe = _script("linear_probe.py")
    train = probe.common.train

    def train_and_touch_aux(model, *a, **kw):
        acc = train(model, *a, **kw)
        layer = next(m for m in model.modules() if isinstance(m, FusedCrossModalLinear))
        assert not isinstance(layer.aux_weight, torch.nn.Parameter)  # frozen W' is a buffer
        with torch.no_grad():
            layer.aux_weight.add_(1.0)
        return acc

    monkeypatch.setattr(probe.common, "train", train_and_touch_aux)
    msg, _ = _exit_message(probe.main, [*TINY_TRAIN, "--steps", "1"], capsys)
    assert "frozen tensors changed" in msg and "aux_weight" in msg, msg


def _doc_commands(script):
    """The commands of a script's docstring 'Examples:', as argument lists (without 'python')."""
    import ast
    import shlex
    with open(os.path.join(ROOT, "python", script)) as f:
        doc = ast.get_docstring(ast.parse(f.read()))
    text = doc.split("Examples:", 1)[1].replace("\\\n", " ")
    return [shlex.split(line, comments=True)[1:] for line in text.splitlines() if line.strip().startswith("python ")]


@needs_timm
def test_docstring_examples_chain(tmp_path):
    """finetune's pipeline check writes the checkpoint that merge_for_deployment's first example verifies."""
    finetune, merge = _doc_commands("finetune_timm_with_pathways.py")[0], _doc_commands("merge_for_deployment.py")[0]
    finetune += ["--steps", "2"]  # fewer steps than written (argparse: the last one wins); the chain is the same
    for cmd in (finetune, merge):
        proc = _run([os.path.join(ROOT, *cmd[0].split("/")), *cmd[1:]], cwd=str(tmp_path))
        assert proc.returncode == 0, (cmd, proc.stdout + proc.stderr)
    assert "verified: strict load" in proc.stdout
