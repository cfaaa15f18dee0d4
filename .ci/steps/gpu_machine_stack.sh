#!/usr/bin/env bash
# CI step: the whole test suite again under the software of the lent GPU machines -- torch 2.11.0
# and the triton it pins (3.6.0) -- not only under torch 2.14.1 / triton 3.8 of the README's venv.
# GPU sessions are rare and 15 minutes long; a torch or Triton API that the GPU machine lacks must
# fail here, not there. Without a GPU this runs the Triton kernels under TRITON_INTERPRET=1 and
# compiles every one of them ahead of time for sm_90 / sm_80 with triton 3.6's own compiler.
#
# A fresh venv (Python 3.12 where there is one, as on the GPU machines; pip, from the same index
# as the README's install): torch 2.11.0 + torchvision
# 0.26.0, numpy < 2.3 (triton 3.6's interpreter converts 1-element arrays with int(), an error from
# numpy 2.3 on), and the package's test extras; the package itself comes from the checkout
# (PYTHONPATH), as it does for the README's editable install. Then the CUDA extension's wheel is
# built against torch 2.11 (cuda_wheel.sh with this venv's python) and its binding tests run.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
PY="$ROOT/.venv/bin/python"
[ -x "$PY" ] || PY=$(command -v python3)
TORCH_VERSION="${M2PT_CI_GPU_TORCH:-2.11.0}"
TORCHVISION_VERSION="${M2PT_CI_GPU_TORCHVISION:-0.26.0}"
TRITON_VERSION="${M2PT_CI_GPU_TRITON:-3.6.0}"

# The GPU machines run Python 3.12: use one when this machine has it (PATH or pyenv), else .venv's.
GPU_PY="${M2PT_CI_GPU_PYTHON:-}"
if [ -z "$GPU_PY" ]; then
  for cand in python3.12 "$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python3.12 \
              "$HOME"/.pyenv/versions/3.12*/bin/python3.12 /usr/bin/python3.12; do
    if [ -n "$cand" ] && "$cand" -c "import sys, venv; assert sys.version_info[:2] == (3, 12)" 2>/dev/null; then
      GPU_PY="$cand"; break
    fi
  done
fi
if [ -z "$GPU_PY" ]; then
  echo "gpu_machine_stack: no Python 3.12 here; using $PY ($("$PY" -V 2>&1))"
  GPU_PY="$PY"
fi

start=$(date +%s)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$GPU_PY" -m venv "$tmp/venv"
extras=$("$PY" - <<'PYEOF'
import importlib.util
spec = importlib.util.spec_from_file_location("m2pt_setup", "setup.py")  # not __main__: no setup() call
setup = importlib.util.module_from_spec(spec)
spec.loader.exec_module(setup)
print(" ".join(setup.TEST_EXTRAS))
PYEOF
)
# shellcheck disable=SC2086
if ! "$tmp/venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION" "triton==$TRITON_VERSION" "numpy<2.3" $extras \
    ninja pybind11 setuptools wheel \
    > "$tmp/pip.log" 2>&1; then
  tail -n 20 "$tmp/pip.log"
  echo "gpu_machine_stack: FAILED to install torch $TORCH_VERSION / triton $TRITON_VERSION" >&2
  exit 1
fi
versions=$("$tmp/venv/bin/python" -c "import torch, triton; print(torch.__version__.split('+')[0], triton.__version__)")
pyver=$("$tmp/venv/bin/python" -c "import platform; print(platform.python_version())")
[ "$versions" = "$TORCH_VERSION $TRITON_VERSION" ] || {
  echo "gpu_machine_stack: got torch/triton $versions, wanted $TORCH_VERSION $TRITON_VERSION" >&2; exit 1; }
echo "gpu_machine_stack: Python $pyver, torch/triton $versions installed in $(( $(date +%s) - start )) s"

set +e
PYTHONPATH="$ROOT" "$tmp/venv/bin/python" -m pytest -q -p no:cacheprovider -W ignore::DeprecationWarning tests \
  > "$tmp/pytest.log" 2>&1
rc=$?
set -e
tail -n 15 "$tmp/pytest.log"
[ "$rc" -ne 5 ] || { echo "gpu_machine_stack: pytest collected no tests" >&2; rc=1; }
echo "gpu_machine_stack: torch/triton $versions, pytest rc $rc, $(( $(date +%s) - start )) s"
[ "$rc" -eq 0 ] || exit "$rc"

# The CUDA extension as gpu_check.sh builds it there: a wheel against torch 2.11's headers, installed
# into a fresh venv, its binding tests run against it.
M2PT_CI_PYTHON="$tmp/venv/bin/python" bash .ci/steps/cuda_wheel.sh 2>&1 | sed 's/^cuda_wheel:/gpu_machine_stack: cuda_wheel (torch '"$TORCH_VERSION"'):/'
exit "${PIPESTATUS[0]}"
