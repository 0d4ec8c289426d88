#!/usr/bin/env bash
# Main job of README.md: set up ./.venv, build a tiny Qwen3-MoE locally, serve it with
# `vllm serve ... --enable-expert-parallel --eplb-config eplb.json` (TP=2 on CPU), drive
# requests and print the balancer's state changes read from /metrics.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m vllm_eplb.harness.serve_demo "$@"
