"""The CUDA backend's build and load logic, on the CPU and without compiling anything.

- setup.py's decision (build the extension or not) from the switches and the toolchain found,
  independent of any GPU; the default arch list; the wheel's local version label.
- The package without the extension, and an extension built against another torch (refused with a
  warning before it is loaded, never a crash).
- If the extension is built here: its build record, what availability() says without a GPU, and
  the argument checks of the bindings (they run before any launch, so CPU tensors reach them).
Compiling is the CI step .ci/steps/cuda_wheel.sh, not this file.
"""
import importlib.util
import os
import warnings

import pytest
import torch

import m2pt_kernels
from m2pt_kernels import backend_status, cross_modal_linear
from m2pt_kernels.ops import cross_modal_linear_cuda as cuda_backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup_module_():
    """setup.py imported as a module (its setup() call is under ``if __name__ == "__main__"``)."""
    spec = importlib.util.spec_from_file_location("m2pt_setup_under_test", os.path.join(ROOT, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def fresh_loader():
    """Clear the cached load result before and after a test that fakes the extension's state."""
    cuda_backend._load.cache_clear()
    yield
    cuda_backend._load.cache_clear()


# ---- setup.py: when the extension is built -------------------------------------------------------

GOOD = dict(torch_available=True, torch_cuda_version="13.0", cuda_home="/usr/local/cuda",
            nvcc_path="/usr/local/cuda/bin/nvcc")


def test_builds_with_toolchain_and_no_gpu(setup_module_):
    build, why = setup_module_.decide_cuda_build({}, **GOOD)
    assert build, why


@pytest.mark.parametrize("value", ["1", "true", "yes"])
def test_skip_switch(setup_module_, value):
    build, why = setup_module_.decide_cuda_build({"M2PT_SKIP_CUDA_BUILD": value}, **GOOD)
    assert not build and "M2PT_SKIP_CUDA_BUILD" in why


@pytest.mark.parametrize("value", ["", "0", "false"])
def test_switches_off_values(setup_module_, value):
    env = {"M2PT_SKIP_CUDA_BUILD": value, "M2PT_FORCE_CUDA_BUILD": value}
    assert setup_module_.decide_cuda_build(env, **GOOD)[0]


@pytest.mark.parametrize("missing,expected", [
    (dict(torch_available=False, torch_cuda_version=None), "no-build-isolation"),
    (dict(torch_cuda_version=None), "CPU build"),
    (dict(cuda_home=None, nvcc_path=None), "CUDA_HOME"),
    (dict(nvcc_path=None), "nvcc"),
])
def test_pure_python_fallback_and_force(setup_module_, missing, expected):
    found = {**GOOD, **missing}
    build, why = setup_module_.decide_cuda_build({}, **found)
    assert not build and expected in why
    with pytest.raises(RuntimeError, match="M2PT_FORCE_CUDA_BUILD=1 but the CUDA extension can't be built") as err:
        setup_module_.decide_cuda_build({"M2PT_FORCE_CUDA_BUILD": "1"}, **found)
    assert expected in str(err.value)


@pytest.mark.parametrize("arch_list,kept", [
    ("8.0+PTX;9.0a", ["8.0+PTX", "9.0a"]),
    ("5.2 6.0 6.1 7.0 7.2 7.5 8.0 8.6 8.7 9.0+PTX", ["8.0", "8.6", "8.7", "9.0+PTX"]),  # an NGC-style list
    ("Turing;Ampere;Hopper", ["Ampere", "Hopper"]),
    ("8.9 9.0a 10.0 12.0", ["8.9", "9.0a", "10.0", "12.0"]),
    ("7.0;7.5+PTX", []),
])
def test_arch_list_keeps_sm80_and_newer(setup_module_, arch_list, kept):
    got, dropped = setup_module_.split_arch_list(arch_list)
    assert got == kept
    assert sorted(got + dropped) == sorted(e for e in arch_list.replace(";", " ").split())


@pytest.mark.parametrize("force", [False, True])
def test_arch_list_without_sm80_builds_no_extension(setup_module_, monkeypatch, capsys, force):
    """nvcc fails on the kernels below sm_80: such a list gives the pure-Python package with the reason
    (an error when the build is forced), and a mixed list builds the sm_80+ part and says what it left out."""
    monkeypatch.setattr(setup_module_, "probe_toolchain", lambda: tuple(GOOD.values()))
    monkeypatch.setattr(setup_module_, "write_build_info", lambda *a: "unused")  # not the tree's header
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "7.0 7.5")
    if force:
        monkeypatch.setenv("M2PT_FORCE_CUDA_BUILD", "1")
        with pytest.raises(RuntimeError, match="names no arch of 8.0 or newer"):
            setup_module_.cuda_extension_setup_kwargs(["build_ext"])
        return
    monkeypatch.delenv("M2PT_FORCE_CUDA_BUILD", raising=False)
    assert setup_module_.cuda_extension_setup_kwargs(["build_ext"]) == ({}, "")
    err = capsys.readouterr().err
    assert "leaving out 7.0, 7.5" in err and "no CUDA extension" in err and "names no arch of 8.0" in err
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "7.5 8.0 9.0a")
    kwargs, _ = setup_module_.cuda_extension_setup_kwargs(["build_ext"])
    assert kwargs["ext_modules"] and os.environ["TORCH_CUDA_ARCH_LIST"] == "8.0;9.0a"
    assert "leaving out 7.5" in capsys.readouterr().err


