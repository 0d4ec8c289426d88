#!/usr/bin/env bash
# session 3, call A: assemble vLLM 0.26.0 + this tree (wt24 snapshot); gpu_rebalance 2 ranks on 1 GPU; fp8 copy checks
set -u
T0=$(date +%s)
mkdir -p /root/pieces; cp .gpu/piece.3 /root/pieces/
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $OUT/gpu.txt 2>&1
bash .gpu/assemble.sh /root/pieces /tmp/site > $OUT/assemble.log 2>&1; echo "assemble rc $? $(( $(date +%s)-T0 ))s"
mkdir -p /tmp/w && tar -C /tmp/w -xzf .gpu/wt24.tgz
export PYTHONPATH=/tmp/site VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-build-isolation --upgrade --target /tmp/site /tmp/w/wt24 > $OUT/pip.log 2>&1; echo "project install rc $?"
python3 - <<'PY' 2>&1 | tee $OUT/fp8.txt
import torch, torch.distributed as dist
w = torch.randn(8, 64, 32, device="cuda").to(torch.float8_e4m3fn)
out = torch.empty(3, 64, 32, device="cuda", dtype=w.dtype)
out[0:2].copy_(w[2:4], non_blocking=True); out[2].copy_(w[7])
w2 = w.clone(); w2[1].copy_(out[0])
print("fp8 copy_ rows ok", torch.equal(w2[1].view(torch.uint8), w[2].view(torch.uint8)))
for op in ("index_select", "index_copy_"):
    try:
        getattr(w, op)(0, torch.tensor([1, 2], device="cuda"), *( [out[:2]] if op == "index_copy_" else []))
        print(op, "fp8 cuda ok")
    except Exception as e:
        print(op, "fp8 cuda:", str(e).splitlines()[0])
PY
cd /tmp/w/wt24
timeout $(( 590 - ($(date +%s)-T0) )) python3 benchmarks/gpu_rebalance.py --ranks 2 --depth 58 --reps 2 --strategies stop-the-world,cuda_ipc,gloo \
  --deadline $(( 560 - ($(date +%s)-T0) )) --json $OUT/rebalance.json --plot $OUT/rebalance.png > $OUT/rebalance.log 2>&1
echo "gpu_rebalance rc $? $(( $(date +%s)-T0 ))s"; tail -16 $OUT/rebalance.log
