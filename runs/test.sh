#!/usr/bin/env bash
# The test command: make (or reuse) a virtualenv, install nanochat with its test extras,
# lint, and run pytest. Extra arguments go to pytest (e.g. `bash runs/test.sh -m slow`).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${NANOCHAT_VENV:-.venv}"
TORCH_PIN="${NANOCHAT_TORCH:-torch==2.13.0}"   # pin, so pip never swaps in a different (multi-GB) build

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
# shellcheck disable=SC1091
source "$VENV/bin/activate"
python -m pip install --quiet --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install --quiet "$TORCH_PIN"
python -m pip install --quiet -e ".[dev]"

ruff check .
# -p no:cacheprovider keeps a read-only or shared checkout clean
OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" python -m pytest -p no:cacheprovider "$@"