def test_skip_and_force_contradict(setup_module_):
    with pytest.raises(RuntimeError, match="contradict"):
        setup_module_.decide_cuda_build({"M2PT_SKIP_CUDA_BUILD": "1", "M2PT_FORCE_CUDA_BUILD": "1"}, **GOOD)


def test_probe_on_this_machine_ignores_gpu_visibility(setup_module_, monkeypatch):
    """Whatever this machine has, the decision never depends on torch.cuda.is_available()."""
    monkeypatch.delenv("CUDA_HOME", raising=False)  # probe_toolchain sets it; restored after the test
    found = setup_module_.probe_toolchain()
    build, _ = setup_module_.decide_cuda_build({}, *found)
    torch_ok, torch_cuda, cuda_home, nvcc = found
    assert build == bool(torch_ok and torch_cuda and cuda_home and nvcc)


def test_local_version(setup_module_):
    assert setup_module_.local_version("2.14.1+cu130", "13.0") == "+cu130torch2.14"
    assert setup_module_.local_version("2.11.0", "12.8") == "+cu128torch2.11"


def test_default_arch_list_covers_sm80_sm90a_and_ptx(setup_module_, monkeypatch):
    from torch.utils.cpp_extension import _get_cuda_arch_flags
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", setup_module_.DEFAULT_ARCH_LIST)
    flags = _get_cuda_arch_flags()
    assert "-gencode=arch=compute_80,code=sm_80" in flags
    assert "-gencode=arch=compute_90a,code=sm_90a" in flags  # wgmma-capable Hopper code
    assert "-gencode=arch=compute_80,code=compute_80" in flags  # PTX the driver JITs for newer GPUs


def test_find_cuda_toolkit_prefers_env(setup_module_):
    assert setup_module_.find_cuda_toolkit({"CUDA_HOME": "/opt/cuda-x"}) == "/opt/cuda-x"
    assert setup_module_.find_cuda_toolkit({"CUDA_PATH": "/opt/cuda-y"}) == "/opt/cuda-y"


def test_extension_sources_exist(setup_module_):
    for src in setup_module_.EXT_SOURCES:
        assert os.path.exists(os.path.join(ROOT, src)), src


def test_sdist_carries_csrc_and_no_local_version(tmp_path):
    """The source distribution builds the extension elsewhere: every file of csrc/ (headers too) is
    in it, and its version names no torch / CUDA (it is built against none)."""
    import subprocess
    import sys
    import tarfile
    pytest.importorskip("setuptools")  # venvs of Python >= 3.12 come without it
    proc = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (archive,) = tmp_path.iterdir()
    assert archive.name == "m2pt_kernels-0.1.0.tar.gz"
    with tarfile.open(archive) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    csrc = {os.path.relpath(os.path.join(d, f), ROOT) for d, _, fs in os.walk(os.path.join(ROOT, "csrc"))
            for f in fs if not f.endswith((".pyc", ".so", ".o"))}
    assert csrc and not csrc - names, sorted(csrc - names)
    assert {"setup.py", "pyproject.toml", "README.md", "m2pt_kernels/ops/cross_modal_linear.py"} <= names


# ---- loading: without the extension, or with a mismatched one ------------------------------------

def test_package_works_without_extension(monkeypatch, fresh_loader):
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == cuda_backend.EXTENSION else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    ok, why = backend_status()["cuda"]
    assert not ok and "not built" in why
    assert "cuda" not in m2pt_kernels.available_backends()
    x, w, a = torch.randn(3, 8), torch.randn(5, 8), torch.randn(5, 8)
    s = torch.randn(1)
    with m2pt_kernels.use_backend("reference"):
        y = cross_modal_linear(x, w, a, s)
    torch.testing.assert_close(y, x @ (w + s * a).t())
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available: the extension .* is not built"):
        with m2pt_kernels.use_backend("cuda"):
            pass


