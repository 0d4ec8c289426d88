"""Placement policies: balance, what they move, how long they plan (in the planner process), what
the cost model predicts a pass takes, and what planning costs the serving thread (GIL). One run,
every policy, vLLM's default included.

    python benchmarks/policies.py            # full table (a few minutes on the 2-core box)
    python benchmarks/policies.py --quick    # fewer windows, one repetition
    python benchmarks/policies.py --tradeoff 0.01,0.02,0.05   # min-move's balance against slots moved

Scenarios: real model shapes (DeepSeek-V3: 58 MoE layers x 256 experts + 32 redundant on 32
ranks in 4 nodes, 8 expert groups; Qwen3-30B-A3B: 48 x 128 + 16 redundant on 8 ranks) under
synthetic loads: Zipf popularity of several strengths, and hot sets that drift between windows
(a share of the experts trade popularity each window, plus 10% multiplicative noise per expert
and window). A window is `--window` passes of 128 tokens per rank (top-8): what the cost model
needs for tokens per pass. Each policy plans every window from its own previous placement,
starting from vLLM's initial layout, as it would while serving with step_interval = window.

Reported per policy and scenario:
- balancedness (mean/max tokens per rank) of each plan on the load it was made from, and on the
  next window's load (what serving would see);
- expert slots moved per rebalance (windows after the first) and the bytes that is for the
  model's experts (DeepSeek-V3: fp8, 44 MB each; Qwen3-30B-A3B: bf16, 9.4 MB);
- the predicted MoE time per pass (core/cost_model.py: the slowest rank's token work plus one
  weight read per activated replica, summed over layers), on the planning and the next window;
- plan time, median and max over every plan of `--reps` interleaved repetitions, measured in
  the planner process (`Planner`, as the balancer runs it: the policy and the plan's validation),
  wall time and the process's CPU time (on a shared box the wall time carries other jobs);
  vLLM's own policy runs in this process (its plans equal `deepseek`'s: tests/test_policies.py).
The load average when the run starts and ends is printed: compare times within one run.
Targets (issue 32), checked per row for the default policy (min-move): balancedness within 0.01
of the best any policy reaches (rows whose deployment keeps expert groups within nodes are
compared with the best global packer too, labelled); at most 10% of vllm-default's slots moved;
DeepSeek-V3 plans in at most 10 ms median.

`--tradeoff T1,T2,...` prints instead what the default's `min_move_tolerance` buys: per shape and
load, min-move at each tolerance (balance on the planning window, slots moved per rebalance, as a
share of vllm-default's, and the floor: the fewest slots any plan must move to reach that
tolerance's target with min-move's replica counts, `moved_floor`) beside the balance line (the best
of the other policies, less 0.01) and the 10% line, in one run; what an operator trades by raising
the tolerance in eplb.json.

Then the GIL: a Python-heavy loop on the main thread (dict and int work, like vLLM's
scheduler) is timed alone, while plans for the DeepSeek-V3 shape run back to back in a
planner thread, and while they run in a planner process. Target: <= 5% slower.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core, as the target says
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from vllm_eplb.core.cost_model import CostModel  # noqa: E402
from vllm_eplb.core.placement import Topology, default_placement, predicted_balancedness  # noqa: E402
from vllm_eplb.core.planner import Planner, make_plan  # noqa: E402
from vllm_eplb.core.policies import PlanInput, Policy, get_policy  # noqa: E402
from vllm_eplb.core.policies.min_move import start  # noqa: E402

TOP_K = 8
TOKENS_PER_RANK = 128  # decode tokens per rank and pass
BALANCE_GAP = 0.01
MOVED_SHARE = 0.10
PLAN_MS = 10.0


@dataclass(frozen=True)
class Shape:
    name: str
    layers: int
    experts: int
    redundant: int
    ranks: int
    nodes: int
    groups: int
    expert_bytes: int
    expert_params: int
    top_k: int = TOP_K

    @property
    def topo(self) -> Topology:
        return Topology(self.ranks, self.experts, self.experts + self.redundant, self.ranks // self.nodes, self.groups)


SHAPES = [
    Shape("DeepSeek-V3", 58, 256, 32, 32, 4, 8, 44_040_192, 44_040_192),  # 3 x 7168 x 2048 fp8
    Shape("Qwen3-30B-A3B", 48, 128, 16, 8, 1, 1, 9_437_184, 4_718_592),  # 3 x 2048 x 768 bf16
]
# small plans (a few ranks of few slots: min-move's step 4 tries fresh packs on every layer whose
# slowest rank is above the mean by more than the tolerance there); bf16 experts
SMALL_SHAPES = [
    Shape("Mixtral-8x7B EP=4", 32, 8, 4, 4, 1, 1, 352_321_536, 176_160_768, 2),  # 3 x 4096 x 14336
    Shape("Mixtral-8x7B EP=8", 32, 8, 8, 8, 1, 1, 352_321_536, 176_160_768, 2),
    Shape("OLMoE-1B-7B EP=4", 16, 64, 4, 4, 1, 1, 12_582_912, 6_291_456, 8),  # 3 x 2048 x 1024
    Shape("DeepSeek-V2-Lite EP=8", 26, 64, 8, 8, 1, 1, 17_301_504, 8_650_752, 6),  # 3 x 2048 x 1408
]
GROUPED = ("vllm-default", "deepseek")  # keep expert groups within nodes where the shape has them


class VllmDefault(Policy):
    """vLLM's own DefaultEplbPolicy (imported from vLLM when installed)."""

    name = "vllm-default"

    def __init__(self):
        import torch
        from vllm.distributed.eplb.policy.default import DefaultEplbPolicy

        self.torch, self.impl = torch, DefaultEplbPolicy

    def place(self, inp: PlanInput) -> np.ndarray:
        t = inp.topo
        return self.impl.rebalance_experts(
            self.torch.from_numpy(inp.logical_load.astype(np.float32)),
            t.num_physical,
            t.num_groups,
            t.num_nodes,
            t.num_ranks,
            self.torch.from_numpy(inp.current),
        ).numpy()


