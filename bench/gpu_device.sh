#!/usr/bin/env bash
# The GPU path on a lent GPU machine, in one command (at most about 8 minutes):
#
#     bash bench/gpu_device.sh            # on the GPU machine, in a copy of the working tree
#     bash bench/gpu_device.sh --smoke    # here, on the CPU (the test suite runs this)
#
# With the device tool: first `bash bench/gpu_wheels.sh` here (wheels into the git-ignored
# .whl/: deepinv for the ADM U-Net, the service's stack for its cuda tests), then
#     run(command="bash bench/gpu_device.sh", carry=[".whl"], timeout_s=540)
# Steps, each under its own time limit, all output under $OUT (default bench/results/gpu-run/):
#   1. the carried wheels (.whl/*.whl, if any) into /tmp/site; GPU and torch versions -> nvidia-smi.txt
#   2. the `cuda` tests (every tests/ file marked cuda; 150 s)                       -> cuda_tests.log
#   3. bench/gpu.py --device cuda (budget 250 s; partial results kept if cut off)    -> gpu.json, gpu.log
#   4. bench/gpu.py, torch.compile on phantom-64 (the time left, at most 90 s)       -> gpu_compile.json/.log
# A step that fails or runs out of time does not stop the next; the exit status is the first
# failing step's. --smoke: the CPU, bench/gpu.py --smoke, the cuda test files (they skip).
set -uo pipefail
cd "$(dirname "$0")/.."
SMOKE=0
[ "${1:-}" = "--smoke" ] && SMOKE=1
OUT=${OUT:-bench/results/gpu-run}
mkdir -p "$OUT"
PY=${PYTHON:-$(test -x .venv/bin/python && echo .venv/bin/python || echo python3)}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
T0=$(date +%s)
status=0
note() { echo "[gpu_device $(( $(date +%s) - T0 ))s] $*"; }
step() {  # step NAME LIMIT_S LOG CMD...: CMD under a time limit (SIGINT, then KILL), output to LOG and stdout
  local name=$1 limit=$2 log=$3; shift 3
  note "$name (limit ${limit}s)"
  timeout --signal=INT --kill-after=15 "$limit" "$@" 2>&1 | tee "$log"
  local rc=${PIPESTATUS[0]}
  note "$name: exit $rc"
  if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then status=$rc; fi
  return 0
}
CUDA_TESTS=$(grep -rl --include="test_*.py" "pytest.mark.cuda" tests | sort | tr "\n" " ")

if [ "$SMOKE" -eq 1 ]; then
  # shellcheck disable=SC2086
  step "cuda tests, smoke (they skip without a GPU): $CUDA_TESTS" 240 "$OUT/cuda_tests.log" \
    "$PY" -m pytest -q -rs -m cuda -p no:cacheprovider $CUDA_TESTS
  step "bench, smoke (cpu)" 240 "$OUT/gpu.log" "$PY" bench/gpu.py --smoke --device cpu --out "$OUT/gpu.json"
  note "done, status $status"
  exit $status
fi

if ls .whl/*.whl >/dev/null 2>&1; then
  note "installing carried wheels: $(ls .whl | tr '\n' ' ')"
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  then export PYTHONPATH="$PYTHONPATH:/tmp/site"
  else note "wheel install failed: carrying on without them (the ADM model and service tests may skip/fail)"
  fi
fi
{ nvidia-smi; "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"; } \
  > "$OUT/nvidia-smi.txt" 2>&1
cat "$OUT/nvidia-smi.txt"

# shellcheck disable=SC2086
step "cuda tests: $CUDA_TESTS" 150 "$OUT/cuda_tests.log" "$PY" -m pytest -q -rs -m cuda -p no:cacheprovider \
  --continue-on-collection-errors --timeout 120 $CUDA_TESTS
step "bench" 280 "$OUT/gpu.log" "$PY" bench/gpu.py --device cuda --budget-s 250 --reserve-s 15 --out "$OUT/gpu.json"
left=$(( 465 - ($(date +%s) - T0) ))
if [ "$left" -gt 45 ]; then
  lim=$(( left < 90 ? left : 90 ))
  step "bench, torch.compile" "$lim" "$OUT/gpu_compile.log" "$PY" bench/gpu.py --device cuda --models phantom-64 \
    --batches 8 --variants bf16_cl_compile,bf16_cl --methods fast --sampler-variant bf16_cl_compile \
    --extra-sampler-variants bf16_cl --no-batching --budget-s $(( lim - 20 )) --out "$OUT/gpu_compile.json"
else
  note "no time left for the torch.compile run"
fi
note "done, status $status"
exit $status
