#!/usr/bin/env bash
# Continue training the committed priors on a lent GPU machine, in one command (at most 8 minutes):
#
#     bash bench/train_device.sh [--smoke] [MODEL ...]     # MODEL: any checkpoint id with resume state
#                                                           # (phantom-flow-64, poisson-64, ...) [darcy-64 phantom-64]
#
# With the device tool (no wheels needed: it imports only torch, numpy, scipy, safetensors):
#     run(command="bash bench/train_device.sh", timeout_s=540)
# then, here, with the reply's files_at folder:
#     bash bench/train_device_fetch.sh FILES_AT          # checks, then copies into checkpoints/<id>/
# (docs/training.md says more.) For each MODEL, models/train_device.py copies
# checkpoints/MODEL/{resume,weights}.safetensors + card.json into a scratch folder, resumes
# from them as `reconserve train --resume` does (model, EMA, Adam moments, RNG, step, saved lr,
# warm-up, EMA half-life and step target) with batch $TRAIN_DEVICE_BATCH (256), generates the
# committed data set on the machine (Darcy's solves on all cores), trains for its share of the
# budget, and writes under $OUT:
#     MODEL/weights.safetensors, MODEL/resume.safetensors, MODEL/card.json   (each < 16 MiB)
#     summary.json (steps, images/s, loss, the CPU re-resume check), train_device.log
# i.e. 7 files for both models, 2 folders deep at most (the tool brings back 8, 16 MiB each).
# Time: the models share TRAIN_DEVICE_BUDGET_S (450 s) equally; each gets its share less
# 30 s (start-up, final save, the CPU re-resume check) as --time-limit-min, data generation
# included, and a hard `timeout` (SIGINT: the trainer saves and stops) of its share + 15 s.
# Overrides: TRAIN_DEVICE_BATCH, TRAIN_DEVICE_LR (default: the saved lr), TRAIN_DEVICE_STEPS
# (a new total step target; default: the saved one), TRAIN_DEVICE_BUDGET_S.
#
# --smoke (here, on the CPU; the test suite runs it): the same code path on the CPU with batch 4,
# 3 steps, the first 8 examples of each data set and one thread; OUT defaults to a temp dir;
# each output is re-resumed on the CPU for 1 step (--verify-steps), and a second invocation resumes
# the first model from $OUT for 1 more step; the steps are checked.
set -uo pipefail
cd "$(dirname "$0")/.." || exit
SMOKE=0
MODELS=()
for a in "$@"; do
  case "$a" in
    --smoke) SMOKE=1 ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d'; exit 0 ;;
    -*) echo "unknown option $a" >&2; exit 64 ;;
    *) MODELS+=("$a") ;;
  esac
