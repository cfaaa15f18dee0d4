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


# ------------------------------------------------------------------ reviewer's findings (python/ examples)
def _usage_error(main, argv, capsys):
    """argparse's refusal of an option value: exit 2, the last stderr line naming the option."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2, (argv, info.value.code, err)
    return err.strip().splitlines()[-1]


BAD_TRAIN_NUMBERS = [("--batch-size", "0"), ("--synthetic-size", "0"), ("--steps", "0"), ("--lr", "0"),
                     ("--lr", "nan"), ("--scale-lr-mult", "-1"), ("--weight-decay", "-0.1"),
                     ("--weight-decay", "inf"), ("--workers", "-1"), ("--img-size", "0"), ("--patch-size", "0"),
                     ("--depth", "0"), ("--num-classes", "0"), ("--steps", "two")]


@pytest.mark.parametrize("script", ["finetune_timm_with_pathways.py", "linear_probe.py"])
def test_train_scripts_refuse_bad_numbers_up_front(script, capsys):
    """--batch-size 0 trained with loss nan and saved; --synthetic-size 0 was a traceback: every
    numeric option is checked by argparse, one line naming the option."""
    main = _script(script).main
    for opt, value in BAD_TRAIN_NUMBERS:
        line = _usage_error(main, [*TINY_TRAIN, opt, value], capsys)
        assert f"argument {opt}:" in line and repr(value) in line, (opt, value, line)


def test_merge_for_deployment_refuses_bad_numbers_up_front(tmp_path, capsys):
    main = _script("merge_for_deployment.py").main
    ckpt = tmp_path / "ft.pth"
    _pathway_checkpoint(ckpt)
    for opt, value in (("--repeats", "0"), ("--batch-size", "0"), ("--img-size", "0"), ("--patch-size", "-8"),
                       ("--depth", "0"), ("--num-classes", "-1")):
        line = _usage_error(main, [str(ckpt), str(tmp_path / "d.pth"), opt, value], capsys)
        assert f"argument {opt}:" in line, (opt, line)
    if HAS_TIMM:  # an unknown --model: refused before the merge, not after it is written
        msg, _ = _exit_message(main, [str(ckpt), str(tmp_path / "d.pth"), "--model", "no_such_model_xyz"], capsys)
        assert "--model 'no_such_model_xyz'" in msg, msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ft.pth"]  # nothing written before the checks


@pytest.mark.parametrize("suffix", [".SAFETENSORS", ".SafeTensors"])
def test_save_writes_the_format_the_package_reads(suffix, tmp_path):
    """``--out ft.SAFETENSORS`` wrote a torch pickle (a case-sensitive suffix test) that m2pt merge could
    not read: the format now follows the suffix exactly as checkpoint_format / load_checkpoint read it."""
    import argparse

    import torch

    from m2pt_kernels.pathways import load_checkpoint
    common = _script("finetune_timm_with_pathways.py").common
    model = torch.nn.Linear(3, 2)
    out = tmp_path / f"ft{suffix}"
    common.save(model, argparse.Namespace(out=str(out)), {"val_acc": 0.5})
    from safetensors.torch import load_file
    sd = load_file(str(out))  # a safetensors file, not a torch pickle
    assert sorted(sd) == ["bias", "weight"] and torch.equal(sd["weight"], model.weight.detach())
    assert sorted(load_checkpoint(out)) == ["bias", "weight"]  # what m2pt merge reads
    other = tmp_path / "ft.PTH"  # and any other suffix: the paper's {"model": state_dict, ...} pickle
    common.save(model, argparse.Namespace(out=str(other)), {"val_acc": 0.5})
    assert torch.load(other, weights_only=True)["val_acc"] == 0.5 and sorted(load_checkpoint(other)) == sorted(sd)


def test_save_failure_is_one_line_error(tmp_path):
    import argparse

    import torch
    common = _script("finetune_timm_with_pathways.py").common
    for suffix in (".pth", ".safetensors"):
        out = tmp_path / ("a" * 300 + suffix)  # longer than any file system's name limit
        with pytest.raises(SystemExit) as info:
            common.save(torch.nn.Linear(3, 2), argparse.Namespace(out=str(out)))
        msg = info.value.code
        assert isinstance(msg, str) and msg.startswith("error: --out: cannot write") and "\n" not in msg, msg


def test_checkpoint_path_refuses_a_read_only_folder(tmp_path, monkeypatch):
    """Checked before training (root may write anywhere, so the folder's refusal is simulated)."""
    common = _script("finetune_timm_with_pathways.py").common
    ro = tmp_path / "ro"
    ro.mkdir()
    real_access = os.access
    monkeypatch.setattr(common.os, "access",
                        lambda p, mode: False if os.path.realpath(p) == str(ro.resolve()) else real_access(p, mode))
    with pytest.raises(SystemExit) as info:
        common.check_checkpoint_path(str(ro / "ft.safetensors"), "--out")
    assert "not writable" in info.value.code and str(ro) in info.value.code


def test_merge_for_deployment_never_overwrites_its_input(tmp_path, capsys):
    """OUTPUT a symlink (or hard link) to the checkpoint, with --force: it used to write through it."""
    from m2pt_kernels.pathways import is_pathway_state_dict, load_checkpoint
    main = _script("merge_for_deployment.py").main
    ckpt = tmp_path / "ft.pth"
    _pathway_checkpoint(ckpt)
    before = ckpt.read_bytes()
    (tmp_path / "link.pth").symlink_to(ckpt.name)
    os.link(ckpt, tmp_path / "hard.pth")
    (tmp_path / "sub").mkdir()
    for output in (tmp_path / "link.pth", tmp_path / "hard.pth", tmp_path / "sub" / ".." / "ft.pth"):
        msg, _ = _exit_message(main, [str(ckpt), str(output), "--force"], capsys)
        assert "is the checkpoint itself" in msg, msg
    assert ckpt.read_bytes() == before and is_pathway_state_dict(load_checkpoint(ckpt))


def test_merge_for_deployment_write_failure_is_one_line(tmp_path, capsys):
    """A .safetensors that can't be written was a SafetensorError traceback (only .pth was handled)."""
    main = _script("merge_for_deployment.py").main
    ckpt = tmp_path / "ft.pth"
    _pathway_checkpoint(ckpt)
    for suffix in (".safetensors", ".pth"):
        output = tmp_path / ("a" * 300 + suffix)  # the write itself fails (name too long), even as root
        msg, out = _exit_message(main, [str(ckpt), str(output)], capsys)
        assert "cannot write" in msg and "\n" not in msg and "merged" not in out, (suffix, msg)


def _torchrun_module():
    return _script("train_torchrun.py")


def test_train_torchrun_refuses_bad_options_before_setup(tmp_path, monkeypatch, capsys):
    """--log-every 0 was a ZeroDivisionError, --kernel-backend triton without a GPU a traceback after setup,
    --save into a missing folder failed after training: all are refused before the process group starts."""
    import m2pt_kernels
    example = _torchrun_module()
    (tmp_path / "a_folder.pt").mkdir()

    def no_setup():
        raise AssertionError("init_distributed reached: the option was not checked up front")

    monkeypatch.setattr(example, "init_distributed", no_setup)
    for opt, value in (("--log-every", "0"), ("--steps", "0"), ("--batch-size", "0"), ("--grad-accum", "0"),
                       ("--lr", "-1e-3"), ("--scale-lr-mult", "0"), ("--weight-decay", "nan"), ("--heads", "0"),
                       ("--img-size", "0"), ("--num-classes", "0")):
        line = _usage_error(example.main, [opt, value], capsys)
        assert f"argument {opt}:" in line, (opt, line)
    bad = [(["--save", str(tmp_path / "nodir" / "m.pt")], "does not exist"),
           (["--save", str(tmp_path / "m.txt")], "'.txt'"),
           (["--save", str(tmp_path / "a_folder.pt")], "folder"),
           (["--embed-dim", "30", "--heads", "4"], "--embed-dim 30 is not divisible by --heads 4"),
           (["--img-size", "30", "--patch-size", "4"], "--img-size 30 is not a multiple of --patch-size 4"),
           (["--aux-checkpoint", str(tmp_path / "missing.pt")], "no such file")]
    (tmp_path / "aux.pt").write_bytes(b"x")
    bad.append((["--aux-checkpoint", str(tmp_path / "aux.pt"), "--save", str(tmp_path / "sub" / ".." / "aux.pt")],
                "--save " + repr(str(tmp_path / "sub" / ".." / "aux.pt")) + " is the --aux-checkpoint file itself"))
    (tmp_path / "sub").mkdir()
    missing = [name for name, (ok, _) in m2pt_kernels.backend_status().items() if not ok]
    if missing:
        bad.append((["--kernel-backend", missing[0]], f"--kernel-backend {missing[0]} is not available"))
    for argv, in_msg in bad:
        msg, _ = _exit_message(example.main, argv, capsys)
        assert in_msg in msg and "\n" not in msg, (argv, msg)


def test_train_torchrun_optimizer_uses_param_groups():
    """λ got AdamW's weight decay (pulled towards 0) and the base lr, as did norms and biases: the
    optimizer is pathways.param_groups (λ: no decay, lr x --scale-lr-mult; decay on matrices only)."""
    import torch
    example = _torchrun_module()
    tiny = ["--embed-dim", "16", "--depth", "1", "--heads", "2", "--img-size", "16", "--lr", "1e-3",
            "--weight-decay", "0.1", "--scale-lr-mult", "20"]
    for extra in ([], ["--only-scales"]):
        args = example.parse_args([*tiny, *extra])
        model = example.build_model(args, torch.device("cpu"))
        opt = example.make_optimizer(model, args)
        group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        assert set(group_of) == {id(p) for p in trainable.values()}, extra
        for name, p in trainable.items():
            g = group_of[id(p)]
            if name.endswith("cross_modal_scale"):
                assert g["weight_decay"] == 0 and g["lr"] == pytest.approx(2e-2), name
            elif p.dim() < 2 or "pos_embed" in name or "cls_token" in name:
                assert g["weight_decay"] == 0 and g["lr"] == pytest.approx(1e-3), name
            else:
                assert g["weight_decay"] == 0.1 and g["lr"] == pytest.approx(1e-3), name
        if extra:  # linear probing: λ and the head only
            assert all(n.endswith("cross_modal_scale") or n.startswith("head.") for n in trainable), list(trainable)


def test_train_torchrun_save_follows_the_suffix(tmp_path):
    """--save tr.safetensors wrote a torch pickle; --save into an unwritable path was a traceback after
    training. One process (no torchrun): the format follows the suffix and m2pt merge reads it."""
    import json

    import torch

    from m2pt_kernels.pathways import load_checkpoint
    tiny = ["--steps", "1", "--embed-dim", "16", "--depth", "1", "--heads", "2", "--img-size", "16",
            "--batch-size", "2"]
    script = os.path.join(ROOT, "python", "train_torchrun.py")
    saved = tmp_path / "tr.SafeTensors"
    proc = _run([script, *tiny, "--save", str(saved)], timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["saved"] == str(saved)
    from safetensors.torch import load_file
    sd = load_file(str(saved))  # a safetensors file, not a pickle
    assert any(k.endswith("cross_modal_scale") for k in sd) and all(isinstance(v, torch.Tensor) for v in sd.values())
    assert sorted(load_checkpoint(saved)) == sorted(sd)
    proc = _run(["-m", "m2pt_kernels", "merge", str(saved), str(tmp_path / "merged.pth")])
    assert proc.returncode == 0, proc.stdout + proc.stderr

    too_long = tmp_path / ("a" * 300 + ".safetensors")  # passes the up-front checks, the write fails
    proc = _run([script, *tiny, "--save", str(too_long)], timeout=180)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --save: cannot write"), proc.stderr


@pytest.mark.parametrize("script", ["finetune_timm_with_pathways.py", "linear_probe.py"])
def test_train_scripts_check_inputs_before_training(script, tmp_path, capsys):
    """A missing --target-checkpoint was a FileNotFoundError traceback; --out naming an input
    checkpoint overwrote it after training; a patch larger than the image failed in the first step."""
    main = _script(script).main
    ckpt = tmp_path / "target.pth"
    _pathway_checkpoint(ckpt)
    (tmp_path / "link.pth").symlink_to(ckpt.name)
    bad = [(["--target-checkpoint", str(tmp_path / "missing.pth")], "--target-checkpoint"),
           (["--aux-checkpoint", str(tmp_path / "missing.pth")], "--aux-checkpoint"),
           (["--target-checkpoint", str(ckpt), "--out", str(tmp_path / "link.pth")], "is the --target-checkpoint"),
           (["--aux-checkpoint", str(ckpt), "--out", str(ckpt)], "is the --aux-checkpoint")]
    if HAS_TIMM:
        bad.append((["--patch-size", "64"], "--patch-size 64 is larger than the image"))
    before = ckpt.read_bytes()
    for extra, in_msg in bad:
        msg, out = _exit_message(main, [*TINY_TRAIN, *extra], capsys)
        assert in_msg in msg and "\n" not in msg and "step " not in out, (extra, msg, out)
    assert ckpt.read_bytes() == before
