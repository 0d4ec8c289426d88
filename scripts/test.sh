#!/usr/bin/env bash
# The test command of README.md: set up ./.venv (first run: a few minutes) and run every test.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m pytest -q -ra "$@"
