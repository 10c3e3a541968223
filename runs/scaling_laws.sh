#!/usr/bin/env bash
# Scaling laws: for each FLOP budget, train several depths to exactly that budget
# (--target-flops; the batch size is fixed, so the horizon follows from FLOPs per token) and
# record what each run reports in its final {"base_train": {...}} JSON line, plus the final CORE
# metric from its train_log.jsonl, in a CSV. Runs already in the CSV are skipped, so an
# interrupted sweep resumes where it stopped. Run from the repository root with nanochat installed:
#     bash runs/scaling_laws.sh
#     FLOPS_BUDGETS="1e18 2.15e18" DEPTHS="10 12 14" NPROC=8 bash runs/scaling_laws.sh
# Results: $NANOCHAT_BASE_DIR/<label>_results/{results.csv, <budget>_d<depth>.log}
set -euo pipefail
cd "$(dirname "$0")/.."

export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
NPROC="${NPROC:-8}"
LABEL="${LABEL:-scaling_laws}"
FLOPS_BUDGETS="${FLOPS_BUDGETS:-1e18 2.15e18 4.64e18 1e19}"
DEPTHS="${DEPTHS:-10 12 14 16 18 20}"
TOTAL_BATCH_SIZE="${TOTAL_BATCH_SIZE:-524288}"   # tokens per step, the same for every run
EVAL_TOKENS=$((100 * 524288))
WANDB_RUN="${WANDB_RUN:-dummy}"
RESULTS_DIR="$NANOCHAT_BASE_DIR/${LABEL}_results"
RESULTS="$RESULTS_DIR/results.csv"
FIELDS="depth,model_tag,steps,total_batch_size,total_tokens,scaling_params,total_params,flops_per_token,total_flops,min_val_bpb,final_val_bpb,training_time_s"
mkdir -p "$RESULTS_DIR"
# inputs, disk, GPUs, dtype: now, not hours in (SKIP_PREFLIGHT=1 when you know better)
[ "${SKIP_PREFLIGHT:-0}" = 1 ] || python -m nanochat.preflight --min-free-gb=40 --gpus="$NPROC"

[ -f "$RESULTS" ] || echo "flops_budget,$FIELDS,core_metric" > "$RESULTS"
for flops in $FLOPS_BUDGETS; do
  for d in $DEPTHS; do
    if awk -F, -v f="$flops" -v d="$d" '$1 == f && $2 == d { found = 1 } END { exit !found }' "$RESULTS"; then
      echo "== budget $flops, depth $d: already in $RESULTS, skipping"
      continue
    fi
    tag="${LABEL}_${flops}_d${d}"
    if [ "$d" -ge 20 ]; then dbs=16; else dbs=32; fi
    run=dummy
    if [ "$WANDB_RUN" != dummy ]; then run="${WANDB_RUN}_${flops}_d${d}"; fi
    log="$RESULTS_DIR/${flops}_d${d}.log"
    echo "== budget $flops FLOPs, depth $d (tag $tag) -> $log"
    if ! torchrun --standalone --nproc_per_node="$NPROC" -m scripts.base_train -- \
        --depth="$d" --target-flops="$flops" --target-param-data-ratio=-1 --total-batch-size="$TOTAL_BATCH_SIZE" \
        --device-batch-size="$dbs" --eval-tokens="$EVAL_TOKENS" --model-tag="$tag" --run="$run" \
        --core-metric-every=999999 --core-metric-max-per-task=-1 --sample-every=-1 --save-every=-1 \
        2>&1 | tee "$log"; then
      echo "warning: budget $flops depth $d failed (see $log); going on" >&2
      continue
    fi
    if ! row=$(python -m nanochat.report parse-json base_train "$log" --fields "$FIELDS"); then
      echo "warning: budget $flops depth $d printed no result line (see $log)" >&2
      continue
    fi
    core=$(python -m nanochat.report parse-json core_metric \
      "$NANOCHAT_BASE_DIR/base_checkpoints/$tag/train_log.jsonl" --default "")
    echo "$flops,$row,$core" >> "$RESULTS"
  done
done
echo "Results: $RESULTS"
cat "$RESULTS"