def _fake_library(tmp_path, record):
    path = tmp_path / "_C.fake.so"
    path.write_bytes(b"\x7fELF" + os.urandom(64) + record + b"\x00" + os.urandom(64))
    return str(path)


def test_version_mismatch_warns_and_never_loads(tmp_path, monkeypatch):
    path = _fake_library(tmp_path, b"M2PT_BUILD_INFO;torch=1.13.1+cu117;cuda=11.7;archs=8.0;END")

    def no_import(name, *args, **kwargs):
        raise AssertionError(f"{name} was imported despite the version mismatch")

    monkeypatch.setattr(cuda_backend.importlib, "import_module", no_import)
    with pytest.warns(RuntimeWarning, match=r"built against torch 1\.13\.1\+cu117 but torch .* is running"):
        ext, why = cuda_backend.load_extension(path)
    assert ext is None and "rebuild" in why


def test_missing_build_record_warns(tmp_path):
    path = _fake_library(tmp_path, b"")
    with pytest.warns(RuntimeWarning, match="no build record"):
        ext, why = cuda_backend.load_extension(path)
    assert ext is None


def test_version_mismatch_rules():
    built = {"torch": "2.14.1+cu130", "cuda": "13.0", "archs": "9.0a"}
    assert cuda_backend.version_mismatch(built, "2.14.0", "13.0") is None  # patch releases share the ABI
    assert cuda_backend.version_mismatch(built, "2.14.1+cu130", "13.1") is None
    assert "torch 2.11.0" in cuda_backend.version_mismatch(built, "2.11.0", "13.0")
    assert "CUDA 13.0" in cuda_backend.version_mismatch(built, "2.14.1", "12.8")


def test_mismatch_through_backend_status(monkeypatch, fresh_loader, tmp_path):
    """The whole path: backend_status reports the mismatch, with a warning, and the package still works."""
    path = _fake_library(tmp_path, b"M2PT_BUILD_INFO;torch=2.0.0;cuda=11.8;archs=8.0;END")

    class Spec:
        origin = path

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: Spec() if name == cuda_backend.EXTENSION else real_find_spec(name, *a, **k))
    with pytest.warns(RuntimeWarning, match="cuda backend disabled"):
        ok, why = backend_status()["cuda"]
    assert not ok and "torch 2.0.0" in why
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once, not at every call
        assert not backend_status()["cuda"][0]


# ---- the built extension (skipped when it is not built here) -------------------------------------

def _built():
    cuda_backend._load.cache_clear()
    ext, why = cuda_backend._load()
    return ext, why


_EXT, _WHY = _built()
needs_extension = pytest.mark.skipif(_EXT is None, reason=f"extension not built here: {_WHY}")


@needs_extension
def test_build_record_matches_running_torch():
    info = cuda_backend.read_build_info(importlib.util.find_spec(cuda_backend.EXTENSION).origin)
    assert info["torch"] == _EXT.TORCH_VERSION == torch.__version__
    assert info["cuda"] == _EXT.CUDA_VERSION == torch.version.cuda
    assert hasattr(torch.ops.m2pt_cuda, "forward") and hasattr(torch.ops.m2pt_cuda, "wgrad")


@needs_extension
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without a GPU")
def test_built_but_no_device():
    ok, why = backend_status()["cuda"]
    assert not ok and "built" in why and "no CUDA device" in why


def _args(m=3, k=8, n=5, dtype=torch.float32):
    return torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype), torch.randn(n, k, dtype=dtype), torch.randn(1)