def cost_model(shape: Shape, window: int) -> CostModel:
    # the benchmark plans every window: a plan stays in force one window
    return CostModel.for_expert(shape.expert_bytes, shape.expert_params, horizon_passes=window)


def policies(shape: Shape, window: int) -> list[Policy]:
    out: list[Policy] = []
    try:
        out.append(VllmDefault())
    except Exception as exc:  # vLLM not installed: the table says so
        print(f"(vLLM not importable, its default policy is left out: {exc})")
    cost = cost_model(shape, window)
    return out + [get_policy("deepseek"), get_policy("greedy"), get_policy("min-move", cost=cost)]


def windows(shape: Shape, zipf: float, drift: float, count: int, seed: int, passes: int) -> list[np.ndarray]:
    """`count` windows of per-expert load (layers, experts), each `passes` passes of
    TOKENS_PER_RANK tokens per rank, top-k."""
    rng = np.random.default_rng(seed)
    pop = 1.0 / np.arange(1, shape.experts + 1) ** zipf
    perms = [rng.permutation(shape.experts) for _ in range(shape.layers)]
    total = passes * TOKENS_PER_RANK * shape.ranks * shape.top_k
    out = []
    for _ in range(count):
        load = np.stack([pop[p] for p in perms]) * rng.lognormal(0.0, 0.1, size=(shape.layers, shape.experts))
        out.append(load / load.sum(axis=1, keepdims=True) * total)
        for p in perms:  # drift: some experts trade places in the popularity ranking
            k = int(drift * shape.experts) // 2 * 2
            if k:
                idx = rng.choice(shape.experts, size=k, replace=False)
                p[idx] = p[np.roll(idx, 1)]
    return out


def row_windows(shape: Shape, zipf: float, drift: float, count: int, window: int) -> list[np.ndarray]:
    """The windows of one row of the tables: the same for every table and policy."""
    return windows(shape, zipf, drift, count, seed=int(zipf * 10 + drift * 100), passes=window)


def print_header(hdr) -> None:
    print("\n| " + " | ".join(hdr) + " |")
    print("|" + "---|" * len(hdr))


