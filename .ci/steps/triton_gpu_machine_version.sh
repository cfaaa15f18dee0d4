#!/usr/bin/env bash
# CI step: the Triton kernels under the triton release of the lent GPU machine (triton 3.6), not
# only the one torch 2.14.1 brings (3.8). The GPU sessions are rare and short; an API that 3.6 lacks
# must fail here, not there. Runs the Triton test file under TRITON_INTERPRET=1, which includes the
# ahead-of-time compile of every kernel for sm_90 / sm_80 with 3.6's own compiler (no GPU needed).
#
# A fresh venv with triton 3.6 (+ numpy < 2.3: 3.6's interpreter converts 1-element arrays with
# int(), an error from numpy 2.3 on) and pytest; torch comes from .venv through a .pth placed after
# the venv's own site-packages, so this triton shadows .venv's.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
PY="$ROOT/.venv/bin/python"
[ -x "$PY" ] || PY=$(command -v python3)
TRITON_VERSION="${M2PT_CI_TRITON_VERSION:-3.6.0}"

start=$(date +%s)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PY" -m venv "$tmp/venv"
if ! "$tmp/venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    "triton==$TRITON_VERSION" "numpy<2.3" pytest > "$tmp/pip.log" 2>&1; then
  tail -n 20 "$tmp/pip.log"
  echo "triton_gpu_machine_version: FAILED to install triton $TRITON_VERSION" >&2
  exit 1
fi
torch_site=$("$PY" -c "import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))")
fresh_site=$("$tmp/venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "$torch_site" > "$fresh_site/zz_ci_torch_from_dot_venv.pth"

got=$("$tmp/venv/bin/python" -c "import triton; print(triton.__version__)")
[ "$got" = "$TRITON_VERSION" ] || { echo "triton_gpu_machine_version: imported triton $got, not $TRITON_VERSION" >&2; exit 1; }

set +e
TRITON_INTERPRET=1 PYTHONPATH="$ROOT" "$tmp/venv/bin/python" -m pytest -q -p no:cacheprovider \
  -W ignore::DeprecationWarning tests/test_cross_modal_linear_triton.py > "$tmp/pytest.log" 2>&1
rc=$?
set -e
tail -n 15 "$tmp/pytest.log"
[ "$rc" -ne 5 ] || { echo "triton_gpu_machine_version: pytest collected no tests" >&2; rc=1; }
echo "triton_gpu_machine_version: triton $got, pytest rc $rc, $(( $(date +%s) - start )) s"
exit "$rc"
