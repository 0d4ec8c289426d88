"""Per-pass overhead of the balancer in real serving: decode throughput of `vllm serve`
(TP=2 + EP on CPU, the tiny Qwen3-MoE) with the balancer off, on but never
rebalancing, and on and recording load on every pass, in one run.

    python benchmarks/serving_overhead.py [--model DIR] [--requests 64] [--rounds 3]

Each configuration is a fresh server; each round sends the same requests (fixed
prompts, greedy, fixed length, `--concurrency` at a time) and counts generated
tokens per second. The table gives the median over rounds and its ratio to the
balancer-off baseline measured in the same run ("off" is measured first and last:
the spread between the two is the noise floor of the machine).

Anchor: upstream vLLM reported 1.66% for its EPLB's per-pass cost.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from vllm_eplb.harness.server import Server, metric  # noqa: E402
from vllm_eplb.harness.tiny_model import WORDS, build  # noqa: E402

NEVER = 10**9
LONG = 100_000  # passes: longer than any run here
CONFIGS = [
    ("off", None),
    # ticking, routing through the maps, never collecting: the steady-state cost
    ("on, idle (no rebalance)", {"window_size": 1000, "step_interval": NEVER, "num_redundant_experts": 4}),
    # recording load on every pass, never planning within the run: the cost while collecting
    # (a window whose int32 load counters cannot overflow at the tiny model's batch sizes)
    ("on, collecting every pass", {"window_size": LONG, "step_interval": LONG, "num_redundant_experts": 4}),
    ("off (again)", None),
]


def run_round(server: Server, prompts: list[str], max_tokens: int, concurrency: int) -> float:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        outs = list(pool.map(lambda p: server.complete(p, max_tokens=max_tokens), prompts))
    dt = time.perf_counter() - t0
    return sum(len(o) for o in outs) / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--port", type=int, default=8300)
    args = ap.parse_args()

    work = tempfile.mkdtemp(prefix="eplb-bench-")
    model = args.model or build(os.path.join(work, "tiny-moe"))
    prompts = [" ".join(WORDS[(i * 13 + j) % len(WORDS)] for j in range(8 + i % 8)) for i in range(args.requests)]
    results = []
    for name, cfg in CONFIGS:
        path = None
        if cfg is not None:
            path = os.path.join(work, f"eplb-{len(results)}.json")
            with open(path, "w") as fh:
                json.dump(cfg, fh)
        with Server(model, args.port, path, log_path=os.path.join(work, f"serve-{len(results)}.log")) as s:
            run_round(s, prompts[: args.concurrency], 8, args.concurrency)  # warm-up
            m0, t0 = s.metrics(), time.perf_counter()
            rates = [run_round(s, prompts, args.max_tokens, args.concurrency) for _ in range(args.rounds)]
            m1, t1 = s.metrics(), time.perf_counter()
        per_pass = None
        if cfg is not None:
            passes = metric(m1, "vllm:eplb_pass", rank=0) - metric(m0, "vllm:eplb_pass", rank=0)
            step_s = (metric(m1, "vllm:eplb_step_seconds_total", rank=0) or 0) - (metric(m0, "vllm:eplb_step_seconds_total", rank=0) or 0)
            per_pass = (step_s / passes * 1e6, (t1 - t0) / passes * 1e3)
        results.append((name, rates, per_pass))
        print(f"  {name}: {', '.join(f'{r:.0f}' for r in rates)} tokens/s", flush=True)

    base = statistics.median(results[0][1] + results[-1][1])
    router_us = router_cost_us(args.concurrency)
    print(
        f"\nDecode throughput, vllm serve TP=2+EP on CPU ({os.cpu_count()} cores), tiny Qwen3-MoE, "
        f"{args.requests} requests x {args.max_tokens} tokens, {args.concurrency} concurrent, median of {args.rounds} rounds"
    )
    print(f"{'balancer':<28} {'tokens/s':>9} {'min':>6} {'max':>6} {'vs off':>8}  {'step us/pass':>12} {'pass ms':>8} {'step share':>10}")
    for name, rates, per_pass in results:
        med = statistics.median(rates)
        cols = ""
        if per_pass:
            us, ms = per_pass
            cols = f"  {us:>12.1f} {ms:>8.2f} {100 * us / 1e3 / ms:>9.2f}%"
        print(f"{name:<28} {med:>9.0f} {min(rates):>6.0f} {max(rates):>6.0f} {med / base:>8.3f}{cols}")
    print("'vs off' divides by the median of both 'off' runs; the spread of the off runs is the noise floor.")
    print("'step us/pass': CPU time of the balancer's per-pass step (tick + metrics) in worker rank 0, from")
    print("vllm:eplb_step_seconds_total / vllm:eplb_pass; 'pass ms': wall time per forward pass in the same rounds.")
    print(
        f"Router map-and-record (torch, CPU) at {args.concurrency} tokens x top-2, 4 layers: {router_us['record']:.1f} us/pass recording, "
        f"{router_us['map']:.1f} us/pass mapping only, vs {router_us['identity']:.1f} us for upstream's CPU fallback (returns ids unchanged)."
    )


def router_cost_us(tokens: int, layers: int = 4, experts: int = 16, slots: int = 20) -> dict[str, float]:
    """Per-pass CPU cost of the router's logical->physical map (+ load record), micro-benchmarked."""
    import torch

    from vllm_eplb.core.placement import Topology, default_placement
    from vllm_eplb.core.routing_maps import RoutingMaps
    from vllm_eplb.kernels.replica_dispatch import torch_hash_map_and_record as torch_map_to_physical_and_record

    topo = Topology(2, experts, slots)
    maps = RoutingMaps.allocate(default_placement(topo, 1), topo)
    ids = torch.randint(0, experts, (tokens, 2), dtype=torch.int32)
    load = torch.zeros(slots, dtype=torch.int32)
    on, off = torch.tensor(True), torch.tensor(False)

    def bench(fn, n=2000):
        for _ in range(100):
            fn()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t0) / n * 1e6 * layers

    return {
        "record": bench(lambda: torch_map_to_physical_and_record(ids, load, maps.log2phy[0], maps.replica_count[0], on)),
        "map": bench(lambda: torch_map_to_physical_and_record(ids, load, maps.log2phy[0], maps.replica_count[0], off)),
        "identity": bench(lambda: ids),
    }


if __name__ == "__main__":
    main()
