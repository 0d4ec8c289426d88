#!/usr/bin/env bash
# The test command of README.md: set up ./.venv (first run: a few minutes), run every
# test of this repository, then upstream vLLM's EPLB tests as shipped and patched to
# run against vllm-eplb (printed side by side).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh
.venv/bin/python -m pytest -q -ra "$@"
.venv/bin/python -m vllm_eplb.tools.upstream_tests
