"""Time to adapt: passes from a change of traffic mix until the observed balancedness is back
within 0.02 of what a fresh plan gives, with cycles on a fixed interval against the load trigger
(core/load_trigger.py), the same load for both.

    python benchmarks/adapt.py rig                 # the multi-rank rig (harness), CPU, ~2 min
    python benchmarks/adapt.py serve               # `vllm serve` on CPU, the tiny Qwen3-MoE, ~10 min

rig: the harness's ranks (real gloo process group, the exact synthetic MoE) serve a topic mix
(harness DriftingWorkload) whose popularity rotates by one topic at `--shift`. Every rank
records its slots' tokens of every pass; the observed balancedness at pass p is mean/max
tokens per rank summed over the `--span` passes ending at p (and over layers). The fresh
plan: the balancer's policy run on the first window of post-shift traffic (routed offline with
the same router), its balancedness measured the same way on the same passes. Time to adapt:
from the shift to the first pass from which the observed balancedness stays within 0.02 of the
fresh plan's until the run ends. Fixed interval: trigger_margin 0; trigger: the default margin.

serve: `vllm serve` TP=2 + EP on CPU with the tiny Qwen3-MoE of tiny_model.py (skewed routers),
clients send prompts of one mix, then of another (`--shift-after` seconds in). The observed
balancedness is the balancer's own, read from /metrics (vllm:eplb_balancedness{kind="observed"}
at every window: with trigger_margin 1 the watch reports it between cycles without ever
triggering, so both servers are measured alike); the pass numbers from vllm:eplb_pass. Time to
adapt: from the pass the mix changed to the first window end whose observed balancedness is
within 0.02 of the best observed after the shift... (see `serve` for what stands for the fresh plan).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from vllm_eplb.core.placement import RoutingMaps, Topology, default_placement, physical_to_logical_load  # noqa: E402
from vllm_eplb.core.policies import PlanInput, get_policy  # noqa: E402
from vllm_eplb.harness.runner import HarnessConfig, run_scenarios  # noqa: E402
from vllm_eplb.harness.synthetic_moe import DriftingWorkload, SyntheticMoE  # noqa: E402

WITHIN = 0.02


def span_balancedness(rank_loads: np.ndarray, span: int) -> np.ndarray:
    """rank_loads (passes, layers, ranks) -> (passes,) mean/max per rank over the `span` passes
    ending at each pass (sum over layers of the mean over sum of the max); NaN before a full span."""
    csum = np.concatenate([np.zeros((1,) + rank_loads.shape[1:]), np.cumsum(rank_loads, axis=0)])
    out = np.full(len(rank_loads), np.nan)
    window = csum[span:] - csum[:-span]  # (passes - span + 1, layers, ranks)
    top = window.max(axis=2).sum(axis=1)
    out[span - 1 :] = np.where(top > 0, window.mean(axis=2).sum(axis=1) / np.maximum(top, 1e-12), 1.0)
    return out


def routed(cfg: HarnessConfig, passes: range) -> list[torch.Tensor]:
    """The rig's routing of the given passes, offline: (layers, tokens, top_k) logical experts each."""
    topo = Topology(cfg.ranks, cfg.logical, cfg.logical + cfg.redundant, cfg.ranks_per_node)
    model = SyntheticMoE.exact_model(topo, cfg.layers, cfg.dim, cfg.top_k, 0, cfg.seed, cfg.topics)
    work = DriftingWorkload(cfg.dim, cfg.tokens, cfg.topics, cfg.zipf, cfg.drift_every, cfg.seed)
    out = []
    for p in passes:
        h = work.batch(p)
        out.append(torch.stack([model.route(layer, h) for layer in range(cfg.layers)]))
    return out


def rank_loads_of(placement: np.ndarray, routing: list[torch.Tensor], topo: Topology) -> np.ndarray:
    """(passes, layers, ranks) tokens per rank with vLLM's hash dispatch (replica by token index)."""
    maps = RoutingMaps.allocate(placement, topo)
    out = []
    for ids in routing:
        tok = torch.arange(ids.shape[1])
        per = []
        for layer in range(ids.shape[0]):
            count = maps.replica_count[layer][ids[layer]]
            phys = maps.log2phy[layer][ids[layer], tok[:, None] % count]
            per.append(np.bincount(phys.reshape(-1).numpy(), minlength=topo.num_physical).reshape(topo.num_ranks, -1).sum(1))
        out.append(per)
    return np.array(out, dtype=np.float64)