class Runner:
    """Plans a sequence of windows with one policy: in a planner process (one per policy and
    shape, started once, as the balancer's), or here for vLLM's policy."""

    def __init__(self, policy: Policy, shape: Shape, window: int):
        self.policy, self.shape, self.window = policy, shape, window
        self.cost = cost_model(shape, window)
        self.planner = None if policy.name == "vllm-default" else Planner(policy, shape.topo, "process", cost=self.cost)
        if self.planner is not None:
            self.planner.ready.result()

    def plan(self, load: np.ndarray, current: np.ndarray):
        if self.planner is None:
            return make_plan(self.policy, load, current, self.shape.topo, self.window, self.cost)
        self.planner.submit(load, current, self.window)
        while not self.planner.done():
            time.sleep(0.0002)
        return self.planner.result()

    def run(self, loads: list[np.ndarray]) -> dict:
        topo, shape = self.shape.topo, self.shape
        current = default_placement(topo, shape.layers)
        self.plan(loads[0], current)  # warm-up: the planner process lives on while serving
        bal, bal_next, moved, times, cpus, secs, secs_next = [], [], [], [], [], [], []
        placements = []
        for i, load in enumerate(loads):
            plan = self.plan(load, current)
            new = plan.placement
            placements.append(new)
            times.append(plan.plan_seconds)
            cpus.append(plan.plan_cpu_seconds)
            bal.append(plan.predicted_balancedness)
            secs.append(plan.predicted_seconds)
            if i + 1 < len(loads):
                bal_next.append(predicted_balancedness(new, loads[i + 1], topo))
                secs_next.append(self.cost.straggler_seconds(new, loads[i + 1], self.window, topo.num_ranks))
            if i > 0:
                moved.append(int((new != current).sum()))
            current = new
        return dict(
            bal=statistics.mean(bal), bal_next=statistics.mean(bal_next), moved=statistics.mean(moved),
            gb=statistics.mean(moved) * shape.expert_bytes / 1e9, times=times, cpus=cpus,
            ms=statistics.mean(secs) * 1e3, ms_next=statistics.mean(secs_next) * 1e3, placements=placements,
        )

    def close(self) -> None:
        if self.planner is not None:
            self.planner.shutdown()


ROWS = ((0.6, 0.1), (1.0, 0.1), (1.4, 0.1), (1.0, 0.3))


def quality_table(quick: bool, reps: int, window: int) -> bool:
    n = 4 if quick else 8
    ok = True
    print(f"\nwindow: {window} passes of {TOKENS_PER_RANK} tokens per rank, top-{TOP_K}; plan times over {reps} "
          f"interleaved repetitions, in the planner process (vllm-default: in this process)")
    print(f"targets for min-move: balance >= best - {BALANCE_GAP}, slots moved <= {MOVED_SHARE:.0%} of vllm-default's, "
          f"DeepSeek-V3 plan median <= {PLAN_MS:g} ms")
    hdr = ("shape", "load", "policy", "balance", "next window", "slots moved", "GB moved", "vs default",
           "pass ms (plan / next)", "plan ms median", "max", "CPU ms median", "targets")
    print_header(hdr)
    for shape in SHAPES:
        runners = [Runner(p, shape, window) for p in policies(shape, window)]
        for zipf, drift in ROWS:
            loads = row_windows(shape, zipf, drift, n, window)
            results: dict[str, dict] = {}
            for rep in range(reps):
                for r in (runners if rep % 2 == 0 else runners[::-1]):
                    res = r.run(loads)
                    if r.policy.name in results:
                        results[r.policy.name]["times"] += res["times"]
                        results[r.policy.name]["cpus"] += res["cpus"]
                    else:
                        results[r.policy.name] = res
            base = results.get("vllm-default") or results["deepseek"]
            best = max(results.values(), key=lambda r: r["bal"])
            best_name = next(k for k, v in results.items() if v is best)
            grouped = shape.groups > 1 and shape.nodes > 1
            label = f"zipf {zipf}, drift {int(drift * 100)}%"
            for name, r in results.items():
                fewer = r["moved"] / base["moved"] - 1 if base["moved"] else 0.0
                med, top = statistics.median(r["times"]) * 1e3, max(r["times"]) * 1e3
                cpu = statistics.median(r["cpus"]) * 1e3
                verdict = ""
                if name == "min-move":
                    checks = [
                        (f"balance >= {best_name} - {BALANCE_GAP}", r["bal"] >= best["bal"] - BALANCE_GAP),
                        (f"moved <= {MOVED_SHARE:.0%}", r["moved"] <= MOVED_SHARE * base["moved"]),
                    ]
                    if shape.name == "DeepSeek-V3":
                        checks.append((f"plan <= {PLAN_MS:g} ms", med <= PLAN_MS))
                    verdict = "; ".join(f"{what}: {'met' if met else 'MISSED'}" for what, met in checks)
                    ok &= all(met for _, met in checks)
                who = name + (" (groups within nodes)" if grouped and name in GROUPED else "")
                print("| " + " | ".join([
                    shape.name, label, who, f"{r['bal']:.4f}", f"{r['bal_next']:.4f}", f"{r['moved']:.0f}",
                    f"{r['gb']:.2f}", f"{fewer:+.0%}", f"{r['ms']:.2f} / {r['ms_next']:.2f}", f"{med:.1f}", f"{top:.1f}",
                    f"{cpu:.1f}", verdict,
                ]) + " |", flush=True)
        for r in runners:
            r.close()
    return ok


