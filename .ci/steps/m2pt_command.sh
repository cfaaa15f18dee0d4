#!/usr/bin/env bash
# CI step: the installed `m2pt` console script (setup.py entry point) runs: info, a user error's exit
# code, and a tiny `m2pt demo` end to end (about 20 s on 2 cores). The tests call cli.main in-process;
# this checks the entry point a user types.
set -euo pipefail
cd "$(dirname "$0")/../.."
M2PT=.venv/bin/m2pt
[ -x "$M2PT" ] || { echo "CI: $M2PT not found (pip install -e . into .venv first)" >&2; exit 1; }
"$M2PT" info
set +e
"$M2PT" merge does-not-exist.pth out.pth 2>/dev/null
rc=$?
set -e
[ "$rc" -eq 2 ] || { echo "CI: m2pt merge on a missing file exited $rc, expected 2" >&2; exit 1; }
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
"$M2PT" demo --aux-steps 10 --steps 10 --seeds 1 --eval-every 5 --timing-repeats 2 --no-progress --out "$out"
for f in report.json training_curves.png target_merged.safetensors; do
  [ -s "$out/$f" ] || { echo "CI: m2pt demo did not write $f" >&2; exit 1; }
done
