#!/usr/bin/env bash
# The CPU demo, as far as the pipeline exists today: data -> tokenizer -> a small base model.
# NANOCHAT_DATA_DIR=DIR uses local parquet shards instead of downloading; NANOCHAT_QUICK=1 is a smoke run.
set -euo pipefail
cd "$(dirname "$0")/.."
export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
[ -x .venv/bin/python ] || python3 -m venv .venv
source .venv/bin/activate
python -c "import torch" 2>/dev/null || pip install --quiet "${NANOCHAT_TORCH:-torch==2.13.0}"
pip install --quiet -e .

if [ -z "${NANOCHAT_DATA_DIR:-}" ]; then
  python -m nanochat.dataset -n 2 || { echo "error: could not download shards; set NANOCHAT_DATA_DIR to a folder of parquet shards (or make one with python -m nanochat.dataset --from-text DIR)." >&2; exit 2; }
fi
if [ "${NANOCHAT_QUICK:-0}" = 1 ]; then
  VOCAB=4096; STEPS=20; DEPTH=2; SEQ=128; BATCH=8; TOTAL=1024; EVAL=8192
else
  VOCAB=8192; STEPS=2000; DEPTH=4; SEQ=256; BATCH=16; TOTAL=4096; EVAL=65536
fi
python -m scripts.tok_train --vocab-size=$VOCAB --max-chars=200000000 ${NANOCHAT_DATA_DIR:+--data-dir="$NANOCHAT_DATA_DIR"}
python -m scripts.tok_eval ${NANOCHAT_DATA_DIR:+--data-dir="$NANOCHAT_DATA_DIR"}
python -m scripts.base_train --depth=$DEPTH --head-dim=64 --window-pattern=L --max-seq-len=$SEQ \
  --device-batch-size=$BATCH --total-batch-size=$TOTAL --num-iterations=$STEPS --eval-every=$((STEPS / 4)) \
  --eval-tokens=$EVAL --core-metric-every=-1 --sample-every=$STEPS ${NANOCHAT_DATA_DIR:+--data-dir="$NANOCHAT_DATA_DIR"}
echo "Base model saved under $NANOCHAT_BASE_DIR/base_checkpoints/d$DEPTH (chat stages come with later issues)."
