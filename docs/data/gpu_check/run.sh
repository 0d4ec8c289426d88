#!/usr/bin/env bash
# On a lent GPU machine (the device tool), from the tree's root: assemble the offline vLLM 0.26.0
# install of ../shared/gpu/wheelhouse.sh (its pieces copied to /root/pieces by earlier calls, its
# assemble.sh carried as .gpu/assemble.sh) once per machine, install this tree over it, then run
# the command given, e.g.
#   bash docs/data/gpu_check/run.sh python3 benchmarks/gpu_check.py --commit HASH --json $OUT/gpu_check.json
# A call's limit kills everything it started, the copy of server logs to $OUT after the command
# included: bound a long command below the call's limit (e.g. `timeout 480 python3 ...; cp ...`) so
# the logs of a run cut by time come back (2026-12-07: vLLM sync at EP=4 cut with no log).
set -u
T0=$(date +%s)
if [ ! -f /tmp/site/.assembled ]; then
  bash .gpu/assemble.sh /root/pieces /tmp/site > "$OUT/assemble.log" 2>&1 && touch /tmp/site/.assembled
  echo "assemble: $(tail -1 "$OUT/assemble.log") in $(( $(date +%s) - T0 )) s"
fi
export PYTHONPATH=/tmp/site VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-build-isolation --upgrade --target /tmp/site . > "$OUT/pip.log" 2>&1
echo "project installed over it: rc $?"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$@"
