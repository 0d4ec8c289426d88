#!/usr/bin/env bash
# session 3, call B (machine still warm from A): one-GPU checks of benchmarks/gpu_vllm_serve.py on vLLM 0.26.0
set -u
T0=$(date +%s)
export PYTHONPATH=/tmp/site VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONUNBUFFERED=1
cd /tmp/w/wt24
timeout 580 python3 benchmarks/gpu_vllm_serve.py --single-gpu --layers 8 --experts 16 --top-k 2 --hidden 512 \
  --moe-intermediate 256 --groups 2 --hot 3 --vocab 2048 --reps 1 --model-dir /tmp/sgmodel --workdir /tmp/sg --out $OUT/single.jsonl > $OUT/single.log 2>&1
echo "single-gpu rc $? $(( $(date +%s)-T0 ))s"; tail -14 $OUT/single.log
cp /tmp/sg/*.log $OUT/ 2>/dev/null