done
[ ${#MODELS[@]} -eq 0 ] && MODELS=(darcy-64 phantom-64)
for m in "${MODELS[@]}"; do
  [ -f "checkpoints/$m/resume.safetensors" ] || { echo "no checkpoints/$m/resume.safetensors" >&2; exit 64; }
done
if [ "$SMOKE" -eq 1 ]; then OUT=${OUT:-$(mktemp -d /tmp/train_device_smoke.XXXXXX)}
else OUT=${OUT:-$(mktemp -d /tmp/train_device_out.XXXXXX)}
fi
mkdir -p "$OUT"
LOG="$OUT/train_device.log"
WORK=$(mktemp -d /tmp/train_device_work.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
PY=${PYTHON:-$(test -x .venv/bin/python && echo .venv/bin/python || echo python3)}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
T0=$(date +%s)
status=0
note() { echo "[train_device $(( $(date +%s) - T0 ))s] $*" | tee -a "$LOG"; }
run() {  # run LIMIT_S CMD...: under a hard time limit (SIGINT, then KILL), output to the log and stdout
  local limit=$1; shift
  timeout --signal=INT --kill-after=15 "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then status=$rc; fi
  return "$rc"
}

if [ "$SMOKE" -eq 1 ]; then
  note "smoke on the CPU: ${MODELS[*]} -> $OUT"
  COMMON=(--device cpu --batch 4 --max-examples 8 --threads 1 --workers 2 --save-every 0 --log-every 1)
  for m in "${MODELS[@]}"; do
    note "$m: 3 steps from checkpoints/$m"
    run 240 "$PY" -m models.train_device --id "$m" --src checkpoints --work "$WORK/1" --out "$OUT" \
      --add-steps 3 --time-limit-min 4 "${COMMON[@]}"
    note "$m: exit $?"
  done
  # a second invocation resumes from the first one's output (what a fetch would commit); the first
  # model only, to keep the smoke short (every model's output was re-resumed by --verify-steps)
  m=${MODELS[0]}
  note "$m: 1 more step from $OUT/$m"
  run 240 "$PY" -m models.train_device --id "$m" --src "$OUT" --work "$WORK/2" --out "$WORK/out2" \
    --add-steps 1 --verify-steps 0 "${COMMON[@]}"
  note "$m: exit $?"
  run 60 "$PY" - "$OUT" "$WORK/out2" "${MODELS[@]}" <<'PY'
import json, os, sys
first = json.load(open(f"{sys.argv[1]}/summary.json"))
p2 = f"{sys.argv[2]}/summary.json"
second = json.load(open(p2)) if os.path.exists(p2) else {}
bad = []
for i, m in enumerate(sys.argv[3:]):
    a, b = first.get(m, {}), second.get(m, {})
    ok = a.get("steps") == 3 and a.get("verify", {}).get("ok")
    again = ""
    if i == 0:
        ok = ok and b.get("start_step") == a.get("end_step") and b.get("end_step") == a.get("end_step", -9) + 1
        again = f", then {b.get('start_step')} -> {b.get('end_step')}"
    print(f"{m}: {a.get('start_step')} -> {a.get('end_step')} (CPU re-resume: {a.get('verify', {}).get('end_step')})"
          f"{again}: {'ok' if ok else 'FAILED'}")
    bad += [] if ok else [m]
sys.exit(1 if bad else 0)
PY
  note "done, status $status; out $OUT"
  exit "$status"
fi

{ nvidia-smi || true
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
} 2>&1 | tee -a "$LOG"
BUDGET_S=${TRAIN_DEVICE_BUDGET_S:-450}
BATCH=${TRAIN_DEVICE_BATCH:-256}
EXTRA=()
[ -n "${TRAIN_DEVICE_LR:-}" ] && EXTRA+=(--lr "$TRAIN_DEVICE_LR")
[ -n "${TRAIN_DEVICE_STEPS:-}" ] && EXTRA+=(--steps "$TRAIN_DEVICE_STEPS")
left_models=${#MODELS[@]}
for m in "${MODELS[@]}"; do
  left=$(( BUDGET_S - ($(date +%s) - T0) ))
  share=$(( left / left_models ))
  left_models=$(( left_models - 1 ))
  limit=$(( share - 30 ))
  if [ "$limit" -lt 45 ]; then
    note "$m: skipped, only ${left}s of the budget left"; [ "$status" -eq 0 ] && status=4; continue
  fi
  mins=$(awk -v s="$limit" 'BEGIN { printf "%.3f", s / 60 }')
  note "$m: batch $BATCH, --time-limit-min $mins (share ${share}s)"
  run $(( share + 15 )) "$PY" -m models.train_device --id "$m" --src checkpoints --work "$WORK" --out "$OUT" \
    --batch "$BATCH" --time-limit-min "$mins" --save-every 250 --log-every 100 "${EXTRA[@]}"
  note "$m: exit $?"
done
ls -la "$OUT" "$OUT"/*/ 2>&1 | tee -a "$LOG"
note "done, status $status; out $OUT"
exit "$status"
