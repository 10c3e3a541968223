#!/usr/bin/env bash
# The miniseries: one base model per depth at the default tokens:params ratio, on
# one 8-GPU node, and a CSV of what each run reports in its final {"base_train": {...}} JSON line
# (plus the final CORE metric from its train_log.jsonl). Runs already in the CSV are skipped.
# Run from the repository root with nanochat installed (e.g. after runs/speedrun.sh's setup):
#     bash runs/miniseries.sh
#     SERIES=jan DEPTHS="12 16 20" NPROC=4 SKIP_SETUP=1 bash runs/miniseries.sh
# Results: $NANOCHAT_BASE_DIR/<series>_miniseries_results/{results.csv, d<depth>.log}
set -euo pipefail
cd "$(dirname "$0")/.."

export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
NPROC="${NPROC:-8}"
SERIES="${SERIES:-$(date +%b%d | tr '[:upper:]' '[:lower:]')}"
DEPTHS="${DEPTHS:-12 14 16 18 20 22 24 26}"
WANDB_RUN="${WANDB_RUN:-dummy}"
RESULTS_DIR="$NANOCHAT_BASE_DIR/${SERIES}_miniseries_results"
RESULTS="$RESULTS_DIR/results.csv"
FIELDS="depth,model_tag,steps,total_batch_size,total_tokens,scaling_params,total_params,flops_per_token,total_flops,min_val_bpb,final_val_bpb,training_time_s"
mkdir -p "$RESULTS_DIR"
# inputs, disk, GPUs, dtype: now, not hours in (SKIP_PREFLIGHT=1 when you know better)
[ "${SKIP_PREFLIGHT:-0}" = 1 ] || python -m nanochat.preflight --min-free-gb=120 --gpus="$NPROC"

if [ "${SKIP_SETUP:-0}" != 1 ]; then
  python -m nanochat.dataset -n 1000
  python -m scripts.tok_train --max-chars=2000000000
fi

[ -f "$RESULTS" ] || echo "$FIELDS,core_metric" > "$RESULTS"
for d in $DEPTHS; do
  tag="${SERIES}_miniseries_d${d}"
  if awk -F, -v d="$d" -v t="$tag" '$1 == d && $2 == t { found = 1 } END { exit !found }' "$RESULTS"; then
    echo "== depth $d: already in $RESULTS, skipping"
    continue
  fi
  # smaller micro-batches for the bigger models (gradient accumulation keeps the total batch)
  if [ "$d" -ge 28 ]; then dbs=8; elif [ "$d" -ge 20 ]; then dbs=16; else dbs=32; fi
  run=dummy
  if [ "$WANDB_RUN" != dummy ]; then run="${WANDB_RUN}_${tag}"; fi
  log="$RESULTS_DIR/d${d}.log"
  echo "== depth $d (device batch $dbs, tag $tag) -> $log"
  if ! torchrun --standalone --nproc_per_node="$NPROC" -m scripts.base_train -- \
      --depth="$d" --device-batch-size="$dbs" --model-tag="$tag" --run="$run" \
      --core-metric-every=999999 --core-metric-max-per-task=-1 --sample-every=-1 --save-every=-1 \
      2>&1 | tee "$log"; then
    echo "warning: depth $d failed (see $log); going on with the next depth" >&2
    continue
  fi
  if ! row=$(python -m nanochat.report parse-json base_train "$log" --fields "$FIELDS"); then
    echo "warning: depth $d printed no result line (see $log)" >&2
    continue
  fi
  core=$(python -m nanochat.report parse-json core_metric \
    "$NANOCHAT_BASE_DIR/base_checkpoints/$tag/train_log.jsonl" --default "")
  echo "$row,$core" >> "$RESULTS"
done
echo "Results: $RESULTS"
cat "$RESULTS"
