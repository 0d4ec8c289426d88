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

serve: `vllm serve` TP=2 + EP on CPU with a tiny Qwen3-MoE (tiny_model.py's, 16 experts + 4
redundant) whose routers send two word mixes to different hot experts (`two_mix_model`): clients
send prompts of mix A, then, at pass `--shift` (read from /metrics), of mix B. The observed
balancedness is the balancer's own, read from /metrics (vllm:eplb_balancedness{kind="observed"},
refreshed at every watch window: the fixed-interval server runs with trigger_margin 1, which
watches without ever triggering, so both servers are measured alike), averaged over the last
two watch windows (half a window's passes: a single watch window of this small model's traffic
swings by +-0.05). What a fresh plan gives: the level each server
reaches once its placement is planned on mix B, the mean observed from half a window after that
placement went live to the end of the run. Time to adapt: from the shift to the first watch
window, half a window or more after it (the averaged figure must hold post-shift traffic only),
whose averaged observed balancedness is back within 0.02 of that level. Both servers apply every plan
(improvement_threshold 0).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import threading
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from vllm_eplb.core.placement import Topology, default_placement  # noqa: E402
from vllm_eplb.core.routing_maps import RoutingMaps  # noqa: E402
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
    if args.improvement_threshold is not None:  # None: the config's default (5%)
        base["improvement_threshold"] = args.improvement_threshold
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