def adapted_at(observed: np.ndarray, fresh: np.ndarray, shift: int) -> int | None:
    """First pass >= shift from which observed >= fresh - WITHIN on every later pass (passes are
    1-based: index i is pass i + 1); None if never."""
    ok = observed >= fresh - WITHIN
    bad = np.nonzero(~ok[shift - 1 :])[0]
    if not len(bad):
        return shift
    last_bad = shift - 1 + bad[-1]
    return last_bad + 2 if last_bad + 1 < len(observed) else None


def rig(args) -> None:
    window = args.window
    base = dict(window_size=window, step_interval=args.interval, agreement_lag=2, planner="thread")
    common = dict(ranks=args.ranks, layers=4, logical=16, redundant=args.ranks * 2, dim=16, top_k=2, tokens=args.tokens,
                  passes=args.passes, zipf=1.2, drift_every=args.shift, topics=16, check_every=50, record_pass_load=True)
    modes = {"fixed interval": {**base, "trigger_margin": 0.0}, "load trigger": {**base}}
    cfgs = [HarnessConfig(balancer=b, **common) for b in modes.values()]
    results = run_scenarios(cfgs, timeout_s=3600)
    cfg = cfgs[0]
    topo = Topology(cfg.ranks, cfg.logical, cfg.logical + cfg.redundant)
    # the fresh plan: the policy on the first post-shift window's load, from the start-up placement
    post = routed(cfg, range(args.shift, args.shift + window))
    start = default_placement(topo, cfg.layers)
    load = np.zeros((cfg.layers, topo.num_logical))
    for ids in post:
        for layer in range(cfg.layers):
            np.add.at(load[layer], ids[layer].reshape(-1).numpy(), 1)
    fresh_placement = get_policy("min-move").place(PlanInput(load, start, topo, window))
    every = routed(cfg, range(1, args.passes + 1))
    fresh = span_balancedness(rank_loads_of(fresh_placement, every, topo), args.span)
    print(f"\nrig: {cfg.ranks} ranks (gloo), {cfg.layers} layers x {cfg.logical} experts + {cfg.redundant}, top-{cfg.top_k}, "
          f"{cfg.tokens} tokens per pass; window {window}, interval {args.interval}; the topic mix rotates at pass "
          f"{args.shift}; balancedness over {args.span}-pass spans; policy min-move")
    hdr = ("mode", "cycles started after the shift (pass: why)", "placement live at", "observed before shift",
           "fresh plan after shift", "observed at the end", "time to adapt (passes)", "(windows)")
    print("| " + " | ".join(hdr) + " |")
    print("|" + "---|" * len(hdr))
    for (mode, _), reports in zip(modes.items(), results):
        loads = np.stack([r.pass_load for r in reports], axis=2).astype(np.float64)  # (passes, layers, ranks)
        observed = span_balancedness(loads, args.span)
        hist = reports[0].history
        starts = [f"{h.pass_no}" + (" (load)" if h.reason == "load trigger" else "") for h in hist
                  if h.trigger == "start_collecting" and h.pass_no >= args.shift]
        live = next((h.pass_no for h in hist if h.trigger in ("finish", "skip") and h.pass_no >= args.shift), None)
        at = adapted_at(observed, fresh, args.shift)
        took = "never" if at is None else str(at - args.shift)
        print("| " + " | ".join([
            mode, ", ".join(starts[:3]) or "none", str(live), f"{observed[args.shift - 2]:.3f}",
            f"{np.nanmean(fresh[args.shift + args.span:]):.3f}", f"{observed[-1]:.3f}", took,
            "" if at is None else f"{(at - args.shift) / window:.2f}",
        ]) + " |", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="where", required=True)
    r = sub.add_parser("rig")
    r.add_argument("--ranks", type=int, default=2)
    r.add_argument("--window", type=int, default=200)
    r.add_argument("--interval", type=int, default=1200)
    r.add_argument("--shift", type=int, default=1700)
    r.add_argument("--passes", type=int, default=3300)
    r.add_argument("--span", type=int, default=50)
    r.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    if args.where == "rig":
        rig(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
