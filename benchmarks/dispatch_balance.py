"""Per-pass balance and the MoE time stragglers cost: plans made with the cost model against
token-balanced plans (and hash vs balanced replica dispatch), side by side in one run, on the
rig's gated synthetic MoE (vllm_eplb/harness/synthetic_moe.py: its router, its grouped GEMMs,
DeepSeek-V3 expert shapes by default), as gpu_rebalance.py runs.

    python benchmarks/dispatch_balance.py                        # one GPU: 8 ranks simulated on it
    python benchmarks/dispatch_balance.py --device cpu --tiny    # logic check
    python benchmarks/dispatch_balance.py --dispatch hash,balanced --plans token   # the dispatch comparison

Plans (`--plans`), both by `--policy` (min-move) on a window of the same skewed routing:
  token  balancing tokens per rank (the policy without a cost model)
  cost   balancing the cost model's pass time per rank (core/cost_model.py: token work plus one
         weight read per activated replica, tokens per pass from the window)
and at the end a least-squares fit of every (pass, rank, layer)'s measured expert time against
its tokens and its activated replicas: the per-token and per-read costs this device shows (the
cost model's calibration: TFLOPS and read GB/s for these expert shapes).

An EP group of `--ranks` ranks is simulated on one device: every rank's share of the MoE
(its slots' weights, SyntheticMoE.gated_model) runs in turn on the same batch, and CUDA
events after every layer give each rank's time per layer. Each layer of an EP pass waits
for its slowest rank, so the pass's MoE time is sum over layers of max over ranks, and a
perfect balance would take sum over layers of the mean. The placement is planned (policy
`--policy`) on a window of the same skewed routing, as the balancer would; then passes
alternate between the two dispatches (the same batches for both), per pass:

  balancedness   mean/max tokens per rank of each pass (what the balancer's
                 vllm:eplb_balancedness{kind="pass"} measures), mean over passes; and over
                 the whole run's summed load (kind="observed": what a window shows)
  straggler      predicted by the cost model: 1 - sum(mean load)/sum(max load) over passes
                 and layers (vllm:eplb_straggler_share); measured: 1 - sum(mean time)/sum(max time)
  expert ms/pass sum over layers of the slowest rank's expert time, from the router's end
                 to the layer's end (median over passes); ideal: of the mean rank's
  router ms/pass the router's own time (eager here: launches included; the kernels under
                 CUDA graphs: benchmarks/router_dispatch.py)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from vllm_eplb.core.cost_model import EXPERT_TFLOPS, READ_GBPS, CostModel  # noqa: E402
from vllm_eplb.core.pass_balance import pass_figures  # noqa: E402
from vllm_eplb.core.placement import Topology, default_placement, physical_to_logical_load  # noqa: E402
from vllm_eplb.core.planner import make_plan  # noqa: E402
from vllm_eplb.core.policies import get_policy  # noqa: E402
from vllm_eplb.harness.synthetic_moe import SyntheticMoE, skewed_routing  # noqa: E402



def _mark(cuda: bool):
    if cuda:
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev
    import time

    return time.perf_counter()


def _seconds(a, b, cuda: bool) -> float:
    return a.elapsed_time(b) / 1e3 if cuda else b - a


def run_pass(models, x, routing, cuda: bool):
    """Every simulated rank's forward on the same batch: (ranks, layers) seconds of expert
    compute (from the router's end to the layer's end), (ranks, layers) seconds of the
    router, and the pass's (layers, physical) load."""
    marks = []
    for m in models:
        m.pass_load.zero_()
        mine = [("end", _mark(cuda))]
        marks.append(mine)
        to_physical = type(m).to_physical

        def timed_route(*a, m=m, mine=mine, to_physical=to_physical, **kw):
            out = to_physical(m, *a, **kw)
            mine.append(("routed", _mark(cuda)))
            return out

        m.to_physical = timed_route
        m.forward(x, routing, lambda out, mine=mine: mine.append(("end", _mark(cuda))))
        del m.to_physical
    if cuda:
        torch.cuda.synchronize()
    expert, router = [], []
    for mine in marks:
        ends = [t for kind, t in mine if kind == "end"]
        routed = [t for kind, t in mine if kind == "routed"]
        router.append([_seconds(a, b, cuda) for a, b in zip(ends, routed)])
        expert.append([_seconds(a, b, cuda) for a, b in zip(routed, ends[1:])])
    # every rank routes the whole batch (TP+EP layout): rank 0's record is the pass's load
    return np.array(expert), np.array(router), models[0].pass_load.cpu().numpy()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--ranks", type=int, default=8)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--redundant", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=7168)
    ap.add_argument("--inter", type=int, default=2048)
    ap.add_argument("--tokens", default="16,64,256,1024")
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--zipf", type=float, default=1.2)
    ap.add_argument("--policy", default="min-move")
    ap.add_argument("--plans", default="token,cost", help="token (tokens per rank) and/or cost (the cost model)")
    ap.add_argument("--dispatch", default="hash", help="hash and/or balanced")
    ap.add_argument("--tflops", type=float, default=EXPERT_TFLOPS, help="cost model: expert GEMM rate")
    ap.add_argument("--read-gbps", type=float, default=READ_GBPS, help="cost model: weight read rate")
    ap.add_argument("--passes", type=int, default=40, help="timed passes per dispatch and batch size")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--tiny", action="store_true", help="hidden 64, inter 32, 2 layers, 16 experts + 4, 4 ranks")
    args = ap.parse_args()
    if args.tiny:
        args.hidden, args.inter, args.layers, args.experts, args.redundant, args.ranks = 64, 32, 2, 16, 4, 4
        args.tokens = args.tokens if args.tokens != ap.get_default("tokens") else "4,32"
        args.passes = min(args.passes, 6)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        ap.error("--device cuda: no GPU here; use --device cpu --tiny")
    if not cuda:
        torch.set_num_threads(1)
    dev = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    topo = Topology(args.ranks, args.experts, args.experts + args.redundant)
    models = [SyntheticMoE.gated_model(topo, args.layers, args.hidden, args.inter, r, dev, dtype) for r in range(args.ranks)]
    for m in models:
        m.record_flag.fill_(True)
    plans = [x for x in args.plans.split(",") if x]
    dispatches = [x for x in args.dispatch.split(",") if x]
    elem = torch.tensor([], dtype=dtype).element_size()
    params = 3 * args.hidden * args.inter
    cost = CostModel.for_expert(params * elem, params, expert_tflops=args.tflops, read_gbps=args.read_gbps)
    print(f"# {args.ranks} EP ranks simulated on one {torch.cuda.get_device_name() if cuda else 'CPU'}: {args.layers} layers x "
          f"{args.experts} experts + {args.redundant} redundant, hidden {args.hidden}, inter {args.inter}, top-{args.top_k}, "
          f"zipf {args.zipf}, policy {args.policy}; {args.passes} passes per plan, dispatch and batch, interleaved; "
          f"cost model {cost.token_seconds * 1e6:.3f} us per token-choice, {cost.read_seconds * 1e6:.1f} us per read")
    hdr = ("tokens", "plan", "dispatch", "pass balancedness", "window balancedness", "straggler predicted",
           "straggler measured", "predicted ms/pass (cost model)", "expert ms/pass (max ranks)",
           "ideal ms/pass (mean ranks)", "router ms/pass")
    print("| " + " | ".join(hdr) + " |")
    print("|" + "---|" * len(hdr))
    fit_x, fit_y = [], []  # per (pass, rank, layer): [1, tokens, activated replicas] -> seconds
    variants = [(plan, d) for plan in plans for d in dispatches]
    for T in [int(t) for t in args.tokens.split(",") if t]:
        bank = skewed_routing(args.layers, args.experts, T, args.top_k, args.zipf, 16, 0, dev)
        # plan on the window's load, as the balancer does, and route every rank with it
        window = np.zeros((args.layers, topo.num_physical))
        for b in range(bank.shape[0]):
            for layer in range(args.layers):
                ids = bank[b, layer].reshape(-1).cpu().numpy()
                np.add.at(window[layer], ids, 1)  # default placement: slot e holds expert e
        start = default_placement(topo, args.layers)
        logical = physical_to_logical_load(window, start, args.experts)
        placements = {
            "token": make_plan(get_policy(args.policy), logical, start, topo).placement,
            # the window is the bank's batches, one pass each
            "cost": make_plan(get_policy(args.policy, cost=cost), logical, start, topo, bank.shape[0], cost).placement,
        }
        x = (torch.randn((T, args.hidden), generator=torch.Generator().manual_seed(1)) * 0.1).to(dev, dtype)
        stats = {v: {"loads": [], "router": [], "moe": [], "ideal": [], "tmax": 0.0, "tmean": 0.0} for v in variants}
        for p in range(args.warmup + args.passes):
            routing = bank[p % bank.shape[0]]
            for plan, d in (variants if p % 2 == 0 else variants[::-1]):
                for m in models:
                    if not np.array_equal(m.maps.placement, placements[plan]):
                        m.maps.write_all(placements[plan], topo)
                    m.dispatch = d
                secs, router, load = run_pass(models, x, routing, cuda)
                if p < args.warmup:
                    continue
                s = stats[(plan, d)]
                by_rank = load.reshape(args.layers, topo.num_ranks, -1)
                per_rank = by_rank.sum(-1)
                s["loads"].append(per_rank)
                s["moe"].append(secs.max(axis=0).sum())
                s["router"].append(router.max(axis=0).sum())
                s["ideal"].append(secs.mean(axis=0).sum())
                s["tmax"] += secs.max(axis=0).sum()
                s["tmean"] += secs.mean(axis=0).sum()
                active = (by_rank > 0).sum(-1)  # (layers, ranks)
                for layer in range(args.layers):
                    for r in range(topo.num_ranks):
                        fit_x.append((1.0, per_rank[layer, r], active[layer, r]))
                        fit_y.append(secs[r, layer])
        for plan, d in variants:
            s = stats[(plan, d)]
            f = pass_figures(np.stack(s["loads"]))
            predicted = cost.straggler_seconds(placements[plan], logical, bank.shape[0], topo.num_ranks)
            print("| " + " | ".join([
                str(T), plan, d, f"{f.pass_balancedness:.3f}", f"{f.window_balancedness:.3f}", f"{f.straggler_share:.1%}",
                f"{1 - s['tmean'] / s['tmax']:.1%}", f"{predicted * 1e3:.4g}", f"{statistics.median(s['moe']) * 1e3:.3f}",
                f"{statistics.median(s['ideal']) * 1e3:.3f}", f"{statistics.median(s['router']) * 1e3:.3f}",
            ]) + " |", flush=True)
    if fit_x:
        coef, *_ = np.linalg.lstsq(np.array(fit_x), np.array(fit_y), rcond=None)
        base, per_token, per_read = coef
        print(f"\nfit of {len(fit_y)} (pass, rank, layer) expert times: {base * 1e6:.1f} us + {per_token * 1e6:.4f} us per "
              f"token-choice + {per_read * 1e6:.2f} us per activated replica"
              + (f" (= {2 * params / per_token / 1e12:.0f} TFLOPS, {params * elem / per_read / 1e9:.0f} GB/s for these "
                 "experts)" if per_token > 0 and per_read > 0 else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
