#!/usr/bin/env bash
# The test command of README.md. Installs what it needs on a fresh machine (first run:
# several minutes), then, per supported vLLM release (vllm_eplb/compat/versions.py):
#
#   vLLM 0.32.0 (primary, ./.venv): every test of this repository (static seam checks of
#     0.30.0/0.32.0/0.33.0 and patch checks of every release included), then upstream
#     vLLM's EPLB tests of the 0.32.0 sdist, as shipped and patched to run against vllm-eplb.
#   vLLM 0.30.0 (./.venv-vllm-0.30.0): the start-up preflight of the hooks and one end-to-end
#     `vllm serve` with the balancer (its patches are checked against the 0.30.0 sdist in the
#     primary run). Upstream's tests of the 0.30.0 sdist take 9 min more: EPLB_TEST_030_UPSTREAM=1
#     runs them too. EPLB_TEST_PRIMARY_ONLY=1 skips this part.
#
# Arguments go to the primary pytest run (e.g. -k EXPR, -x).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh
.venv/bin/python -m pytest -q -ra --durations=60 "$@"
.venv/bin/python -m vllm_eplb.tools.upstream_tests

if [ "${EPLB_TEST_PRIMARY_ONLY:-0}" != 1 ]; then
  echo "== vLLM 0.30.0"
  VLLM_VERSION=0.30.0 bash scripts/setup_env.sh
  .venv-vllm-0.30.0/bin/python -m pytest -q -ra tests/test_hooks.py \
    "tests/test_e2e_vllm.py::test_cycles_complete_and_metrics_show_every_state_in_order" \
    "tests/test_e2e_vllm.py::test_vllm_command_works"
  if [ "${EPLB_TEST_030_UPSTREAM:-0}" = 1 ]; then
    .venv-vllm-0.30.0/bin/python -m vllm_eplb.tools.upstream_tests
  fi
fi