def two_mix_model(out_dir: str, hot: int = 3, pull: float = 4.0, seed: int = 0) -> tuple[str, list, list]:
    """tiny_model.py's Qwen3-MoE (16 experts, no shared skew), then per MoE layer `hot` experts
    pulled towards the inputs of word mix A and `hot` others towards mix B's: the direction
    that separates the two mixes' mean router inputs (with no component along their midpoint,
    so A's tokens score it above 0 and B's below). A's hot experts are the last ids (rank 1 in
    vLLM's initial layout), B's those after the first redundant ones (rank 0): cold while A
    is served, B's stay where they were, together. Returns (model dir, words of A, words of B)."""
    import transformers

    from vllm_eplb.harness.tiny_model import WORDS, build, moe_routers

    mixes = (WORDS[: len(WORDS) // 2], WORDS[len(WORDS) // 2 :])
    build(out_dir, hot=0, skew=0.0, seed=seed)
    tok = transformers.AutoTokenizer.from_pretrained(out_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(out_dir, torch_dtype=torch.float32)
    experts = model.config.num_experts
    seqs = [[torch.tensor([tok(p)["input_ids"]]) for p in prompts(words, 32, random.Random(1))] for words in mixes]
    for layer in model.model.layers:
        for router, gate in moe_routers(layer, experts):
            means = []
            for mix in seqs:
                seen = []
                handle = router.register_forward_hook(lambda mod, a, out: seen.append(a[0].detach().reshape(-1, a[0].shape[-1])))
                with torch.no_grad():
                    for ids in mix:
                        model(ids)
                handle.remove()
                means.append(torch.cat(seen))
            a, b = means[0].mean(0), means[1].mean(0)
            mid = (a + b) / 2
            d = (a - b) - ((a - b) @ mid) / (mid @ mid) * mid
            d = d / d.norm()
            reach = ((means[0] @ d).mean() - (means[1] @ d).mean()).abs().clamp(min=1e-3)
            scale = (torch.cat(means) @ gate.T).std()
            hot_a, hot_b = range(experts - hot, experts), range(experts // 4, experts // 4 + hot)
            with torch.no_grad():
                for rank, (a_e, b_e) in enumerate(zip(hot_a, hot_b)):
                    gate[a_e] += d * (pull * scale / reach) / (rank + 1)
                    gate[b_e] -= d * (pull * scale / reach) / (rank + 1)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir, list(mixes[0]), list(mixes[1])


def prompts(words: list, n: int, rng: random.Random) -> list[str]:
    return [" ".join(rng.choice(words) for _ in range(rng.randint(8, 16))) for _ in range(n)]


class MixedLoad:
    """Clients sending prompts of the current mix until stopped."""

    def __init__(self, server, mix: list, clients: int, max_tokens: int):
        self.server, self.mix, self.max_tokens = server, mix, max_tokens
        self.stop_flag, self.errors = threading.Event(), []
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]

    def _run(self, seed: int) -> None:
        rng = random.Random(seed)
        while not self.stop_flag.is_set():
            try:
                self.server.complete(prompts(self.mix, 1, rng)[0], max_tokens=self.max_tokens)
            except Exception as exc:  # counted in the table
                self.errors.append(exc)

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop_flag.set()
        for t in self.threads:
            t.join(120)


def serve(args) -> None:
    from vllm_eplb.harness.server import Server, metric

    work = tempfile.mkdtemp(prefix="eplb-adapt-")
    model, mix_a, mix_b = two_mix_model(os.path.join(work, "tiny-two-mix"))
    rows = []
    for i, (mode, margin) in enumerate((("fixed interval", 1.0), ("load trigger", args.margin))):
        cfg = os.path.join(work, f"eplb-{i}.json")
        with open(cfg, "w") as fh:
            # every plan applies (improvement_threshold 0): a skipped plan would leave a server
            # unadapted for another interval, whatever started its cycle
            json.dump({"window_size": args.window, "step_interval": args.interval, "num_redundant_experts": 4,
                       "agreement_lag": 2, "policy": "min-move", "improvement_threshold": 0.0,
                       "trigger_margin": margin}, fh)
        series, starts = [], []  # (pass, observed) at each watch window; passes cycles started at
        with Server(model, args.port + i, cfg, log_path=os.path.join(work, f"serve-{i}.log")) as s:
            load = MixedLoad(s, mix_a, args.clients, args.max_tokens)
            shift, triggers = None, 0
            with load:
                last = None
                while True:
                    try:
                        ms = s.metrics()
                    except OSError:
                        time.sleep(0.1)
                        continue
                    p = metric(ms, "vllm:eplb_pass", rank=0) or 0
                    obs = metric(ms, "vllm:eplb_balancedness", rank=0, kind="observed")
                    if obs is not None and obs != last:
                        series.append((p, obs))
                        last = obs
                    began = metric(ms, "vllm:eplb_state_entered_pass", rank=0, state="collecting")
                    if began is not None and began not in starts:
                        starts.append(began)
                    triggers = metric(ms, "vllm:eplb_load_triggers_total", rank=0) or 0
                    if shift is None and p >= args.shift:
                        load.mix, shift = mix_b, p
                    if p >= args.passes:
                        break
                    time.sleep(0.1)
        with open(os.path.join(work, f"series-{i}.json"), "w") as fh:
            json.dump({"shift": shift, "series": series, "starts": starts}, fh)
        ps = np.array([x[0] for x in series], dtype=float)
        obs = np.array([x[1] for x in series])
        smooth = np.array([obs[max(0, k - 1) : k + 1].mean() for k in range(len(obs))])  # half a window's worth
        # the level its placement planned on the new mix gives: from half a window after that
        # placement is live (its cycle's window and transfer) to the end
        replanned = next((b for b in starts if b >= shift), None)
        settled = ps >= (replanned + 1.5 * args.window if replanned is not None else np.inf)
        level = obs[settled].mean() if settled.any() else float("nan")
        after = np.nonzero(ps >= shift)[0]
        back = [k for k in after if smooth[k] >= level - WITHIN and ps[k] >= shift + args.window / 2]
        at = ps[back[0]] if back else None
        before = smooth[after[0] - 1] if len(after) and after[0] > 0 else float("nan")
        low = smooth[after].min() if len(after) else float("nan")
        cycles = ", ".join(str(int(b)) for b in starts if b >= shift)
        rows.append((mode, shift, cycles, int(triggers), before, low, level, at, len(load.errors)))
        print(f"  {mode}: done ({work}/series-{i}.json)", flush=True)
    print(f"\nvllm serve TP=2+EP on CPU, tiny Qwen3-MoE with two word mixes (16 experts + 4 redundant, top-2), "
          f"{args.clients} clients x {args.max_tokens} tokens; window {args.window}, interval {args.interval}, "
          f"policy min-move; the mix changes at pass {args.shift}")
    hdr = ("mode", "shift at pass", "cycles started after it", "load triggers", "observed before shift",
           "lowest after", "fresh plan's level", "back within 0.02 at pass", "time to adapt (passes)", "(windows)", "failed requests")
    print("| " + " | ".join(hdr) + " |")
    print("|" + "---|" * len(hdr))
    for mode, shift, cycles, trig, before, low, level, at, errors in rows:
        took = "never" if at is None else f"{int(at - shift)}"
        print("| " + " | ".join([mode, str(int(shift)), cycles, str(trig), f"{before:.3f}", f"{low:.3f}", f"{level:.3f}",
                                 "" if at is None else str(int(at)), took,
                                 "" if at is None else f"{(at - shift) / args.window:.2f}", str(errors)]) + " |")


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
    r.add_argument("--improvement-threshold", type=float, default=None,
                   help="both modes' improvement_threshold (default: the config's, 5%%; serve uses 0: every plan applies)")
    v = sub.add_parser("serve")
    v.add_argument("--window", type=int, default=300)
    v.add_argument("--interval", type=int, default=1800)
    v.add_argument("--shift", type=int, default=2500)
    v.add_argument("--passes", type=int, default=4900)
    v.add_argument("--margin", type=float, default=0.02, help="trigger_margin of the trigger server")
    v.add_argument("--clients", type=int, default=32)
    v.add_argument("--max-tokens", type=int, default=32)
    v.add_argument("--port", type=int, default=8360)
    args = ap.parse_args()
    if args.where == "rig":
        rig(args)
    else:
        serve(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
