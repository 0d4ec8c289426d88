#!/usr/bin/env bash
# session 3, call C: upstream vLLM 0.26.0's EPLB tests, as shipped and against vllm-eplb (this tree)
set -u
T0=$(date +%s)
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
mkdir -p /tmp/vllm-0.26.0 && tar -C /tmp/vllm-0.26.0 -xzf .gpu/vllm-0.26.0-tests.tgz
cd /tmp/w/wt24
python3 -m vllm_eplb.tools.upstream check --kind tests --version 0.26.0 --src /tmp/vllm-0.26.0 2>&1 | tail -3
cp docs/upstream_tests.md $OUT/upstream_tests.md
timeout 540 python3 -m vllm_eplb.tools.upstream_tests --release 0.26.0 --src /tmp/vllm-0.26.0 --markdown $OUT/upstream_tests.md > $OUT/upstream.log 2>&1
echo "upstream_tests rc $? $(( $(date +%s)-T0 ))s"; tail -30 $OUT/upstream.log
