#!/usr/bin/env bash
# The whole pipeline on a CPU (or one small GPU / Apple MPS): data -> tokenizer -> base model ->
# base eval -> identity data -> SFT -> chat eval -> report. About 30 minutes on a 2-core machine.
#
#   bash runs/runcpu.sh                                   # downloads 2+1 ClimbMix shards, the eval bundle, task data
#   NANOCHAT_DATA_DIR=DIR bash runs/runcpu.sh             # local parquet shards (python -m nanochat.dataset --from-text makes them)
#   NANOCHAT_QUICK=1 ... bash runs/runcpu.sh              # a 2-minute smoke run of every stage (CI runs it on fixtures)
#
# Offline, point it at local copies: NANOCHAT_DATA_DIR (parquet shards), NANOCHAT_EVAL_BUNDLE (the
# unzipped CORE eval bundle; without it CORE is skipped), NANOCHAT_TASK_DATA_DIR (task data such as
# gsm8k/{train,test}.jsonl; SFT and chat eval skip the tasks that are absent, with a warning; with
# none at all SFT trains on the identity conversations and the spelling tasks, and validates on a
# held-out tenth of the identity conversations). A preflight checks all of this in the first seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
export PYTHONUNBUFFERED=1
mkdir -p "$NANOCHAT_BASE_DIR"

# ---- environment: the project's venv, installed the way the README says ----
if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  source .venv/bin/activate
fi
if ! python -c "import nanochat.server, torch" 2>/dev/null; then
  python -c "import torch" 2>/dev/null || pip install --quiet "${NANOCHAT_TORCH:-torch==2.13.0}"
  pip install --quiet -e .
fi

online() { python -c "import socket; socket.setdefaulttimeout(5); socket.getaddrinfo('$1', 443)" 2>/dev/null; }

# ---- sizes: the full CPU run, or the smoke run ----
if [ "${NANOCHAT_QUICK:-0}" = 1 ]; then
  VOCAB=2048; MAX_CHARS=20000000
  DEPTH=2; SEQ=128; BATCH=8; TOTAL=1024; STEPS=20; EVAL_TOKENS=8192; COMPILE=0
  CORE_PER_TASK=4; SPLIT_TOKENS=4096
  IDENTITY=200; SFT_STEPS=10
  CHAT_PROBLEMS=2; CHAT_TOKENS=32; FREE_GB=0.5
else
  VOCAB=8192; MAX_CHARS=1000000000
  DEPTH=4; SEQ=512; BATCH=8; TOTAL=4096; STEPS=1200; EVAL_TOKENS=131072; COMPILE=1
  CORE_PER_TASK=32; SPLIT_TOKENS=65536
  IDENTITY=1000; SFT_STEPS=300
  CHAT_PROBLEMS=24; CHAT_TOKENS=256; FREE_GB=3
fi
TAG="d$DEPTH"
DATA_FLAG=${NANOCHAT_DATA_DIR:+--data-dir=$NANOCHAT_DATA_DIR}

# ---- preflight: every input, disk, device and dtype checked now, each problem with its fix ----
python -m nanochat.preflight --min-free-gb=$FREE_GB

# ---- data: local shards or a download ----
if [ -z "${NANOCHAT_DATA_DIR:-}" ]; then
  python -m nanochat.dataset -n 2
elif ! online raw.githubusercontent.com && [ ! -f "$NANOCHAT_BASE_DIR/words_alpha.txt" ]; then
  python -m nanochat.tasks.spellingbee --words-from-data "$NANOCHAT_DATA_DIR"  # offline word list for the spelling tasks
fi

python -m nanochat.report reset

# ---- tokenizer ----
python -m scripts.tok_train --vocab-size=$VOCAB --max-chars=$MAX_CHARS $DATA_FLAG
python -m scripts.tok_eval $DATA_FLAG

# ---- base model ----
CORE_FLAG=""
if [ -n "${NANOCHAT_EVAL_BUNDLE:-}" ]; then
  CORE_FLAG="--bundle-dir=$NANOCHAT_EVAL_BUNDLE"
elif [ ! -d "$NANOCHAT_BASE_DIR/eval_bundle" ] && ! online karpathy-public.s3.us-west-2.amazonaws.com; then
  CORE_FLAG="skip"  # (the preflight said so)
fi
python -m scripts.base_train --depth=$DEPTH --head-dim=64 --window-pattern=L --max-seq-len=$SEQ \
  --device-batch-size=$BATCH --total-batch-size=$TOTAL --num-iterations=$STEPS --eval-every=$((STEPS / 4)) \
  --eval-tokens=$EVAL_TOKENS --core-metric-every=-1 --sample-every=$STEPS --compile=$COMPILE $DATA_FLAG \
  --max-data-passes=2  # a small local corpus: fewer steps rather than memorizing it
if [ "$CORE_FLAG" = skip ]; then EVALS="bpb,sample"; CORE_FLAG=""; else EVALS="core,bpb,sample"; fi
python -m scripts.base_eval --eval=$EVALS --model-tag=$TAG --device-batch-size=$BATCH \
  --split-tokens=$SPLIT_TOKENS --max-per-task=$CORE_PER_TASK $CORE_FLAG $DATA_FLAG

# ---- chat: identity conversations, SFT on the mixture (absent tasks skipped), chat eval ----
python -m scripts.gen_identity --num=$IDENTITY
python -m scripts.chat_sft --model-tag=$TAG --num-iterations=$SFT_STEPS \
  --eval-every=$((SFT_STEPS / 2)) --eval-tokens=$EVAL_TOKENS --chatcore-every=-1 --compile=$COMPILE
python -m scripts.chat_eval -i sft -g $TAG -x $CHAT_PROBLEMS -m $CHAT_TOKENS

python -m nanochat.report generate --no-copy
echo
echo "Done. The report: $NANOCHAT_BASE_DIR/report/report.md (and report.html, with plots)."
echo "Talk to the model:"
echo "  source .venv/bin/activate"
echo "  python -m scripts.chat_cli -p \"Who are you?\"     # one answer"
echo "  python -m scripts.chat_cli                         # a conversation in the terminal"
echo "  python -m scripts.chat_web                         # then open http://127.0.0.1:8000"
