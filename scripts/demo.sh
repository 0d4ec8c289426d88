#!/usr/bin/env bash
# Main job of README.md (until vLLM serving lands): run the balancer across 4 processes.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m vllm_eplb.harness.demo "$@"
