"""CPU cost of the balancer per forward pass (catch_up() + tick()), per state.

Two (or --ranks) processes joined by gloo run the real balancer through several
full cycles on the rig's synthetic MoE (vllm_eplb/harness/synthetic_moe.py) of a given
shape, driven as vLLM's runner drives it, by the rigs' one driver (harness/driver.py):
`catch_up()` before the pass, the runner's pass count advanced as the pass starts, the pass
(untimed, and not computed: its first MoE layer advances the model's ForwardCounter and its
router adds a skewed load), `tick()` after. catch_up() + tick() is timed (the driver's
`spent_ns`: read right around those two calls). Prints median /
p99 / max in microseconds per state, next to a baseline measured in the same run: the
cost of calling an empty Python method, the floor any per-pass hook pays.

Target (issue 2): at most 20 us per pass in idle and collecting (median and p99 of
the passes that stay in the state and post nothing; the one pass per cycle that fires a
transition, the passes that post a round on the agreement group and those that open or close
a watch window are reported on rows of their own). The window here is 50 passes (so that a run sees many cycles): every pass
of a window under 128 passes is sampled for the per-pass balance, and the load trigger's
watch windows (a quarter of it) post a round every 15 or so idle passes; at the default
window_size of 1000, 2 passes in 8 are sampled and a watch round comes every 250 or so.

    python benchmarks/tick_overhead.py                  # both shapes, 2 ranks
    python benchmarks/tick_overhead.py --shape deepseek-v3 --ranks 4
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from vllm_eplb.core import Balancer, BalancerConfig, Comm, MoELayout, Topology, new_gloo_group  # noqa: E402
from vllm_eplb.core.state_machine import LIVE_STATES  # noqa: E402
from vllm_eplb.core.transfer import GlooBackend  # noqa: E402
from vllm_eplb.harness.launcher import launch  # noqa: E402
from vllm_eplb.harness.driver import Driver  # noqa: E402
from vllm_eplb.harness.synthetic_moe import SyntheticMoE  # noqa: E402

SHAPES = {
    # name: (MoE layers, logical experts, redundant slots, expert dim: dim x dim elements moved)
    "toy": (4, 16, 4, 8),
    "qwen3-30b-a3b": (48, 128, 16, 8),
    "deepseek-v3": (58, 256, 32, 8),
}


class _Empty:
    def tick(self):
        pass


def _rank(rank, world, shape, passes):
    """One rank, in a process the rig's launcher started (its default group is up)."""
    torch.set_num_threads(1)
    layers, logical, redundant, dim = SHAPES[shape]
    physical = logical + redundant
    physical += (-physical) % world
    topo = Topology(world, logical, physical)
    cfg = BalancerConfig(window_size=50, step_interval=300, agreement_lag=2, improvement_threshold=0.0)
    model = SyntheticMoE.exact_model(topo, layers, dim, 2, rank)
    pass_load, first_layer = model.pass_load, model.pass_counter
    g = [new_gloo_group(list(range(world)), 60) for _ in range(2)]
    layout = MoELayout(topo, layers, pass_load, model.maps, model.weights_of)
    driver = Driver()
    bal = driver.balancer = Balancer(cfg, layout, Comm(rank, world, g[0], GlooBackend(g[1])), clock=driver.clock(first_layer))
    bal.planner.ready.result()  # the planner process starts with the server: not part of the loop
    dist.barrier()

    rng = np.random.default_rng(rank)
    zipf = 1.0 / np.arange(1, physical + 1) ** 1.2
    loads = [torch.from_numpy(rng.poisson(50 * np.roll(zipf, i % physical), size=(layers, physical))) for i in range(16)]
    empty = _Empty()
    times: dict[str, list[float]] = {"baseline (empty method call)": []}
    for p in range(passes):
        state, n_transitions, n_posts = bal.state, bal.transitions_total, bal.agreement.posts
        recording = bal.window.gate.recording
        with driver.forward_pass():
            first_layer.advance()  # its first MoE layer runs
            dist.all_reduce(torch.zeros(1))  # the ranks' lockstep, as the pass's MoE collectives impose
            pass_load += loads[p % 16]  # its router records load
        t1 = time.perf_counter_ns()
        empty.tick()
        t2 = time.perf_counter_ns()
        # A pass that fires a transition does that state's once-per-cycle work (reset the
        # window, post a round, start a step...), one that posts a round (a watch window's load
        # while idle, a readiness vote while planning) sends on the agreement group, and one
        # that opens or closes the load trigger's watch window while idle clears the load or
        # copies it out: each reported on a row of its own.
        key = state if bal.transitions_total == n_transitions else f"{state}, transition pass"
        if key == state and bal.agreement.posts != n_posts:
            key = f"{state}, round posted"
        elif key == state and bal.window.gate.recording != recording:
            key = f"{state}, window opened or closed"
        times.setdefault(key, []).append(driver.spent_ns / 1e3)
        times["baseline (empty method call)"].append((t2 - t1) / 1e3)
    stats = bal.stats
    result = (times, stats.cycles_completed, dict(stats.cycles_skipped))
    bal.shutdown()
    return result


def run(shape: str, ranks: int, passes: int) -> tuple[dict, int]:
    times, completed, skipped = launch(_rank, ranks, (shape, passes))[0]
    return times, completed, skipped


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=[*SHAPES, "all"], default="all")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--passes", type=int, default=1500)
    args = ap.parse_args()
    shapes = list(SHAPES) if args.shape == "all" else [args.shape]
    states = list(LIVE_STATES)
    order = ["baseline (empty method call)", *states, *(f"{s}, round posted" for s in states),
             *(f"{s}, window opened or closed" for s in states),
             *(f"{s}, transition pass" for s in states)]
    print(f"catch_up() + tick() CPU cost per forward pass, rank 0 of {args.ranks} (gloo), torch {torch.__version__}")
    print(f"{'shape':<14} {'state':<34} {'passes':>6} {'median us':>10} {'p99 us':>9} {'max us':>9} {'median/base':>11} {'target':>10}")
    failed = False
    for shape in shapes:
        times, completed, skipped = run(shape, args.ranks, args.passes)
        base = float(np.median(times["baseline (empty method call)"]))
        for state in order:
            t = np.array(times.get(state, []))
            if not len(t):
                continue
            med, p99 = np.median(t), np.percentile(t, 99)
            target = ""
            if state in ("idle", "collecting"):
                ok = med <= 20 and p99 <= 20
                failed |= not ok
                target = "<=20 " + ("met" if ok else "MISSED")
            print(f"{shape:<14} {state:<34} {len(t):>6} {med:>10.1f} {p99:>9.1f} {t.max():>9.1f} {med / base:>10.0f}x {target:>10}")
        print(f"{shape:<14} cycles completed: {completed}, skipped: {sum(skipped.values())} {skipped or ''}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
