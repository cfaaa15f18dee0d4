"""m2pt_kernels: fused GPU kernels for the Multimodal Pathway method (M2PT, CVPR 2024).

The package is pure Python; the CUDA backend (``m2pt_kernels._C``, sources in ``csrc/``) is built
when torch is importable at build time, ``torch.version.cuda`` is set and a CUDA toolchain (nvcc)
is found -- whether a GPU is visible does not matter (wheels are built on machines without one).

Switches (environment variables):
    M2PT_SKIP_CUDA_BUILD=1    pure-Python package, never compile
    M2PT_FORCE_CUDA_BUILD=1   build the extension or fail loudly saying why it can't
    TORCH_CUDA_ARCH_LIST      default "8.0+PTX;9.0a": sm_80 and sm_90a code, plus compute_80 PTX
                              that the driver compiles for newer GPUs; entries below 8.0 are
                              left out (the kernels need Ampere or newer)
    MAX_JOBS                  parallel compile jobs (read by torch's BuildExtension / ninja)
    NVCC_THREADS              nvcc --threads (default 1)
    M2PT_CUDA_VERBOSE=1       nvcc -Xptxas -v -lineinfo: registers / spills / smem of every kernel

pyproject.toml's build-system does not require torch (an isolated build would download a
multi-GB CUDA torch), so ``pip install .`` with build isolation gives the pure-Python package;
build the extension next to an installed torch with
``pip wheel --no-build-isolation .`` or ``python setup.py build_ext --inplace``.
"""
import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

VERSION = "0.1.0"
DEFAULT_ARCH_LIST = "8.0+PTX;9.0a"
HERE = os.path.dirname(os.path.abspath(__file__))
EXT_SOURCES = ["csrc/cross_modal_linear.cu", "csrc/cross_modal_linear_api.cpp"]

TEST_EXTRAS = [
    "pytest>=7",
    "pytest-benchmark>=4",
    "numpy",
    "safetensors",
    "timm",
    "transformers",
    "scikit-learn",
    "matplotlib",
    "tqdm",
]
DEMO_EXTRAS = ["scikit-learn", "matplotlib", "tqdm", "safetensors"]


def _flag(env, name):
    value = env.get(name, "").strip().lower()
    return value not in ("", "0", "false", "no", "off")


def decide_cuda_build(env, torch_available, torch_cuda_version, cuda_home, nvcc_path):
    """(build the extension?, why) from the switches and what was found; raises when forced but impossible.

    Pure function of its arguments so the tests can drive it: ``env`` is a mapping like os.environ,
    ``torch_cuda_version`` is ``torch.version.cuda`` (None for a CPU torch), ``cuda_home`` torch's
    CUDA_HOME and ``nvcc_path`` the nvcc found there (None if none).
    """
    skip, force = _flag(env, "M2PT_SKIP_CUDA_BUILD"), _flag(env, "M2PT_FORCE_CUDA_BUILD")
    if skip and force:
        raise RuntimeError("m2pt_kernels setup: M2PT_SKIP_CUDA_BUILD=1 and M2PT_FORCE_CUDA_BUILD=1 contradict "
                           "each other; unset one")
    if skip:
        return False, "M2PT_SKIP_CUDA_BUILD=1: pure-Python package"
    if not torch_available:
        problem = ("torch is not importable at build time (an isolated pip build never has it; build the "
                   "extension with `pip wheel --no-build-isolation .` next to an installed torch)")
    elif not torch_cuda_version:
        problem = "the installed torch is a CPU build (torch.version.cuda is None)"
    elif not cuda_home or not nvcc_path:
        problem = "no CUDA toolchain found (set CUDA_HOME to a CUDA toolkit with bin/nvcc, or put nvcc on PATH)"
    else:
        return True, f"torch CUDA {torch_cuda_version}, nvcc {nvcc_path}"
    if force:
        raise RuntimeError(f"m2pt_kernels setup: M2PT_FORCE_CUDA_BUILD=1 but the CUDA extension can't be built: "
                           f"{problem}")
    return False, f"pure-Python package: {problem}"


# torch's named arch sets (torch.utils.cpp_extension) that are all below sm_80
_PRE_AMPERE_NAMES = {"kepler+tesla", "kepler", "maxwell+tegra", "maxwell", "pascal", "volta+tegra", "volta",
                     "turing"}


