#!/usr/bin/env bash
# The ONE call a session with a lent GPU makes (about 8 minutes, every stage under `timeout`):
#
#   OUT=<empty folder> bash benchmarks/gpu_check.sh
#
# 1. env:   nvidia-smi, versions                                  -> $OUT/env.txt
# 2. build: the CUDA extension in place (continues without it)    -> $OUT/build.log
# 3. tests: `pytest -m gpu tests` (the kernels on the GPU)        -> $OUT/tests.log (pytest-xdist -n 8 when present)
# 4. bench: benchmarks/run.py --mode full --budget-s ...          -> $OUT/results.json, $OUT/bench.log
# 5. tests: the rest minus `slow` (on CUDA tensors), time left    -> $OUT/tests.log
# 6. report: targets met/missed, plot, the short table LAST       -> $OUT/plot.png, $OUT/summary.txt
#
# Each stage has a deadline counted from the start, so one that hangs cannot eat the next one's time
# and one that ends early leaves its time to the next. The results JSON is rewritten after every
# case, so a benchmark stopped by its timeout still reports what it measured. pytest is stopped with
# SIGINT (it then still prints which tests failed) and runs with -v (each result logged as it ends).
# paper_compiled uses torch.compile's default mode here (M2PT_GPU_CHECK_COMPILE_MODE): max-autotune
# spends ~25 s per shape, which would leave the large-token cases out of the time budget.
#
# On a machine without a GPU, M2PT_GPU_CHECK_DRY=1 runs every stage in a tiny CPU mode (the build
# stage runs setup.py build_ext with M2PT_SKIP_CUDA_BUILD=1, the tests stage runs `-m gpu` only (which
# collects the whole suite), the bench stage runs --tiny shapes): that is how this script is tested (tests/test_bench.py).
#
# Knobs: PYTHON (default python3), M2PT_COMMIT (recorded in the results; the device copy has no .git),
# M2PT_GPU_CHECK_TOTAL_S (default 470), M2PT_GPU_CHECK_BENCH_ARGS (extra args for run.py),
# M2PT_GPU_CHECK_SKIP_BUILD=1, M2PT_GPU_CHECK_SKIP_TESTS=1, M2PT_GPU_CHECK_TEST_WORKERS (8),
# M2PT_GPU_CHECK_COMPILE_MODE (default),
# MAX_JOBS (16), TORCH_CUDA_ARCH_LIST (9.0a).
set -u
cd "$(dirname "$0")/.."

OUT=${OUT:?set OUT to an (empty) output folder}
mkdir -p "$OUT"
DRY=${M2PT_GPU_CHECK_DRY:-0}
PY=${PYTHON:-python3}
TOTAL=${M2PT_GPU_CHECK_TOTAL_S:-470}
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
export MAX_JOBS=${MAX_JOBS:-16}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}
export PYTHONUNBUFFERED=1
export TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-16}
if [ -z "${M2PT_COMMIT:-}" ]; then
  M2PT_COMMIT=$(git rev-parse HEAD 2>/dev/null || echo unknown)
  export M2PT_COMMIT
fi
T0=$(date +%s)
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

now() { echo $(( $(date +%s) - T0 )); }
# seconds until a deadline (a fraction of TOTAL, in percent), at least 5
until_pct() { local d=$(( TOTAL * $1 / 100 - $(now) )); [ "$d" -lt 5 ] && d=5; echo "$d"; }
note() { echo "[gpu_check +$(now)s] $*" | tee -a "$SUMMARY"; }

if [ "$DRY" != "0" ]; then
  note "DRY RUN (M2PT_GPU_CHECK_DRY=$DRY): tiny CPU mode, no numbers here mean anything for a GPU"
fi

# ---------------------------------------------------------------- 1. environment
{
  echo "date: $(date -u +%FT%TZ)  commit: $M2PT_COMMIT  dry: $DRY"
  if command -v nvidia-smi >/dev/null 2>&1; then
    timeout -k 5 20 nvidia-smi
    timeout -k 5 20 nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,clocks.max.sm,power.draw,temperature.gpu --format=csv
  else
    echo "nvidia-smi: not found"
  fi
  command -v nvcc >/dev/null 2>&1 && nvcc --version | tail -2
  timeout -k 10 60 "$PY" - <<'EOF'
import os, platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "cuda available", torch.cuda.is_available())
try:
    import triton
    print("triton", triton.__version__)
except Exception as exc:
    print("triton: not importable:", exc)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, "sm", p.multi_processor_count, "mem GB", round(p.total_memory / 1e9, 1),
          "L2 MB", getattr(p, "L2_cache_size", 0) / 2**20, "cc", f"{p.major}.{p.minor}")
print("cpu cores", os.cpu_count())
EOF
} > "$OUT/env.txt" 2>&1
head -c 3000 "$OUT/env.txt" | grep -E "^(python|triton|gpu|date)|NVIDIA-SMI|H100|H200" | head -8
note "env done"

# ---------------------------------------------------------------- 2. build the CUDA extension
if [ "${M2PT_GPU_CHECK_SKIP_BUILD:-0}" != "0" ]; then
  note "build: skipped (M2PT_GPU_CHECK_SKIP_BUILD)"