@needs_extension
@pytest.mark.parametrize("call,message", [
    (lambda x, w, a, s: torch.ops.m2pt_cuda.forward(x, w, a, s, None, False),
     r"m2pt cuda forward: x is on cpu; the cuda backend needs CUDA tensors"),
    (lambda x, w, a, s: torch.ops.m2pt_cuda.forward(x, w, torch.randn(5, 9), s, None, False),
     r"m2pt cuda forward: weight has shape \[5, 8\] but aux_weight has shape \[5, 9\]"),
    (lambda x, w, a, s: torch.ops.m2pt_cuda.forward(x[:, :7], w, a, s, None, False),
     r"m2pt cuda forward: x has shape \[3, 7\]; expected \[M, 8\] \(in_features K of weight \[5, 8\]\)"),
    (lambda x, w, a, s: torch.ops.m2pt_cuda.forward(x, w, a, torch.randn(4), None, False),
     r"cross_modal_scale has shape \[4\]; expected \[1\] or \[5\]"),
    (lambda x, w, a, s: torch.ops.m2pt_cuda.forward(x, w, a, s.double(), None, False),
     r"cross_modal_scale is float64; the kernels read λ as float32"),
    (lambda x, w, a, s: torch.ops.m2pt_cuda.forward(x, w, a.half(), s, None, False),
     r"weight is float32 but aux_weight is float16"),
    (lambda x, w, a, s: torch.ops.m2pt_cuda.forward(x.half(), w, a, s, None, False),
     r"x is float16 but weight is float32"),
    (lambda x, w, a, s: torch.ops.m2pt_cuda.forward(x.double(), w.double(), a.double(), s, None, False),
     r"weight is float64; the cuda backend computes float32, bfloat16 and float16"),
    (lambda x, w, a, s: torch.ops.m2pt_cuda.forward(x, w.t().contiguous().t(), a, s, None, False),
     r"weight with shape \[5, 8\] and strides \[1, 5\] is not contiguous"),
    (lambda x, w, a, s: torch.ops.m2pt_cuda.forward(x, w, a, s, torch.randn(6), False),
     r"bias has shape \[6\]; expected \[5\]"),
    (lambda x, w, a, s: torch.ops.m2pt_cuda.dgrad(torch.randn(3, 4), w, a, s, False),
     r"m2pt cuda dgrad: dy has shape \[3, 4\]; expected \[M, 5\]"),
    (lambda x, w, a, s: torch.ops.m2pt_cuda.dgrad(torch.randn(3, 5), w, a, s, False),
     r"m2pt cuda dgrad: dy is on cpu"),
    (lambda x, w, a, s: torch.ops.m2pt_cuda.wgrad(torch.randn(4, 5), x, a, s, True, True, True, True, False),
     r"m2pt cuda wgrad: dy has shape \[4, 5\] but x has shape \[3, 8\]; they must have the same number of rows"),
    (lambda x, w, a, s: torch.ops.m2pt_cuda.wgrad(torch.randn(3, 5), x, a, s, False, False, True, False, False),
     r"m2pt cuda wgrad: dy is on cpu"),
])
def test_binding_argument_checks(call, message):
    with pytest.raises(RuntimeError, match=message):
        call(*_args())


# ---- setup.py helpers: toolkit discovery, headers, build record ------------------------------------

def test_find_cuda_toolkit_through_wrapper_script(setup_module_, tmp_path):
    """An nvcc wrapper script (like /usr/local/bin/nvcc here): the root comes from `nvcc -dryrun`."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    nvcc = bindir / "nvcc"
    nvcc.write_text("#!/bin/sh\necho '#$ TOP=/opt/fake-cuda-13.0/bin/..' >&2\n")
    nvcc.chmod(0o755)
    assert setup_module_.find_cuda_toolkit({"PATH": str(bindir)}) == "/opt/fake-cuda-13.0"


def test_nvidia_headers_only_when_toolkit_lacks_them(setup_module_, tmp_path):
    full = tmp_path / "full"
    (full / "include").mkdir(parents=True)
    (full / "include" / "cusparse.h").write_text("")
    assert setup_module_.nvidia_include_dirs(str(full)) == []
    found = setup_module_.nvidia_include_dirs(str(tmp_path / "minimal"))
    assert all(os.path.isdir(d) and os.sep + "nvidia" + os.sep in d for d in found)
    if importlib.util.find_spec("nvidia") is not None and any(
            os.path.exists(os.path.join(d, "cusparse.h")) for d in found):
        assert any(os.path.exists(os.path.join(d, "cuda_runtime_api.h")) for d in found)


def test_build_record_header(setup_module_, tmp_path, monkeypatch):
    monkeypatch.setattr(setup_module_, "HERE", str(tmp_path))
    out = setup_module_.write_build_info("2.14.1+cu130", "13.0", "8.0+PTX;9.0a")
    text = open(os.path.join(out, "m2pt_build_info.h")).read()
    assert '#define M2PT_BUILD_TORCH_VERSION "2.14.1+cu130"' in text
    assert '#define M2PT_BUILD_CUDA_VERSION "13.0"' in text
    assert '#define M2PT_BUILD_CUDA_ARCHS "8.0+PTX;9.0a"' in text
    # The loader parses what the C++ side makes of these defines.
    record = b"M2PT_BUILD_INFO;torch=2.14.1+cu130;cuda=13.0;archs=8.0+PTX;9.0a;END"
    path = tmp_path / "lib.so"
    path.write_bytes(b"\x00" + record + b"\x00")
    assert cuda_backend.read_build_info(str(path)) == {"torch": "2.14.1+cu130", "cuda": "13.0",
                                                       "archs": "8.0+PTX;9.0a"}
