#!/usr/bin/env bash
# Install blockmerge with its test dependencies into .venv and run the whole test suite.
# On a machine without an NVIDIA GPU, torch is pinned to the CPU wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! command -v nvidia-smi >/dev/null 2>&1; then
  python -m pip install -q "torch==2.13.0"
fi
python -m pip install -q -e ".[test]"
python -m ruff check src tests bench
python -m pytest -q "$@"