def split_arch_list(arch_list):
    """(the TORCH_CUDA_ARCH_LIST entries the kernels can be built for, those they can't).

    The kernels use bf16 / TF32 tensor cores (WMMA) and cp.async: sm_80 (Ampere) or newer. nvcc
    stops with errors on an older arch, and many containers export a list that starts at 5.x or 7.x,
    so older entries are dropped from the build (setup says which) rather than failing it.
    Entries: ``8.0``, ``9.0a``, ``8.6+PTX``, or torch's names (``Ampere``, ``Turing``, ...)."""
    kept, dropped = [], []
    for entry in re.split(r"[;\s]+", arch_list.strip()):
        if not entry:
            continue
        match = re.fullmatch(r"(\d+)\.(\d+)[a-z]?(\+PTX)?", entry)
        old = (int(match.group(1)), int(match.group(2))) < (8, 0) if match else entry.lower() in _PRE_AMPERE_NAMES
        (dropped if old else kept).append(entry)
    return kept, dropped


def find_cuda_toolkit(env):
    """Root of the CUDA toolkit: $CUDA_HOME / $CUDA_PATH, else the nvcc on PATH.

    nvcc may be a wrapper script (e.g. /usr/local/bin/nvcc exec-ing /usr/local/cuda-13.0/bin/nvcc),
    which makes torch guess CUDA_HOME=/usr/local, a directory without the CUDA headers; nvcc's own
    ``-dryrun`` output names its real root (``#$ TOP=...``).
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if env.get(var):
            return env[var]
    nvcc = shutil.which("nvcc", path=env.get("PATH"))
    if nvcc is None:
        return "/usr/local/cuda" if os.path.exists("/usr/local/cuda/bin/nvcc") else None
    root = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    if os.path.exists(os.path.join(root, "include", "cuda_runtime_api.h")):
        return root
    try:
        out = subprocess.run([nvcc, "-dryrun", "-c", "-x", "cu", os.devnull], capture_output=True, text=True,
                             timeout=120)
        match = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.MULTILINE)
    except (OSError, subprocess.SubprocessError):
        match = None
    return os.path.realpath(match.group(1).strip()) if match else root


def probe_toolchain():
    """What decide_cuda_build needs, found on this machine (imports torch if it can).

    Sets $CUDA_HOME (when unset) to the toolkit found by find_cuda_toolkit before torch's
    cpp_extension reads it.
    """
    if not os.environ.get("CUDA_HOME"):
        root = find_cuda_toolkit(os.environ)
        if root:
            os.environ["CUDA_HOME"] = root
    try:
        import torch
    except Exception:  # noqa: BLE001 -- any failure to import torch means: no extension
        return False, None, None, None
    try:
        from torch.utils.cpp_extension import CUDA_HOME
    except Exception:  # noqa: BLE001
        CUDA_HOME = None
    nvcc = None
    if CUDA_HOME:
        candidate = os.path.join(CUDA_HOME, "bin", "nvcc")
        nvcc = candidate if os.path.exists(candidate) else None
    return True, torch.version.cuda, CUDA_HOME, nvcc


def local_version(torch_version, cuda_version):
    """The wheel's local version label, e.g. '+cu130torch2.14' (CUDA and torch it was built against)."""
    major_minor = ".".join(re.sub(r"[+].*$", "", torch_version).split(".")[:2])
    return f"+cu{cuda_version.replace('.', '')}torch{major_minor}"


def nvidia_include_dirs(cuda_home):
    """Headers of torch's pip CUDA wheels (``<site-packages>/nvidia/cu13/include`` and the like).

    ATen's CUDA headers include cuSPARSE / cuBLAS headers that a minimal toolkit (nvcc + runtime only)
    lacks; torch's CUDA wheels ship them under the ``nvidia`` namespace package. Returned only when the
    toolkit at CUDA_HOME lacks ``cusparse.h``; setup passes them to the host compiler with
    ``-idirafter`` so the toolkit's own headers still win.
    """
    if cuda_home and os.path.exists(os.path.join(cuda_home, "include", "cusparse.h")):
        return []
    try:
        import nvidia  # namespace package shipped by torch's CUDA wheels
    except ImportError:
        return []
    found = []
    for base in list(getattr(nvidia, "__path__", [])):
        found += [inc for inc in sorted(glob.glob(os.path.join(base, "*", "include"))) if os.path.isdir(inc)]
    return found


def cuda_library_dirs(cuda_home):
    """Where libcudart.so is, if not in CUDA_HOME/lib64 (torch's default)."""
    if not cuda_home or os.path.exists(os.path.join(cuda_home, "lib64", "libcudart.so")):
        return []
    for candidate in ("/usr/local/cuda/lib64", os.path.join(cuda_home, "cuda", "lib64")):
        if os.path.exists(os.path.join(candidate, "libcudart.so")):
            return [candidate]
    return []


