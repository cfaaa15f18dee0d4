#!/usr/bin/env bash
# CI step: build the wheel with the compiled CUDA extension (no GPU needed), install it into a fresh
# venv and import it there: the cuda backend must report "built" (and, without a GPU, "no CUDA device").
#
# Runs from the repo root with the CI venv at .venv/ (torch installed there). The fresh venv sees
# .venv's torch through a .pth file (no multi-GB reinstall); pip installs the wheel with --no-index
# --no-deps (its one dependency, torch, is that torch: the import below is the check).
# To stay within a few minutes on 2 cores, CI compiles one arch only: TORCH_CUDA_ARCH_LIST=9.0a
# (the release default, setup.py's DEFAULT_ARCH_LIST, is "8.0+PTX;9.0a"). Override by exporting it.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
# M2PT_CI_PYTHON: build against another venv's torch (gpu_machine_stack.sh uses it for torch 2.11).
PY="${M2PT_CI_PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY=$(command -v python3)

if ! "$PY" - <<'PYEOF'
import importlib.util, os, sys
spec = importlib.util.spec_from_file_location("m2pt_setup", "setup.py")
setup = importlib.util.module_from_spec(spec); spec.loader.exec_module(setup)
build, why = setup.decide_cuda_build(os.environ, *setup.probe_toolchain())
print(f"cuda_wheel: {why}")
sys.exit(0 if build else 1)
PYEOF
then
  echo "cuda_wheel: SKIPPED: no CUDA toolchain / CUDA torch in this CI environment (see the line above)"
  exit 0
fi

start=$(date +%s)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# Build from a copy of the tree so the repo's build/ and in-place .so are neither used nor touched.
mkdir -p "$tmp/src"
tar -C "$ROOT" --exclude=./.venv --exclude=./.git --exclude=./build --exclude='*.so' --exclude=./dist -cf - . \
  | tar -C "$tmp/src" -xf -
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}"
export MAX_JOBS="${MAX_JOBS:-2}"
M2PT_FORCE_CUDA_BUILD=1 "$PY" -m pip wheel --no-build-isolation --no-deps --no-index -w "$tmp/wheels" "$tmp/src" \
  > "$tmp/build.log" 2>&1 || { tail -n 60 "$tmp/build.log"; echo "cuda_wheel: FAILED to build the wheel" >&2; exit 1; }
wheel=$(ls "$tmp"/wheels/m2pt_kernels-*.whl)
echo "cuda_wheel: built $(basename "$wheel") in $(( $(date +%s) - start )) s (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"

# A fresh venv whose only extra path is .venv's site-packages (for torch).
"$PY" -m venv "$tmp/venv"
torch_site=$("$PY" -c "import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))")
fresh_site=$("$tmp/venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "$torch_site" > "$fresh_site/ci_torch_from_dot_venv.pth"
"$tmp/venv/bin/python" -m pip install --quiet --no-index --no-deps --disable-pip-version-check "$wheel"

cd "$tmp"  # not the repo root: the import must come from the installed wheel
WHEEL="$wheel" VENV="$tmp/venv" "$tmp/venv/bin/python" - <<'PYEOF'
import importlib.util, os, re
import torch
import m2pt_kernels
from m2pt_kernels import backend_status

venv = os.environ["VENV"]
assert m2pt_kernels.__file__.startswith(venv), f"imported {m2pt_kernels.__file__}, not the wheel in {venv}"
spec = importlib.util.find_spec("m2pt_kernels._C")
assert spec is not None and spec.origin.startswith(venv), "the wheel has no compiled extension m2pt_kernels._C"
base = re.sub(r"\+.*$", "", torch.__version__)
label = f"+cu{torch.version.cuda.replace('.', '')}torch{'.'.join(base.split('.')[:2])}"
name = os.path.basename(os.environ["WHEEL"])
assert label in name.replace("%2B", "+"), f"wheel {name} does not carry the local version {label}"
ok, why = backend_status()["cuda"]
print(f"cuda_wheel: backend_status()['cuda'] = {(ok, why)}")
if torch.cuda.is_available():
    assert ok, why
else:
    assert not ok and "built" in why and "no CUDA device" in why, why
print(f"cuda_wheel: OK: {name} installs into a fresh venv and imports; extension {os.path.basename(spec.origin)}")
PYEOF
# The binding checks (argument errors raised in C++ before any launch) need the built extension,
# which the README's editable install does not have: run them here, against the installed wheel.
"$tmp/venv/bin/python" -m pytest -q -p no:cacheprovider -rs --rootdir "$tmp" "$ROOT/tests/test_build.py" \
  > "$tmp/bindings.log" 2>&1 || { tail -n 60 "$tmp/bindings.log"; echo "cuda_wheel: binding tests FAILED" >&2; exit 1; }
if grep -q "extension not built here" "$tmp/bindings.log"; then
  tail -n 20 "$tmp/bindings.log"; echo "cuda_wheel: binding tests were skipped: the wheel's extension did not load" >&2; exit 1
fi
echo "cuda_wheel: $(tail -n 1 "$tmp/bindings.log") (tests/test_build.py against the wheel)"
echo "cuda_wheel: total $(( $(date +%s) - start )) s"
