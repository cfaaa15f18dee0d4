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
    assert "frozen parameters unchanged" in proc.stdout and out.exists()


def test_clear_message_without_timm(tmp_path):
    code = ("import runpy, sys; sys.modules['timm'] = None; "
            f"sys.argv = ['linear_probe.py', *{TINY_TRAIN!r}]; "
            f"runpy.run_path({os.path.join(ROOT, 'python', 'linear_probe.py')!r}, run_name='__main__')")
    proc = _run(["-c", code])
    assert proc.returncode == 1 and "needs timm" in proc.stderr and "Traceback" not in proc.stderr
