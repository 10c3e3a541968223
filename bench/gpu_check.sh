#!/usr/bin/env bash
# GPU readiness check: every CUDA-only path of nanochat run once, within 8 minutes on one H100/H200
# (bench/gpu_check.py says what each step measures). Prints JSON lines only: a start line, one line
# per step, a summary line. Each step runs in its own process under its own timeout, so a step that
# fails, hangs or crashes is reported as a JSON line with its error and the others still run.
#
#     bash bench/gpu_check.sh              # on a GPU machine; exit status 0 when every step is ok
#     bash bench/gpu_check.sh --dry-run    # every step at tiny size on CPU (tests/test_gpu_check.py)
#
# GPU_CHECK_BUDGET (seconds; 450 on a GPU) caps the whole run: a step gets the smaller of its own
# timeout and what is left, and a step that cannot start in time is reported as skipped.
# GPU_CHECK_LOGS names the folder for each step's log (default: a new temporary folder).
set -uo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python}"
DRY=""
SCALE=1
if [ "${1:-}" = "--dry-run" ]; then
  DRY="--dry-run"
  SCALE=4  # a small CPU compiles and steps far slower than a GPU host, and may be shared
fi
BUDGET="${GPU_CHECK_BUDGET:-$((450 * SCALE))}"
LOGS="${GPU_CHECK_LOGS:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")}"
mkdir -p "$LOGS"
RESULTS="$LOGS/results.jsonl"
: > "$RESULTS"
START=$(date +%s)

# the issue's step number, the step, its timeout in seconds on a GPU; most telling first, since
# the budget cuts the tail
STEPS=(
  "0 env 60"
  "1 tf32 90"
  "2 train 120"
  "3 eval_lengths 60"
  "4 decode 120"
  "2 train_flex 150"
  "5 optimizer 60"
  "6 base_train 120"
  "6 throughput_d12 120"
  "6 throughput_d20 150"
)

failed_line() {  # failed_line NUMBER NAME ERROR: the JSON line for a step that printed none
  "$PYTHON" -c 'import json, sys; print(json.dumps({"step": int(sys.argv[1]), "name": sys.argv[2], "ok": False, "error": sys.argv[3]}))' "$@"
}

"$PYTHON" -c 'import json, sys; print(json.dumps({"gpu_check": "start", "dry_run": sys.argv[1] == "1", "budget_s": int(sys.argv[2]), "logs": sys.argv[3]}))' \
  "${DRY:+1}" "$BUDGET" "$LOGS"

for entry in "${STEPS[@]}"; do
  read -r number name limit <<< "$entry"
  limit=$((limit * SCALE))
  left=$((BUDGET - ($(date +%s) - START)))
  if [ "$left" -lt 20 ]; then
    line=$(failed_line "$number" "$name" "skipped: the ${BUDGET} s budget is spent")
  else
    if [ "$limit" -gt "$left" ]; then limit=$left; fi
    timeout --kill-after=15 "$limit" "$PYTHON" -m bench.gpu_check --step "$name" $DRY \
      > "$LOGS/$name.json" 2> "$LOGS/$name.log"
    status=$?
    line=$(tail -n 1 "$LOGS/$name.json")
    if [[ "$line" != "{"* ]]; then
      if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
        error="timed out after ${limit} s"
      else
        error="exited with status $status"
      fi
      line=$(failed_line "$number" "$name" "$error; last log line: $(tail -n 1 "$LOGS/$name.log"); log: $LOGS/$name.log")
    fi
  fi
  echo "$line" | tee -a "$RESULTS"
done

"$PYTHON" - "$RESULTS" "$START" <<'EOF'
import json, sys, time
results = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
failed = [r["name"] for r in results if not r.get("ok")]
print(json.dumps({"gpu_check": "summary", "ok": not failed, "steps": len(results), "failed": failed,
                  "seconds": round(time.time() - int(sys.argv[2]))}))
sys.exit(1 if failed else 0)
EOF