def small_table(quick: bool, window: int) -> bool:
    """min-move against the other policies on small plans (SMALL_SHAPES), every window planned
    from the previous plan: the balance line of the quality table, and slots moved."""
    n = 4 if quick else 8
    ok = True
    print(f"\nsmall plans (a few ranks of few slots), {n} windows a row; target for min-move: balance >= best - "
          f"{BALANCE_GAP}")
    hdr = ("shape", "slots per rank", "load", "best other (policy)", "min-move balance", "slots moved (vs vllm-default)",
           "min-move plan ms median", "target")
    print_header(hdr)
    for shape in SMALL_SHAPES:
        runners = [Runner(p, shape, window) for p in policies(shape, window)]
        for zipf, drift in ROWS:
            loads = row_windows(shape, zipf, drift, n, window)
            res = {r.policy.name: r.run(loads) for r in runners}
            ours = res.pop("min-move")
            base = res.get("vllm-default") or res["deepseek"]
            best_name = max(res, key=lambda k: res[k]["bal"])
            met = ours["bal"] >= res[best_name]["bal"] - BALANCE_GAP
            ok &= met
            share = ours["moved"] / base["moved"] if base["moved"] else 0.0
            print("| " + " | ".join([
                shape.name, str((shape.experts + shape.redundant) // shape.ranks), f"zipf {zipf}, drift {int(drift * 100)}%",
                f"{res[best_name]['bal']:.4f} ({best_name})", f"{ours['bal']:.4f}", f"{ours['moved']:.1f} ({share:.0%})",
                f"{statistics.median(ours['times']) * 1e3:.1f}",
                f"balance >= {best_name} - {BALANCE_GAP}: {'met' if met else 'MISSED'}",
            ]) + " |", flush=True)
        for r in runners:
            r.close()
    return ok


def moved_floor(load: np.ndarray, current: np.ndarray, shape: Shape, tolerance: float, cost: CostModel,
                passes: int) -> int:
    """The fewest slots any plan from `current` must move to bring every rank within min-move's
    target, given the replica counts min-move's step 1 gives (its moves counted as made): each
    rank above the target changes its costliest slots until what they shed, each replaced by the
    cheapest replica of the layer, covers its excess; the load the heavy ranks shed must land on
    ranks below the target, each of which changes a slot to take any (those step 1 changed
    already take it for free), the roomiest first. A lower bound: perfect fits everywhere."""
    st = start(load, current, shape.ranks, tolerance, cost, passes)
    per = st.placement.shape[1] // shape.ranks
    free = (st.placement != current).reshape(-1, shape.ranks, per)
    w = st.w.reshape(-1, shape.ranks, per)
    rank_load = w.sum(axis=2)
    total = int(free.sum())
    for layer in range(w.shape[0]):
        t, w_min = st.target[layer], st.w[layer].min()
        heavy = rank_load[layer] > t
        for r in np.nonzero(heavy)[0]:
            cut = (w[layer, r][free[layer, r]] - w_min).sum()
            for ws in np.sort(w[layer, r][~free[layer, r]])[::-1]:
                if cut >= rank_load[layer, r] - t:
                    break
                cut += ws - w_min
                total += 1
        room = t - rank_load[layer]
        taken_free = free[layer].any(axis=1) & ~heavy
        need = (rank_load[layer, heavy] - t).sum() - room[taken_free].sum()
        if need > 0:
            rest = np.sort(room[~heavy & ~taken_free])[::-1]
            total += min(int(np.searchsorted(np.cumsum(rest), need)) + 1, len(rest))
    return total


def tradeoff_table(tolerances: list[float], quick: bool, window: int) -> None:
    """min-move at each tolerance against the two lines of the targets (plans as in the quality
    table: every window planned from the previous plan, in the planner process)."""
    n = 4 if quick else 8
    print(f"\nmin-move's tolerance: balance on the planning window / slots moved per rebalance (share of "
          f"vllm-default's; floor: the fewest any plan keeping min-move's replica counts moves, moved_floor); "
          f"then on the next window (the traffic the plan serves): balance and the cost model's predicted "
          f"MoE ms per pass; lines: balance >= best other - {BALANCE_GAP}, moved <= {MOVED_SHARE:.0%}")
    hdr = ["shape", "load", "best other (policy)", "vllm-default moved"] + [f"tolerance {t:g}" for t in tolerances]
    print_header(hdr)
    for shape in SHAPES:
        cost = cost_model(shape, window)
        others = [Runner(p, shape, window) for p in policies(shape, window) if p.name != "min-move"]
        ours = [Runner(get_policy("min-move", tolerance=t, cost=cost), shape, window) for t in tolerances]
        for zipf, drift in ROWS:
            loads = row_windows(shape, zipf, drift, n, window)
            res = {r.policy.name: r.run(loads) for r in others}
            base = res.get("vllm-default") or res["deepseek"]
            best_name = max(res, key=lambda k: res[k]["bal"])
            line = res[best_name]["bal"] - BALANCE_GAP
            cells = []
            for r in ours:
                o = r.run(loads)
                share = o["moved"] / base["moved"] if base["moved"] else 0.0
                floor = statistics.mean(moved_floor(load, prev, shape, r.policy.tolerance, r.cost, window)
                                        for load, prev in zip(loads[1:], o["placements"]))
                marks = ("" if o["bal"] >= line else " (balance under)")
                marks += "" if share <= MOVED_SHARE else " (moves over)"
                cells.append(f"{o['bal']:.4f} / {o['moved']:.0f} ({share:.1%}; floor {floor:.0f}){marks}; "
                             f"next {o['bal_next']:.4f}, {o['ms_next']:.2f} ms")
            head = [shape.name, f"zipf {zipf}, drift {int(drift * 100)}%",
                    f"{res[best_name]['bal']:.4f} ({best_name}; next {res[best_name]['bal_next']:.4f}, "
                    f"{res[best_name]['ms_next']:.2f} ms)", f"{base['moved']:.0f}"]
            print("| " + " | ".join(head + cells) + " |", flush=True)
        for r in others + ours:
            r.close()


BACKTEST_ROWS = ((1.0, 0.0), (1.0, 0.02), (1.0, 0.1), (1.0, 0.3))  # zipf, drift: from a load that holds still


def backtest_table(tolerances: list[float], quick: bool, window: int) -> None:
    """A design study, not what the balancer runs (docs/benchmarks.md section 4): min-move at a
    fixed 0.01 against min-move whose tolerance for window t is the one that would have won on
    window t-1: each candidate replans window t-1 from the placement then in force, scored on
    window t by the cost model (pass time per pass plus move_penalty per slot moved). Both plan
    every window from their own previous plan, in this process; reported: the plans' predicted
    MoE ms per pass on the window after the one they were planned from, slots moved, picks."""
    from vllm_eplb.core.policies.min_move import min_move_placement

    n = 6 if quick else 10
    print(f"\ndesign study: tolerance chosen by backtest among {tolerances} against 0.01 (not what the "
          f"balancer runs); {n - 2} plans a row, each scored on the next window")
    print_header(["shape", "load", "0.01: next-window MoE ms / slots moved", "backtest: next-window MoE ms / slots moved",
                  "ms vs 0.01", "moved vs 0.01", "tolerances picked"])
    for shape in SHAPES:
        cost, ranks = cost_model(shape, window), shape.ranks

        def plan(load, current, tol):
            return min_move_placement(load, current, ranks, tol, cost, window)

        for zipf, drift in BACKTEST_ROWS:
            loads = row_windows(shape, zipf, drift, n, window)
            first = plan(loads[0], default_placement(shape.topo, shape.layers), 0.01)
            res = {}
            for mode in ("fixed", "backtest"):
                current, before, ms, moved, picks = first, first, [], [], []
                for t in range(1, n - 1):
                    tol = 0.01
                    if mode == "backtest" and t >= 2:
                        def lost(x):
                            p = plan(loads[t - 1], before, x)
                            return cost.straggler_seconds(p, loads[t], window, ranks) + (p != before).sum() * cost.move_penalty()
                        tol = min(tolerances, key=lost)
                    new = plan(loads[t], current, tol)
                    picks.append(tol)
                    moved.append(int((new != current).sum()))
                    ms.append(cost.straggler_seconds(new, loads[t + 1], window, ranks) * 1e3)
                    before, current = current, new
                res[mode] = (statistics.mean(ms), statistics.mean(moved), picks)
            (f_ms, f_mv, _), (b_ms, b_mv, picks) = res["fixed"], res["backtest"]
            print("| " + " | ".join([shape.name, f"zipf {zipf}, drift {int(drift * 100)}%", f"{f_ms:.2f} / {f_mv:.0f}",
                                     f"{b_ms:.2f} / {b_mv:.0f}", f"{b_ms / f_ms - 1:+.1%}", f"{b_mv / f_mv - 1:+.0%}",
                                     " ".join(f"{x:g}" for x in picks)]) + " |", flush=True)


SMOOTHING = (1.0, 0.5, 0.3)  # the newest window's weights the adaptive column chooses from
# name, the newest window's weight in the load planned on (None: adaptive), dead band
FILTERS = (("plain", 1.0, 0.0), ("smoothed 0.5", 0.5, 0.0), ("smoothed 0.3", 0.3, 0.0), ("adaptive", None, 0.0),
           ("band 0.02", 1.0, 0.02), ("band 0.05", 1.0, 0.05))


def filters_table(quick: bool, window: int) -> None:
    """A design study, not what the balancer runs (docs/benchmarks.md section 4): ways of not
    chasing a window's sampling noise, each planning every window from its own previous plan with
    min-move at 0.01 (plain: none of them). Smoothed a: plan on a*window + (1-a)*the load planned on last time (an
    exponential average over windows). Adaptive: each window, the weight of SMOOTHING whose
    average (over the windows before) forecast this window best (least squared error per expert)
    plans it; plain for the first. Band d: a layer keeps the placement in force unless the
    plan lowers its slowest rank (cost model) on the window by more than d of its mean rank.
    Reported: slots moved, balance on the window, predicted MoE ms per pass on the next window."""
    from vllm_eplb.core.policies.min_move import min_move_placement

    n = 6 if quick else 12
    print(f"\ndesign study: planning on smoothed load, and a per-layer dead band (not what the balancer runs); "
          f"{n - 2} plans a row; cells: slots moved / balance on the window / next-window MoE ms per pass")
    print_header(["shape", "load"] + [name for name, _, _ in FILTERS])
    for shape in SHAPES:
        cost, ranks = cost_model(shape, window), shape.ranks
        for zipf, drift in BACKTEST_ROWS:
            loads = row_windows(shape, zipf, drift, n, window)
            first = min_move_placement(loads[0], default_placement(shape.topo, shape.layers), ranks, 0.01, cost, window)
            cells = []
            for _, alpha, band in FILTERS:
                current, estimate, moved, bal, ms = first, loads[0], [], [], []
                averages = {a: loads[0] for a in SMOOTHING}
                for t in range(1, n - 1):
                    if alpha is None:  # the weight whose average forecast this window best
                        best = min(SMOOTHING, key=lambda a: ((averages[a] - loads[t]) ** 2).sum()) if t >= 2 else 1.0
                        averages = {a: a * loads[t] + (1 - a) * averages[a] for a in SMOOTHING}
                        estimate = averages[best]
                    else:
                        estimate = alpha * loads[t] + (1 - alpha) * estimate
                    new = min_move_placement(estimate, current, ranks, 0.01, cost, window)
                    if band:
                        before = cost.rank_seconds(current, loads[t], window, ranks).max(axis=1)
                        after = cost.rank_seconds(new, loads[t], window, ranks)
                        keep = before - after.max(axis=1) <= band * after.mean(axis=1)
                        new[keep] = current[keep]
                    moved.append(int((new != current).sum()))
                    bal.append(predicted_balancedness(new, loads[t], shape.topo))
                    ms.append(cost.straggler_seconds(new, loads[t + 1], window, ranks) * 1e3)
                    current = new
                cells.append(f"{statistics.mean(moved):.0f} / {statistics.mean(bal):.3f} / {statistics.mean(ms):.2f}")
            print("| " + " | ".join([shape.name, f"zipf {zipf}, drift {int(drift * 100)}%"] + cells) + " |", flush=True)


def python_heavy(seconds: float, planner: Planner | None = None, job=None) -> tuple[float, int]:
    """Iterations per second of dict/int work on this thread. Every 10 ms (a forward pass)
    it does what the balancer's tick does while planning: poll the planner, and here
    submit the next plan as soon as one is done, so plans run back to back."""
    d: dict[int, int] = {}
    n, plans = 0, 0
    start = time.perf_counter()
    end, next_tick = start + seconds, start
    if planner is not None:
        planner.submit(*job())
    while True:
        now = time.perf_counter()
        if now >= end:
            break
        if planner is not None and now >= next_tick:
            next_tick = now + 0.010
            if planner.done():
                planner.result()
                plans += 1
                planner.submit(*job())
        for i in range(1000):
            d[i & 255] = d.get(i & 255, 0) + i
        n += 1000
    return n / seconds, plans


def gil_table(seconds: float, window: int) -> bool:
    shape = SHAPES[0]
    topo = shape.topo
    loads = windows(shape, 1.0, 0.1, 4, seed=1, passes=window)
    current = default_placement(topo, shape.layers)
    counter = iter(range(10**9))

    def job():
        return loads[next(counter) % len(loads)], current, window

    print(f"\nGIL: a Python loop on the serving thread, polling the planner every 10 ms, while DeepSeek-V3 plans run back to back ({seconds:.0f} s each)")
    print(f"{'planner':<20} {'policy':<10} {'plans':>6} {'loop it/s':>12} {'vs alone':>9}")
    alone = statistics.median(python_heavy(seconds / 3)[0] for _ in range(3))
    print(f"{'none (loop alone)':<20} {'':<10} {0:>6} {alone:>12.0f} {1:>9.3f}")
    ok = True
    for mode in ("thread", "process"):
        for name in ("min-move", "deepseek"):
            planner = Planner(get_policy(name, cost=cost_model(shape, window)), topo, mode)
            # the planner starts with the server, not with the first plan: its warm-up (a process's
            # start; min-move's numba loops loaded, which a GIL-bound loop beside it in this
            # process slows past the whole measurement) is not what this table measures
            planner.ready.result()
            rate, plans = python_heavy(seconds, planner, job)
            planner.shutdown()
            ratio = rate / alone
            print(f"{mode:<20} {name:<10} {plans:>6} {rate:>12.0f} {ratio:>9.3f}")
            if mode == "process" and name == "min-move":
                ok &= ratio >= 0.95
    print("(process is the default planner)")
    return ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="4 windows per row, one repetition")
    ap.add_argument("--reps", type=int, default=3, help="interleaved repetitions (plan times: median and max over all)")
    ap.add_argument("--window", type=int, default=1000, help="passes per window (= step_interval)")
    ap.add_argument("--gil-seconds", type=float, default=6.0)
    ap.add_argument("--no-gil", action="store_true", help="skip the GIL table")
    ap.add_argument("--small", action="store_true", help="print only the small-plans table")
    ap.add_argument("--tradeoff", default="",
                    help="comma-separated min-move tolerances: print only the trade-off table")
    ap.add_argument("--backtest", default="",
                    help="comma-separated min-move tolerances: print only the backtest design study")
    ap.add_argument("--filters", action="store_true",
                    help="print only the design study of smoothed load and a per-layer dead band")
    args = ap.parse_args()
    print(f"load average at start: {os.getloadavg()[0]:.1f} ({os.cpu_count()} cores)")
    if args.small:
        print(f"targets {'met' if small_table(args.quick, args.window) else 'NOT all met'}")
        return
    if args.backtest:
        backtest_table([float(t) for t in args.backtest.split(",")], args.quick, args.window)
        return
    if args.filters:
        filters_table(args.quick, args.window)
        return
    if args.tradeoff:
        tradeoff_table([float(t) for t in args.tradeoff.split(",")], args.quick, args.window)
        return
    met = quality_table(args.quick, 1 if args.quick else args.reps, args.window)
    met &= small_table(args.quick, args.window)
    if not args.no_gil:
        met &= gil_table(args.gil_seconds, args.window)
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")
    print(f"targets {'met' if met else 'NOT all met'}")


if __name__ == "__main__":
    main()
