#!/usr/bin/env bash
# The speedrun: tokenizer, a d24 base model, SFT and evaluation on one 8-GPU node,
# with the report card written at the end (report.md here, report.{md,html} + plots in
# $NANOCHAT_BASE_DIR/report/). Run from the repository root, ideally inside screen/tmux:
#     bash runs/speedrun.sh
#     WANDB_RUN=speedrun RUN_RL=1 bash runs/speedrun.sh     # log to wandb, and add the RL stage
# Knobs (environment): NPROC (GPUs, 8), DEPTH (24), DEVICE_BATCH_SIZE (16), RUN_RL (0),
# FP8 (0: pass --fp8 to base_train only if this build implements it), NANOCHAT_TORCH (torch pin).
# Each stage's output is kept in $NANOCHAT_BASE_DIR/speedrun_logs/<stage>.log.
set -euo pipefail
cd "$(dirname "$0")/.."

export OMP_NUM_THREADS=1
export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
NPROC="${NPROC:-8}"
DEPTH="${DEPTH:-24}"
DEVICE_BATCH_SIZE="${DEVICE_BATCH_SIZE:-16}"
WANDB_RUN="${WANDB_RUN:-dummy}"
RUN_RL="${RUN_RL:-0}"
FP8_FLAG=()
if [ "${FP8:-0}" = 1 ]; then FP8_FLAG=(--fp8); fi
LOG_DIR="$NANOCHAT_BASE_DIR/speedrun_logs"
mkdir -p "$LOG_DIR"

# ---- environment ----
[ -x .venv/bin/python ] || python3 -m venv .venv
# shellcheck disable=SC1091
source .venv/bin/activate
python -c "import torch" 2>/dev/null || pip install --quiet "${NANOCHAT_TORCH:-torch==2.13.0}"
pip install --quiet -e .

# inputs, disk, GPUs, dtype: now, not hours in (SKIP_PREFLIGHT=1 when you know better)
[ "${SKIP_PREFLIGHT:-0}" = 1 ] || python -m nanochat.preflight --min-free-gb=60 --gpus="$NPROC"

# stage NAME CMD...: run CMD, keeping its output in $LOG_DIR/NAME.log (and on the terminal)
stage() {
  local name="$1"
  shift
  echo "==== $name: $*"
  "$@" 2>&1 | tee "$LOG_DIR/$name.log"
}
launch() { torchrun --standalone --nproc_per_node="$NPROC" "$@"; }

# ---- report header: git, hardware, software, "Run started" ----
python -m nanochat.report reset

# ---- data and tokenizer ----
# 8 shards (~2B characters) for the tokenizer now; the ~170 the d24 run needs download meanwhile.
python -m nanochat.dataset -n 8
python -m nanochat.dataset -n 170 > "$LOG_DIR/dataset.log" 2>&1 &
DATASET_PID=$!
stage tok_train python -m scripts.tok_train --max-chars=2000000000
stage tok_eval python -m scripts.tok_eval
echo "waiting for the pretraining shards (pid $DATASET_PID) ..."
wait "$DATASET_PID"

# ---- base model: pretrain, then CORE / bpb / samples ----
stage base_train launch -m scripts.base_train -- --depth="$DEPTH" --target-param-data-ratio=8 \
  --device-batch-size="$DEVICE_BATCH_SIZE" "${FP8_FLAG[@]}" --run="$WANDB_RUN"
stage base_eval launch -m scripts.base_eval -- --device-batch-size="$DEVICE_BATCH_SIZE"

# ---- SFT (sizes are inherited from the base checkpoint), then chat evaluation ----
IDENTITY="$NANOCHAT_BASE_DIR/identity_conversations.jsonl"
if [ ! -f "$IDENTITY" ]; then
  curl -fsSL -o "$IDENTITY.tmp" https://karpathy-public.s3.us-west-2.amazonaws.com/identity_conversations.jsonl \
    && mv "$IDENTITY.tmp" "$IDENTITY" \
    || echo "warning: could not download the identity conversations; SFT runs without them" >&2
fi
stage chat_sft launch -m scripts.chat_sft -- --run="$WANDB_RUN"
stage chat_eval_sft launch -m scripts.chat_eval -- -i sft

# ---- RL on GSM8K (optional) ----
if [ "$RUN_RL" = 1 ]; then
  stage chat_rl launch -m scripts.chat_rl -- --run="$WANDB_RUN"
  stage chat_eval_rl launch -m scripts.chat_eval -- -i rl -a GSM8K
fi

# ---- the report card ----
python -m nanochat.report generate
echo "Base model: $(python -m nanochat.report parse-json base_train "$LOG_DIR/base_train.log" \
  --fields model_tag,min_val_bpb,training_time_s) (tag, min val bpb, training seconds)"
echo "Talk to it: python -m scripts.chat_cli -p 'Why is the sky blue?'   or   python -m scripts.chat_web"
