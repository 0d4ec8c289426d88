"""The fault matrix: every fault of `faults.py` on one rank of 2 and of 4, each at the
state or phase it hits, with the outcome it must have. Run by tests/test_fault_matrix.py
(one process start per world size for the whole matrix) and printable as the table in
docs/architecture.md: `python -m vllm_eplb.harness.matrix`.

Outcomes:
  completes          nothing aborts; a cycle completes (tick anomalies: reported on every rank)
  aborts(R)          cycle 1 ends on every rank at the same pass with reason R; a later cycle completes
  disables(R)        rebalancing stops on every rank with reason R; serving goes on
Every scenario also checks, on every pass: maps equal across ranks, every slot holds
the expert its map names, probe outputs unchanged; and that no pass spent longer in
the balancer than agreement_timeout_s plus a margin.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from .faults import Faults
from .runner import HarnessConfig, run_scenarios

FAULTY = 1  # the rank every fault hits
EVERY = tuple(range(8))  # a weight update hits every rank (of up to 8)
BASE = dict(window_size=20, step_interval=60, agreement_lag=2, agreement_timeout_s=3.0, planner="process")
WAIT_MARGIN_S = 2.0  # scheduling noise on a loaded 2-core box, on top of agreement_timeout_s


@dataclass(frozen=True)
class Scenario:
    name: str
    hits: str  # the state or phase the fault hits
    faults: Faults
    outcome: str  # "completes" | "aborts" | "disables"
    reason: str = ""
    balancer: tuple = ()  # extra BalancerConfig fields, as (key, value) pairs
    passes: int = 170


def _raise(point: str, kind: str = "error", nth: int = 1) -> Faults:
    return Faults(raise_at=(FAULTY, point, 1, kind, nth))


SCENARIOS = [
    # the driver's ticks out of step with the forward passes
    *(
        Scenario(f"tick {k:+d} in {phase}", phase, Faults(tick_offset=(FAULTY, phase, k)), "completes")
        for k in (1, -1, 3)
        for phase in ("idle", "collecting", "planning_reducing", "planning_waiting", "syncing", "transferring")
    ),
    # an exception on one rank, in each state and phase
    Scenario("error opening the window", "idle", _raise("window_reset"), "aborts", "internal_error"),
    Scenario("error closing the window", "collecting", _raise("snapshot"), "aborts", "internal_error"),
    Scenario("error copying the load", "planning_reducing", _raise("load_copy"), "aborts", "internal_error"),
    Scenario("error submitting the plan", "planning_waiting", _raise("plan_submit"), "aborts", "planner_error"),
    Scenario("error fetching the plan", "planning_waiting", _raise("plan_result"), "aborts", "planner_error"),
    Scenario(
        "policy raises", "planning_waiting", Faults(planner_error=(FAULTY, 1)), "aborts", "planner_error",
        balancer=(("planner", "thread"),),  # a thread keeps the policy's call count across plans
    ),
    Scenario("error starting the first step", "syncing", _raise("step_start"), "disables", "transfer_group_broken"),
    Scenario("error finishing a step", "transferring", _raise("step_finish"), "aborts", "transfer_error"),
    Scenario("error starting the next step", "transferring", _raise("step_start", nth=2), "disables", "transfer_group_broken"),
    Scenario("transfer fails", "transferring", Faults(transfer_error=(FAULTY, 1, 2)), "aborts", "transfer_error"),
    # out of memory
    Scenario("OOM in transfer start", "syncing", _raise("step_start", "oom"), "disables", "transfer_group_broken"),
    Scenario("OOM in commit (weights)", "transferring", _raise("commit_prepare", "oom"), "aborts", "out_of_memory"),
    Scenario("OOM in commit (maps)", "transferring", _raise("stage_maps", "oom"), "aborts", "out_of_memory"),
    # the planner process
    Scenario(
        "planner killed mid-plan", "planning_waiting",
        Faults(kill_planner=(FAULTY, "planning_waiting"), slow_planner=(FAULTY, 1.0), slow_once=True),
        "aborts", "planner_died", balancer=(("planning_timeout_s", 20.0),), passes=500,
    ),
    Scenario("planner killed while idle", "idle", Faults(kill_planner=(FAULTY, "idle")), "completes", passes=300),
    Scenario(
        "planner dies past its restarts", "planning_waiting",
        Faults(kill_planner=(FAULTY, "planning_waiting"), slow_planner=(FAULTY, 1.0), slow_once=True),
        "disables", "planner_dead", balancer=(("planning_timeout_s", 20.0), ("planner_max_restarts", 0)), passes=200,
    ),
    Scenario(
        "planner slow past its timeout", "planning_waiting", Faults(slow_planner=(FAULTY, 3.0), slow_once=True),
        "aborts", "planning_timeout", balancer=(("planning_timeout_s", 0.5),), passes=500,
    ),
    # agreement and exporter
    Scenario(
        "agreement round late past the timeout", "planning_waiting", Faults(late_round=(FAULTY, 2, 8.0)),
        "disables", "agreement_timeout", passes=100,
    ),
    Scenario("metrics exporter raises", "planning_waiting", Faults(metrics_error=(FAULTY, "planning_waiting")), "aborts", "metrics_error"),
    # new weights written into the slots (an RL trainer's update), on every rank between the same two passes
    Scenario("weight update while idle", "idle", Faults(weight_update=(EVERY, "idle", True, 0)), "completes"),
    Scenario(
        "weight update while planning", "planning_waiting", Faults(weight_update=(EVERY, "planning_waiting", True, 0)),
        "aborts", "weight_update",
    ),
    # a pass into transferring: commit votes posted before the update name steps ready; none may land
    Scenario(
        "weight update while transferring", "transferring", Faults(weight_update=(EVERY, "transferring", True, 1)),
        "aborts", "weight_update",
    ),
    Scenario(
        "weight update on one rank only", "planning_waiting",
        Faults(weight_update=((FAULTY,), "planning_waiting", False, 0)), "disables", "weight_update_skew",
    ),
]


def config_for(s: Scenario, ranks: int) -> HarnessConfig:
    # The 4-rank column runs with staging reserved at start-up, as every GPU backend does
    # (regions reused across commits, held by aborted steps until done); the 2-rank column
    # allocates per step, as gloo on CPU does by default.
    return HarnessConfig(
        ranks=ranks, passes=s.passes, redundant=ranks, zipf=1.5, balancer={**BASE, **dict(s.balancer)}, faults=s.faults,
        cpu_staging=ranks >= 4,
    )


def run_matrix(ranks: int, scenarios=SCENARIOS, timeout_s: float = 1500):
    """{scenario name: [RankReport per rank]}"""
    results = run_scenarios([config_for(s, ranks) for s in scenarios], timeout_s)
    return {s.name: reports for s, reports in zip(scenarios, results)}


def verdict(s: Scenario, reports) -> list[str]:
    """What went wrong in one scenario's run (empty: it behaved as the matrix says)."""
    bad = []
    timeout = dict(s.balancer).get("agreement_timeout_s", BASE["agreement_timeout_s"])
    for r in reports:
        st = r.stats
        if r.map_disagreements:
            bad.append(f"rank {r.rank}: maps differed across ranks at passes {r.map_disagreements[:5]}")
        if r.slot_mismatches:
            bad.append(f"rank {r.rank}: slots held wrong experts: {r.slot_mismatches[:3]}")
        if r.output_mismatches:
            bad.append(f"rank {r.rank}: probe outputs changed at passes {r.output_mismatches[:5]}")
        if r.max_wait_s > timeout + WAIT_MARGIN_S:
            bad.append(f"rank {r.rank}: a pass waited {r.max_wait_s:.1f} s in the balancer (timeout {timeout:g} s)")
        aborted = dict(st["cycles_aborted"])
        if s.outcome == "completes":
            if aborted or st["disabled_reason"] or st["cycles_completed"] < 1:
                bad.append(f"rank {r.rank}: expected completed cycles only, got aborted={aborted} disabled={st['disabled_reason']!r} completed={st['cycles_completed']}")
        elif s.outcome == "aborts":
            if aborted != {s.reason: 1} or st["disabled_reason"] or st["cycles_completed"] < 1:
                bad.append(f"rank {r.rank}: expected one {s.reason} abort then a completed cycle, got aborted={aborted} disabled={st['disabled_reason']!r} completed={st['cycles_completed']}")
        else:
            if not st["disabled_reason"].startswith(s.reason):
                bad.append(f"rank {r.rank}: expected disabled ({s.reason}), got {st['disabled_reason']!r} aborted={aborted}")
    # one history everywhere: the same transitions at the same passes
    first = [(h.pass_no, h.trigger, h.dest, h.reason) for h in reports[0].history]
    for r in reports[1:]:
        if [(h.pass_no, h.trigger, h.dest, h.reason) for h in r.history] != first:
            bad.append(f"rank {r.rank} transitioned at other passes or for other reasons than rank 0")
    if s.faults.tick_offset is not None:
        skews = {r.stats["skew_rounds"] for r in reports}
        if len(skews) != 1 or 0 in skews:
            bad.append(f"tick anomaly not reported by every rank at the same rounds: skew rounds {sorted(skews)}")
    if s.outcome != "completes" and not s.faults.late_round:
        aborts = {next((h.pass_no for h in r.history if h.trigger == "abort"), None) for r in reports}
        if len(aborts) != 1 or None in aborts:
            bad.append(f"cycle 1 ended at different passes: {sorted(aborts, key=str)}")
    return bad


def table(results: dict, ranks: int) -> str:
    lines = [
        f"| fault on rank {FAULTY} of {ranks} | hits | outcome | aborted / disabled at pass | cycles completed | max wait (s) | invariants |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in SCENARIOS:
        reports = results.get(s.name)
        if reports is None:
            continue
        r0 = reports[0]
        end = next((h.pass_no for h in r0.history if h.trigger == "abort"), "")
        outcome = s.outcome + (f" ({s.reason})" if s.reason else "")
        bad = verdict(s, reports)
        lines.append(
            f"| {s.name} | {s.hits} | {outcome} | {end} | {r0.stats['cycles_completed']} "
            f"| {max(r.max_wait_s for r in reports):.2f} | {'ok' if not bad else 'FAILED: ' + bad[0]} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    ap.add_argument("-k", default="", help="only scenarios whose name contains this")
    args = ap.parse_args()
    chosen = [s for s in SCENARIOS if args.k in s.name]
    for ranks in args.ranks:
        print(table(run_matrix(ranks, chosen), ranks))
        print()


if __name__ == "__main__":
    main()