def _c_string(value):
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_build_info(torch_version, cuda_version, arch_list):
    """Generate the header recording what the extension is built against (checked at load time)."""
    out_dir = os.path.join(HERE, "build", "m2pt_generated")
    os.makedirs(out_dir, exist_ok=True)
    text = (
        "// generated by setup.py; do not edit\n#pragma once\n"
        f"#define M2PT_BUILD_TORCH_VERSION {_c_string(torch_version)}\n"
        f"#define M2PT_BUILD_CUDA_VERSION {_c_string(cuda_version)}\n"
        f"#define M2PT_BUILD_CUDA_ARCHS {_c_string(arch_list)}\n"
    )
    path = os.path.join(out_dir, "m2pt_build_info.h")
    old = open(path, encoding="utf-8").read() if os.path.exists(path) else None
    if old != text:  # keep the mtime (and ninja's incremental build) when nothing changed
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    return out_dir


def cuda_extension_setup_kwargs(argv=None):
    """ext_modules / cmdclass / version suffix for the CUDA build, or {} for the pure-Python package.

    A source distribution is never built against one torch / CUDA: ``sdist`` gets no extension
    configured and no ``+cu..torch..`` local version (MANIFEST.in puts all of csrc/ in it)."""
    if "sdist" in (sys.argv[1:] if argv is None else argv):
        print("m2pt_kernels setup: source distribution (csrc/ included, nothing compiled)", file=sys.stderr)
        return {}, ""
    torch_available, torch_cuda, cuda_home, nvcc = probe_toolchain()
    build, why = decide_cuda_build(os.environ, torch_available, torch_cuda, cuda_home, nvcc)
    print(f"m2pt_kernels setup: {'building the CUDA extension' if build else 'no CUDA extension'} ({why})",
          file=sys.stderr)
    if not build:
        return {}, ""
    import torch
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    if not os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
    kept, dropped = split_arch_list(os.environ["TORCH_CUDA_ARCH_LIST"])
    if dropped:
        print(f"m2pt_kernels setup: TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']!r}: leaving out "
              f"{', '.join(dropped)} (the kernels need sm_80 or newer)", file=sys.stderr)
    if not kept:
        why = (f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']!r} names no arch of 8.0 or newer, "
               f"which the kernels need (e.g. TORCH_CUDA_ARCH_LIST={DEFAULT_ARCH_LIST!r})")
        if _flag(os.environ, "M2PT_FORCE_CUDA_BUILD"):
            raise RuntimeError(f"m2pt_kernels setup: M2PT_FORCE_CUDA_BUILD=1 but {why}")
        print(f"m2pt_kernels setup: no CUDA extension ({why})", file=sys.stderr)
        return {}, ""
    arch_list = os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(kept)
    generated = write_build_info(torch.__version__, torch.version.cuda, arch_list)
    nvcc_flags = ["-O3", "--expt-relaxed-constexpr", f"--threads={int(os.environ.get('NVCC_THREADS', '1'))}"]
    cxx_after = [flag for inc in nvidia_include_dirs(cuda_home) for flag in ("-idirafter", inc)]
    if _flag(os.environ, "M2PT_CUDA_VERBOSE"):
        nvcc_flags += ["-Xptxas", "-v", "-lineinfo"]
    ext = CUDAExtension(
        name="m2pt_kernels._C",
        sources=EXT_SOURCES,
        include_dirs=[os.path.join(HERE, "csrc"), generated],
        library_dirs=cuda_library_dirs(cuda_home),
        extra_compile_args={"cxx": ["-O3"] + cxx_after, "nvcc": nvcc_flags},
    )
    cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=True)}
    return {"ext_modules": [ext], "cmdclass": cmdclass}, local_version(torch.__version__, torch.version.cuda)


def main():
    ext_kwargs, suffix = cuda_extension_setup_kwargs()
    setup(
        name="m2pt_kernels",
        version=VERSION + suffix,
        description="Fused Triton/CUDA kernels and tools for Multimodal Pathway (M2PT) cross-modal "
                    "re-parameterization",
        long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read(),
        long_description_content_type="text/markdown",
        python_requires=">=3.10",
        packages=find_packages(include=["m2pt_kernels", "m2pt_kernels.*"]),
        install_requires=["torch>=2.5"],
        extras_require={
            "triton": ["triton"],
            "demo": DEMO_EXTRAS,
            "test": TEST_EXTRAS,
            "bench": ["pytest-benchmark>=4", "matplotlib", "numpy"],
        },
        entry_points={"console_scripts": ["m2pt = m2pt_kernels.cli:main"]},
        zip_safe=False,
        **ext_kwargs,
    )


if __name__ == "__main__":
    main()
