"""Rebalance stall on GPUs: what moving experts costs the decode loop, per strategy.

N ranks (one process each) run a synthetic expert-parallel MoE decode loop: every
layer routes a skewed batch of tokens (top-k of E logical experts) through the
routing maps, and each rank computes its local slots' tokens with one grouped GEMM
(DeepSeek-V3 expert shapes in bf16: hidden 7168, expert intermediate 2048, 88 MB per
expert; `--depth` layers of compute per pass cycle over the resident layers). The
vllm-eplb balancer is driven as vLLM's model runner drives it: `catch_up()` before each
pass, the runner's pass count advanced as the pass starts, the pass (its first MoE layer
advances the model's ForwardCounter on the device, the pass clock's check), `tick()`
after the pass's tokens reached the CPU.

Strategies, each starting from the same placement and load and going through one
rebalance while the loop keeps running:

  stop-the-world   at the window's end: load all-reduce, plan, every layer moved in that
                   one pass (upstream vLLM's synchronous EPLB), over the fastest backend here
  gloo             vllm-eplb, one step at a time, through pinned host staging over gloo
  cuda_ipc         vllm-eplb, pulled over CUDA IPC on a side stream
  nccl             vllm-eplb, NCCL isend/irecv on a side stream (one GPU per rank only)

Every strategy runs `--reps` times, interleaved (rep r runs them in an order rotated by
r), in one command, plus one untimed checked run per strategy in `--checked`. Per run:

  steady   passes before the window's end (after `--skip` warm-up passes), the placement
           in force before the rebalance; passes next to a correctness check excluded
  stall    every pass from the window's end until the new placement is live, plus
           `--tail` passes: the window snapshot, the load all-reduce, planning, syncing,
           the first use of a backend's group, every transfer step and commit
  after    passes after the stall window: the balanced placement
Ratios (stall p99 / steady p99, stall max / steady p99, after p50 / steady p50) are taken
within a run; the table gives their median and [min, max] over runs. Timed runs check
correctness once in the warm-up and once after the stall window (never inside steady or
stall passes); the checked run checks after every commit and is not timed.

Checks: every local slot's weight fingerprint equals that of the expert its map names,
the maps are equal on every rank, and a probe batch's expert outputs are bit-identical
to those before any rebalance.

    python benchmarks/gpu_rebalance.py --depth 58 --json out.json --plot out.png   # 1 rank/GPU
    python benchmarks/gpu_rebalance.py --ranks 4 --depth 58     # 4 ranks on 2 GPUs: "shared"
    python benchmarks/gpu_rebalance.py --device cpu --tiny      # logic check, gloo, no GPU

With more ranks than GPUs, rank r runs on GPU r % G: ranks share GPUs (timings include
the other ranks' work on that GPU, NCCL is skipped since it refuses two ranks on one GPU)
and the table's first line says "SHARED".
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from benchmarks.rebalance.model import STRATEGIES  # noqa: E402
# run_figures: tests/test_gpu_rebalance_cpu.py reads it from this module
from benchmarks.rebalance.report import plot, print_table, run_figures, summarize, targets  # noqa: E402,F401
from benchmarks.rebalance.run import rank_main  # noqa: E402
from vllm_eplb.harness.launcher import RankFailed, TimedOut, launch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--ranks", type=int, default=0, help="default: number of GPUs (at least 2)")
    ap.add_argument("--ranks-per-node", type=int, default=0)
    ap.add_argument("--layers", type=int, default=8, help="resident MoE layers (weights in memory, rebalanced)")
    ap.add_argument("--depth", type=int, default=0, help="MoE layers of compute per pass, cycling the resident "
                    "layers' weights (58 for DeepSeek-V3's pass time); default: --layers")
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--redundant", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=7168)
    ap.add_argument("--inter", type=int, default=2048)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--zipf", type=float, default=1.2)
    ap.add_argument("--policy", default="deepseek", help="deepseek moves more than min-move: a harder test of the transfer")
    ap.add_argument("--warmup", type=int, default=30, help="passes before the load window opens")
    ap.add_argument("--window", type=int, default=30)
    ap.add_argument("--skip", type=int, default=10, help="first passes left out of steady (warm-up)")
    ap.add_argument("--tail", type=int, default=4, help="passes after live still counted in the stall window")
    ap.add_argument("--after-passes", type=int, default=30)
    ap.add_argument("--max-stall-passes", type=int, default=400)
    ap.add_argument("--agreement-lag", type=int, default=2)
    ap.add_argument("--layers-per-pass", type=int, default=1)
    ap.add_argument("--plan-order", choices=["plan", "sorted"], default="plan",
                    help="sorted: hand backends each rank's transfers in (src, dst) order (A/B of the plan's rotated order)")
    ap.add_argument("--planner", choices=["process", "thread"], default="process")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--checked", default="all", help="strategies with one untimed run checked after every commit "
                    "(comma-separated, 'all' or 'none')")
    ap.add_argument("--time-budget", type=float, default=0, help="seconds after set-up; no new run starts after this "
                    "(default: deadline - 60)")
    ap.add_argument("--deadline", type=float, default=1e9, help="seconds; the ranks are stopped then and the runs done reported")
    ap.add_argument("--probe-tokens", type=int, default=4)
    ap.add_argument("--peer-copy-mb", type=int, default=1024)
    ap.add_argument("--big-layer-mb", type=float, default=256)
    ap.add_argument("--strategies", default=",".join(STRATEGIES),
                    help="comma-separated; NAME:N moves N layers per step (default --layers-per-pass)")
    ap.add_argument("--profile", default="", help="strategies to run once more under torch.profiler (rank 0)")
    ap.add_argument("--profile-dir", default="profile")
    ap.add_argument("--profile-trace", action="store_true", help="also write the chrome trace (large)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dispatch", choices=["hash", "balanced"], default="hash",
                    help="the router's replica choice (vllm_eplb/kernels/replica_dispatch.py)")
    ap.add_argument("--tiny", action="store_true", help="small shapes (hidden 64, inter 32, 64 tokens, 4 layers)")
    ap.add_argument("--fault", action="store_true", help=argparse.SUPPRESS)  # corrupt a slot in the checked run
    ap.add_argument("--json", help="write the summary rows and per-run figures here")
    ap.add_argument("--plot", help="write a PNG of pass time around the rebalance, every timed run")
    args = ap.parse_args()
    if args.tiny:
        args.hidden, args.inter, args.tokens, args.layers, args.experts, args.redundant = 64, 32, 64, 4, 16, 4
        args.peer_copy_mb = 16
    args.strategies = [s for s in args.strategies.split(",") if s]
    args.profile = [s for s in args.profile.split(",") if s]
    args.checked = (args.strategies if args.checked == "all" else [] if args.checked == "none"
                    else [s for s in args.checked.split(",") if s])
    if not args.time_budget:
        args.time_budget = max(1.0, args.deadline - 60)
    bad = [s for s in args.strategies + args.profile if s.split(":")[0] not in STRATEGIES]
    if bad:
        ap.error(f"unknown strategies {bad}; choose from {STRATEGIES}")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no GPU here; use --device cpu for a logic check")
    world = args.ranks or max(2, torch.cuda.device_count() if args.device == "cuda" else 2)
    # the planner process imports vllm_eplb too
    root = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
    os.environ["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])

    t0 = time.time()
    try:
        results = launch(rank_main, world, (args,), timeout_s=max(1.0, args.deadline))
    except RankFailed as exc:
        sys.exit(str(exc))
    except TimedOut as exc:  # report the runs every rank finished
        if any(res is None for res in exc.partial):
            sys.exit(f"{exc}; rank(s) {[r for r, res in enumerate(exc.partial) if res is None]} finished no run")
        results = exc.partial
        for res in results:
            res["deadline_hit"] = True
    n_done = min(len(res["runs"]) for res in results)
    for res in results:
        res["runs"] = res["runs"][:n_done]
    rows, extra = summarize(results, args)
    print_table(rows, results, args)
    print(f"# wall time {time.time() - t0:.0f} s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "peer_copy_gbps": results[0].get("peer_copy_gbps"), "device": results[0].get("device_name"),
                       "ngpu": results[0].get("ngpu"), "shared_gpu": results[0].get("shared_gpu"), "rows": rows,
                       "targets": {r["strategy"]: targets(r, args) for r in rows},
                       "per_run": [{k: v for k, v in f.items()} for f in extra["per_run"]]}, fh)
    if args.plot:
        try:
            plot(extra["per_run"], args.plot, args, f"{len(results)} ranks on {results[0].get('ngpu') or 'CPU'} x "
                 f"{results[0].get('device_name', '')}" + (" (shared)" if results[0].get("shared_gpu") else ""))
        except ImportError:
            print("(matplotlib not installed: no plot)")
    failed = [r["strategy"] for r in rows if r["checks"]["slots"] or r["checks"]["maps"] or r["checks"]["outputs"]
              or r["failed_runs"] or not r["checks"]["checks"]]
    if failed:
        sys.exit(f"correctness checks failed for {failed}")


if __name__ == "__main__":
    main()
