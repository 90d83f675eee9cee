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
# The reference CLIP tokenizer (openai-clip's own SimpleTokenizer) that tokenizer tests compare against:
# its source distribution, fetched from PyPI as a test input, never imported by blockmerge itself.
mkdir -p .cache/test-inputs
if [ ! -f .cache/test-inputs/openai-clip-1.0.1.tar.gz ]; then
  python -m pip download -q --no-deps --no-binary :all: -d .cache/test-inputs "openai-clip==1.0.1" \
    || echo "test.sh: could not fetch the openai-clip sdist; reference tokenizer comparison will skip"
fi
export BLOCKMERGE_OPENAI_CLIP_SDIST="$PWD/.cache/test-inputs/openai-clip-1.0.1.tar.gz"
# The reference sampler loops (k-diffusion's own sampling.py, the version A1111 pins) that sampler tests
# compare against: the wheel is a test input read with zipfile, never installed or imported by blockmerge.
if [ ! -f .cache/test-inputs/k_diffusion-0.1.1.post1-py3-none-any.whl ]; then
  python -m pip download -q --no-deps -d .cache/test-inputs "k-diffusion==0.1.1.post1" \
    || echo "test.sh: could not fetch the k-diffusion wheel; reference sampler comparisons will fail"
fi
export BLOCKMERGE_KDIFFUSION_WHEEL="$PWD/.cache/test-inputs/k_diffusion-0.1.1.post1-py3-none-any.whl"
python -m ruff check src tests bench
python -m pytest -q "$@"