else
  t=$(until_pct 31)
  if [ "$DRY" != "0" ]; then
    (M2PT_SKIP_CUDA_BUILD=1 timeout -k 10 "$t" "$PY" setup.py build_ext --inplace) > "$OUT/build.log" 2>&1
  else
    (M2PT_FORCE_CUDA_BUILD=1 timeout -k 10 "$t" "$PY" setup.py build_ext --inplace) > "$OUT/build.log" 2>&1
  fi
  rc=$?
  if [ "$rc" -eq 0 ]; then
    note "build: ok (timeout ${t}s)"
  else
    note "build: FAILED rc=$rc (timeout ${t}s; 124 = timed out); continuing without the extension. Last lines:"
    grep -E "error|Error|ERROR" "$OUT/build.log" | head -5 | tee -a "$SUMMARY"
    tail -3 "$OUT/build.log" | tee -a "$SUMMARY"
  fi
  "$PY" -c "from m2pt_kernels import backend_status as s; print('backends:', {k: v[0] for k, v in s().items()}); print('cuda:', s()['cuda'][1])" 2>&1 | tee -a "$SUMMARY"
fi

# ---------------------------------------------------------------- 3. tests
if [ "${M2PT_GPU_CHECK_SKIP_TESTS:-0}" != "0" ]; then
  note "tests: skipped (M2PT_GPU_CHECK_SKIP_TESTS)"
else
  : > "$OUT/tests.log"
  # Compiling the kernels (triton autotune configs, every dtype) is most of the tests' time, one
  # compile per process at a time: spread it over the machine's cores with pytest-xdist when present.
  XDIST=""
  if [ "$DRY" = "0" ] && "$PY" -c "import xdist" >/dev/null 2>&1; then
    XDIST="-n ${M2PT_GPU_CHECK_TEST_WORKERS:-8}"
  fi
  t=$(until_pct 44)
  echo "=== pytest -m gpu tests (timeout ${t}s)" >> "$OUT/tests.log"
  # shellcheck disable=SC2086
  timeout -s INT -k 15 "$t" "$PY" -m pytest -v -m gpu tests $XDIST -p no:cacheprovider -rfEs --durations=5 >> "$OUT/tests.log" 2>&1
  rc=$?
  [ "$rc" -eq 5 ] && note "tests -m gpu: no test is marked gpu (rc 5)" || note "tests -m gpu: rc=$rc (124 = cut by its timeout) ($(tail -1 "$OUT/tests.log"))"
  grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -10 | tee -a "$SUMMARY"
fi

# ---------------------------------------------------------------- 4. benchmarks
t=$(until_pct 86)
budget=$(( t - 35 ))
[ "$budget" -lt 10 ] && budget=10
if [ "$DRY" != "0" ]; then
  bench_args="--tiny --providers ${M2PT_GPU_CHECK_PROVIDERS:-plain,paper,auto,triton,cuda,reference}"
else
  bench_args="--mode full --compile-mode ${M2PT_GPU_CHECK_COMPILE_MODE:-default}"
fi
note "bench: timeout ${t}s, --budget-s ${budget}"
# shellcheck disable=SC2086
timeout -k 10 "$t" "$PY" benchmarks/run.py $bench_args --budget-s "$budget" --out "$OUT/results.json" \
  ${M2PT_GPU_CHECK_BENCH_ARGS:-} > "$OUT/bench.log" 2>&1
rc=$?
note "bench: rc=$rc (124 = cut by its timeout; results.json holds every finished case)"
[ "$rc" -ne 0 ] && tail -5 "$OUT/bench.log" | tee -a "$SUMMARY"

# ---------------------------------------------------------------- 5. the rest of the tests, time left
if [ "${M2PT_GPU_CHECK_SKIP_TESTS:-0}" = "0" ] && [ "$DRY" = "0" ]; then  # (dry: stage 3 collected the whole suite)
  t=$(until_pct 97)
  echo "=== pytest -m 'not slow and not gpu' tests (timeout ${t}s)" >> "$OUT/tests.log"
  # shellcheck disable=SC2086
  timeout -s INT -k 15 "$t" "$PY" -m pytest -v -m "not slow and not gpu" tests $XDIST -p no:cacheprovider -rfE --durations=10 >> "$OUT/tests.log" 2>&1
  rc=$?
  note "tests suite: rc=$rc (124 = cut by its timeout; 2 = interrupted) ($(tail -1 "$OUT/tests.log"))"
  grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | sort -u | head -10 | tee -a "$SUMMARY"
fi

# ---------------------------------------------------------------- 6. report: plot, targets, short table LAST
note "report (the table below is the last thing printed)"
timeout -k 10 60 "$PY" - "$OUT/results.json" "$OUT/plot.png" <<'EOF' 2>&1 | tee -a "$SUMMARY"
import json, sys
from m2pt_kernels import bench
path, png = sys.argv[1], sys.argv[2]
try:
    res = json.load(open(path))
except Exception as exc:
    print(f"no results: {exc}")
    sys.exit(0)
if not res.get("complete"):
    print("results are PARTIAL (the benchmark was cut short); targets from what was measured")
    res["targets"] = bench.evaluate_targets(res)
try:
    bench.validate_results(res)
except ValueError as exc:
    print(f"SCHEMA PROBLEM: {exc}")
try:
    bench.plot_results(res, png)
    print(f"plot: {png}")
except Exception as exc:
    print(f"plot failed: {type(exc).__name__}: {exc}")
print(f"cases measured: {len(res['cases'])}, dropped: {len(res.get('dropped', []))}, "
      f"peaks: {({k: round(v, 1) for k, v in res['peaks'].items() if isinstance(v, float)})}")
t = res["targets"]
n = {s: sum(1 for x in t if x["status"] == s) for s in ("met", "missed", "not measured")}
print(f"targets: {n}")
print(bench.format_targets([x for x in t if x["status"] != "met"]) or "(all measured targets met)")
print()
print(bench.markdown_table(res, max_priority=0))
EOF
echo "[gpu_check +$(now)s] done" >> "$SUMMARY"
