"""The fault matrix: every fault of `faults.py` on 2 and on 4 ranks, each at the state or
phase it hits, with the outcome it must have. Run by tests/test_fault_matrix.py (one
process start per world size for the whole matrix) and printable as the table in
docs/architecture.md: `python -m vllm_eplb.harness.matrix`.

Outcomes:
  completes          nothing aborts; a cycle completes (tick anomalies: reported on every rank)
  aborts(R)          cycle 1 ends on every rank at the same pass with reason R; a later cycle completes
  disables(R)        rebalancing stops on every rank with reason R at the same pass; serving goes on
  suspends(R)        rebalancing pauses on every rank with reason R at the same pass (a transient cause:
                     a resume vote follows a back-off); serving goes on
  heals(R)           a round shows maps that differ across ranks: every rank heals them at the same pass,
                     within HEAL_WITHIN passes of the fault; cycle 1 ends there (R); a later cycle completes
  refuses(R)         at start-up: no rank ever balances (reason R names the differing key and ranks)
Every scenario also checks, right before every forward pass (after `catch_up()`, with the
maps that pass routes with): maps equal across ranks, every slot holds the expert its map
names, probe outputs unchanged; and that no pass spent longer in the balancer than
agreement_timeout_s plus a margin; that every rank went through the same transitions at
the same passes; and that a fault timed by a phase did fire.

Most rows hit rank 1; the regression rows hit rank 0, two ranks at once, or a rank that
sends nothing in the step that fails. Rows whose subject is not the planner (its process,
its submit and fetch) plan in a thread: a process start per scenario is most of the
matrix's time otherwise.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from vllm_eplb.core.state_machine import LIVE_PHASES as PHASES

from .faults import Faults, hits
from .runner import HarnessConfig, run_scenarios

FAULTY = 1  # the rank most faults hit
EVERY = tuple(range(8))  # a weight update hits every rank (of up to 8)
BASE = dict(window_size=20, step_interval=60, agreement_lag=2, agreement_timeout_s=3.0, planner="process")
THREAD = (("planner", "thread"),)
WAIT_MARGIN_S = 2.0  # scheduling noise on a loaded 2-core box, on top of agreement_timeout_s
# A slow pass against the bound (agreement_timeout_s, here 2 s): 0.5 s is within it, 3.5 s past it,
# each with 1.5 s to spare for scheduling noise on a loaded box.
SLOW_BOUND_S, SLOW_WITHIN_S, SLOW_PAST_S = 2.0, 0.5, 3.5
# Past the bound the protocol notices only where a round was posted during the slow pass: the
# pass after entering these phases posts one (load round, readiness vote, commit vote).
POSTS_AFTER_ENTRY = ("planning_reducing", "planning_waiting", "transferring")
# A fault that makes maps differ (a corruption, a documented misuse) may show in the checks from the
# first pass they differ until the heal: the next round posted (at most a readiness interval, L
# passes) read L passes later, plus the pass it takes effect before.
HEAL_WITHIN = 2 * BASE["agreement_lag"] + 1
# Rows that exercise nothing 4 ranks add to 2 run on 2 only: ticks -1 and +3 (+1 on 4 ranks shows the
# skew vote across 4), a lag within the bound, an uncounted pass outside transferring (the clock check
# reads every rank's offset alike on 4), and most recovery rows (their subject is one rank's timing).
TWO = (2,)


@dataclass(frozen=True)
class Scenario:
    name: str
    hits: str  # the state or phase the fault hits
    faults: Faults
    outcome: str  # "completes" | "aborts" | "disables" | "suspends" | "heals" | "refuses"
    reason: str = ""
    balancer: tuple = ()  # extra BalancerConfig fields, as (key, value) pairs
    passes: int = 170
    rank: int | tuple = FAULTY  # the rank(s) the fault hits
    fired: str = ""  # the event the faulty ranks must report (a phase-timed fault that fired)
    names: str = ""  # refuses: the key the one-line reason must name
    worlds: tuple = (2, 4)  # world sizes it runs on
    no_sends: tuple | None = None  # (cycle, step): the faulty rank sends nothing in that step
    diverges: bool = False  # maps may differ (and outputs change) from the fault until healed, HEAL_WITHIN passes


def _raise(point: str, kind: str = "error", nth: int = 1, rank=FAULTY) -> Faults:
    return Faults(raise_at=(rank, point, 1, kind, nth))


def _config_differs(what: str, key: str, faults: Faults) -> Scenario:
    return Scenario(f"config differs: {what}", "start-up", faults, "refuses", "config_mismatch", THREAD, 70, names=key)


def _slow(phase: str, seconds: float, rank=FAULTY, where: str = "") -> Scenario:
    past = seconds > SLOW_BOUND_S
    aborts = past and phase in POSTS_AFTER_ENTRY
    return Scenario(
        f"slow pass ({seconds:g} s, bound {SLOW_BOUND_S:g} s) in {phase}{where}", phase,
        Faults(slow_pass=(rank, phase, seconds)), "aborts" if aborts else "completes", "agreement_timeout" if aborts else "",
        (*THREAD, ("agreement_timeout_s", SLOW_BOUND_S)), 170 if aborts else 110, rank, fired="slow_pass",
        worlds=TWO if not past else (2, 4),
    )


SCENARIOS = [
    # the driver's ticks out of step with the forward passes
    *(
        Scenario(f"tick {k:+d} in {phase}", phase, Faults(tick_offset=(FAULTY, phase, k)), "completes", balancer=THREAD,
                 passes=110, fired="tick_offset", worlds=(2, 4) if k == 1 else TWO)
        for k in (1, -1, 3)
        for phase in PHASES
    ),
    # an exception on one rank, in each state and phase
    Scenario("error opening the window", "idle", _raise("window_reset"), "aborts", "internal_error", THREAD),
    Scenario("error closing the window", "collecting", _raise("snapshot"), "aborts", "internal_error", THREAD),
    Scenario("error copying the load", "planning_reducing", _raise("load_copy"), "aborts", "internal_error", THREAD),
    Scenario("error submitting the plan", "planning_waiting", _raise("plan_submit"), "aborts", "planner_error"),
    Scenario("error fetching the plan", "planning_waiting", _raise("plan_result"), "aborts", "planner_error"),
    Scenario(
        "policy raises", "planning_waiting", Faults(planner_error=(FAULTY, 1)), "aborts", "planner_error",
        balancer=THREAD,  # a thread keeps the policy's call count across plans
    ),
    Scenario("error starting the first step", "syncing", _raise("step_start"), "suspends", "transfer_group_broken", THREAD),
    Scenario("error finishing a step", "transferring", _raise("step_finish"), "aborts", "transfer_error", THREAD),
    Scenario("error starting the next step", "transferring", _raise("step_start", nth=2), "suspends", "transfer_group_broken",
             THREAD),
    Scenario("transfer fails", "transferring", Faults(transfer_error=(FAULTY, 1, 2)), "aborts", "transfer_error", THREAD),
    # out of memory
    Scenario("OOM in transfer start", "syncing", _raise("step_start", "oom"), "suspends", "transfer_group_broken", THREAD),
    Scenario("OOM in commit (weights)", "transferring", _raise("commit_prepare", "oom"), "aborts", "out_of_memory", THREAD),
    Scenario("OOM in commit (maps)", "transferring", _raise("stage_maps", "oom"), "aborts", "out_of_memory", THREAD),
    # the planner process
    Scenario(
        "planner killed mid-plan", "planning_waiting",
        Faults(kill_planner=(FAULTY, "planning_waiting"), slow_planner=(FAULTY, 1.0), slow_once=True),
        "aborts", "planner_died", balancer=(("planning_timeout_s", 20.0),), passes=500, fired="killed_planner",
    ),
    Scenario("planner killed while idle", "idle", Faults(kill_planner=(FAULTY, "idle")), "completes", passes=300,
             fired="killed_planner"),
    Scenario(
        "planner dies past its restarts", "planning_waiting",
        Faults(kill_planner=(FAULTY, "planning_waiting"), slow_planner=(FAULTY, 1.0), slow_once=True),
        "suspends", "planner_dead", balancer=(("planning_timeout_s", 20.0), ("planner_max_restarts", 0)), passes=200,
        fired="killed_planner",
    ),
    Scenario(
        "planner slow past its timeout", "planning_waiting", Faults(slow_planner=(FAULTY, 3.0), slow_once=True),
        "aborts", "planning_timeout", balancer=(("planning_timeout_s", 0.5),), passes=500,
    ),
    # agreement and exporter
    Scenario(
        "agreement round late past the timeout", "planning_waiting", Faults(late_round=(FAULTY, 2, 8.0)),
        "aborts", "agreement_timeout", balancer=THREAD,
    ),
    Scenario("metrics exporter raises", "planning_waiting", Faults(metrics_error=(FAULTY, "planning_waiting")), "aborts",
             "metrics_error", THREAD, fired="metrics_error"),
    # the ranks disagree about the protocol: one key of each class differs on one rank
    _config_differs("schedule (step_interval)", "step_interval", Faults(config_override=(FAULTY, {"step_interval": 80}))),
    _config_differs("step (layers_per_pass)", "layers_per_pass", Faults(config_override=(FAULTY, {"layers_per_pass": 2}))),
    _config_differs("vote (improvement_threshold)", "improvement_threshold",
                    Faults(config_override=(FAULTY, {"improvement_threshold": 0.5}))),
    _config_differs("plan (policy)", "policy", Faults(config_override=(FAULTY, {"policy": "greedy"}))),
    _config_differs("backend", "backend", Faults(setup_override=(FAULTY, {"backend": "p2p"}))),
    _config_differs("topology (ranks per node)", "topology", Faults(setup_override=(FAULTY, {"ranks_per_node": 1}))),
    # a pass the runner did not count (a forward path that bypasses prepare_forward)
    *(
        Scenario(f"uncounted pass in {phase}", phase, Faults(uncounted_pass=(FAULTY, phase)), "disables", "clock_mismatch",
                 THREAD, 100, fired="uncounted_pass", worlds=(2, 4) if phase == "transferring" else TWO)
        for phase in PHASES
    ),
    # one rank's pass much slower than its peers' (a long prefill, a pause): within and past the bound
    *(_slow(phase, seconds) for seconds in (SLOW_WITHIN_S, SLOW_PAST_S) for phase in PHASES),
    # regressions: the fault on rank 0, on two ranks at once, on a rank with nothing to send
    Scenario("error finishing a step on rank 0", "transferring", _raise("step_finish", rank=0), "aborts", "transfer_error",
             THREAD, rank=0),
    Scenario("error starting the first step on rank 0", "syncing", _raise("step_start", rank=0), "suspends",
             "transfer_group_broken", THREAD, rank=0),
    Scenario("uncounted pass on rank 0 in transferring", "transferring", Faults(uncounted_pass=(0, "transferring")),
             "disables", "clock_mismatch", THREAD, 100, rank=0, fired="uncounted_pass"),
    _slow("transferring", SLOW_PAST_S, rank=0, where=" on rank 0"),
    Scenario("transfer fails on ranks 0 and 1", "transferring", Faults(transfer_error=((0, 1), 1, 2)), "aborts",
             "transfer_error", THREAD, rank=(0, 1)),
    Scenario("error copying the load on ranks 0 and 1", "planning_reducing", _raise("load_copy", rank=(0, 1)), "aborts",
             "internal_error", THREAD, rank=(0, 1)),
    # this workload's plan: on 4 ranks, rank 0 sends nothing in cycle 1's second step (on 2,
    # every rank sends in every step)
    Scenario("transfer fails on a rank with nothing to send", "transferring", Faults(transfer_error=(0, 1, 2)), "aborts",
             "transfer_error", THREAD, rank=0, worlds=(4,), no_sends=(1, 2)),
    # new weights written into the slots (an RL trainer's update), on every rank between the same two passes
    Scenario("weight update while idle", "idle", Faults(weight_update=(EVERY, "idle", True, 0)), "completes", balancer=THREAD,
             rank=EVERY, fired="weight_update"),
    Scenario("weight update while planning", "planning_waiting", Faults(weight_update=(EVERY, "planning_waiting", True, 0)),
             "aborts", "weight_update", THREAD, rank=EVERY, fired="weight_update"),
    # a pass into transferring: commit votes posted before the update name steps ready; none may land
    Scenario("weight update while transferring", "transferring", Faults(weight_update=(EVERY, "transferring", True, 1)),
             "aborts", "weight_update", THREAD, rank=EVERY, fired="weight_update"),
    # --- recovery: never diverge, never stay down
    # a weight update after a pass one rank's driver has not ticked yet (an idle data-parallel engine's lag):
    # the update waits for that pass's commit on that rank too, as on its peers
    Scenario("weight update on a pass one rank has not ticked", "transferring",
             Faults(weight_update=(EVERY, "transferring", True, 2), update_tick_missed=(FAULTY,)), "aborts",
             "weight_update", THREAD, 170, rank=EVERY, fired="weight_update", worlds=TWO),
    # a documented misuse (engines not paused): one update two passes apart; a commit in between lands on
    # one rank only, the next round's digests show it, every rank heals and suspends
    Scenario("weight update two passes apart in transferring", "transferring",
             Faults(weight_update=((0, 1), "transferring", False, {0: 1, 1: 3})), "suspends", "weight_update_skew",
             THREAD, 110, rank=(0, 1), fired="weight_update", worlds=TWO, diverges=True),
    # a bug escaping the tick on the retry too: the rank stops voting, its peers' next round fails everywhere
    Scenario("exception escaping the tick twice", "transferring",
             Faults(raise_at=(FAULTY, "tick_transferring", 1, "error", 2, 2)), "aborts", "agreement_timeout",
             (*THREAD, ("agreement_timeout_s", SLOW_BOUND_S)), 170, worlds=TWO),
    # a step slower than a pass (2 s, transfer_timeout_s 120) dropped by an unrelated abort: slow, not broken
    Scenario("slow step (2 s) dropped by an abort", "transferring",
             Faults(slow_step=(FAULTY, 1, 2.0), metrics_error=(FAULTY, "transferring")), "aborts", "metrics_error",
             THREAD, 150, fired="metrics_error", worlds=TWO),
    # the rank that reads the failed round pauses 3.5 s first (bound 2 s): the rebuild waits for it
    Scenario("pause (3.5 s) on the rebuild pass after an agreement timeout", "planning_waiting",
             Faults(late_round=(FAULTY, 2, 6.0), rebuild_pause=(FAULTY, SLOW_PAST_S)), "aborts", "agreement_timeout",
             (*THREAD, ("agreement_timeout_s", SLOW_BOUND_S)), 170, fired="rebuild_pause", worlds=TWO),
    # a replacement planner process (the first was killed while idle) stops before its warm-up answers
    Scenario("replacement planner hangs before its warm-up", "planning_waiting",
             Faults(kill_planner=(FAULTY, "idle"), hang_replacement=FAULTY), "aborts", "planning_timeout",
             (("planning_timeout_s", 0.5),), 1000, fired="hung_planner", worlds=TWO),
    # maps changed on one rank with no protocol path: healed within one round, outputs right again
    Scenario("maps corrupted: a slot's weights and map on rank 1", "transferring",
             Faults(corrupt_maps=(FAULTY, "transferring", "own")), "heals", "maps_diverged", THREAD, 190,
             fired="corrupt_maps", diverges=True),
    Scenario("maps corrupted: rank 1's map of a peer's slot", "planning_waiting",
             Faults(corrupt_maps=(FAULTY, "planning_waiting", "peer")), "heals", "maps_diverged", THREAD, 190,
             fired="corrupt_maps", diverges=True, worlds=TWO),
    Scenario("weight update on one rank only", "planning_waiting",
             Faults(weight_update=((FAULTY,), "planning_waiting", False, 0)), "suspends", "weight_update_skew", THREAD,
             fired="weight_update"),
]


def config_for(s: Scenario, ranks: int) -> HarnessConfig:
    # The 4-rank column runs with staging reserved at start-up, as every GPU backend does
    # (regions reused across commits, held by aborted steps until done); the 2-rank column
    # allocates per step, as gloo on CPU does by default.
    return HarnessConfig(
        ranks=ranks, passes=s.passes, redundant=ranks, zipf=1.5, balancer={**BASE, **dict(s.balancer)}, faults=s.faults,
        cpu_staging=ranks >= 4,
    )


def scenarios_for(ranks: int, scenarios=SCENARIOS) -> list[Scenario]:
    return [s for s in scenarios if ranks in s.worlds]


def run_matrix(ranks: int, scenarios=SCENARIOS, timeout_s: float = 1800):
    """{scenario name: [RankReport per rank]}"""
    chosen = scenarios_for(ranks, scenarios)
    results = run_scenarios([config_for(s, ranks) for s in chosen], timeout_s)
    return {s.name: reports for s, reports in zip(chosen, results)}


def verdict(s: Scenario, reports) -> list[str]:
    """What went wrong in one scenario's run (empty: it behaved as the matrix says)."""
    bad = []
    timeout = dict(s.balancer).get("agreement_timeout_s", BASE["agreement_timeout_s"])
    faulty = [r for r in reports if hits((s.rank,), r.rank)]
    differed = sorted({x for r in reports for x in r.map_disagreements + r.output_mismatches})
    for r in reports:
        st = r.stats
        window = range(differed[0], differed[0] + HEAL_WITHIN + 1) if s.diverges and differed else range(0)
        if any(x not in window for x in r.map_disagreements):
            bad.append(f"rank {r.rank}: maps differed across ranks at passes {r.map_disagreements[:5]}")
        if r.slot_mismatches:
            bad.append(f"rank {r.rank}: slots held wrong experts: {r.slot_mismatches[:3]}")
        if any(x not in window for x in r.output_mismatches):
            bad.append(f"rank {r.rank}: probe outputs changed at passes {r.output_mismatches[:5]}")
        if st["disabled_reason"] and s.outcome != "disables" and s.outcome != "refuses":
            bad.append(f"rank {r.rank}: disabled ({st['disabled_reason']!r}): a transient cause must not stop rebalancing")
        if r.max_wait_s > timeout + WAIT_MARGIN_S:
            bad.append(f"rank {r.rank}: a pass waited {r.max_wait_s:.1f} s in the balancer (timeout {timeout:g} s)")
        aborted = dict(st["cycles_aborted"])
        if s.outcome == "completes":
            if aborted or st["disabled_reason"] or st["cycles_completed"] < 1:
                bad.append(f"rank {r.rank}: expected completed cycles only, got aborted={aborted} disabled={st['disabled_reason']!r} completed={st['cycles_completed']}")
        elif s.outcome == "aborts":
            if aborted != {s.reason: 1} or st["disabled_reason"] or st["cycles_completed"] < 1:
                bad.append(f"rank {r.rank}: expected one {s.reason} abort then a completed cycle, got aborted={aborted} disabled={st['disabled_reason']!r} completed={st['cycles_completed']}")
        elif s.outcome == "suspends":
            if not st["suspensions"].get(s.reason):
                bad.append(f"rank {r.rank}: expected suspended ({s.reason}), got suspensions={dict(st['suspensions'])} "
                           f"aborted={aborted}")
        elif s.outcome == "heals":
            heals = list(st["heals"])
            if aborted != {s.reason: 1} or not heals or st["cycles_completed"] < 1:
                bad.append(f"rank {r.rank}: expected one {s.reason} abort, healed maps, then a completed cycle, got "
                           f"aborted={aborted} heals={heals} completed={st['cycles_completed']}")
            elif differed and heals[0][0] > differed[0] + HEAL_WITHIN:
                bad.append(f"rank {r.rank}: maps differing from pass {differed[0]} healed only at pass {heals[0][0]}")
        elif s.outcome == "refuses":
            reason = st["disabled_reason"]
            ranks_named = [f"rank {x}" for x in ((s.rank,) if isinstance(s.rank, int) else s.rank)]
            if not reason.startswith(s.reason) or s.names not in reason or not all(x in reason for x in ranks_named):
                bad.append(f"rank {r.rank}: expected disabled at start-up ({s.reason}, naming {s.names!r} and {ranks_named}), got {reason!r}")
            if [h.trigger for h in r.history] != ["disable"] or st["agreement"]["rounds"] or st["cycles_started"]:
                bad.append(f"rank {r.rank}: balanced anyway: transitions {[h.trigger for h in r.history]} (only disable "
                           f"expected), {st['agreement']['rounds']} rounds")
        else:
            if not st["disabled_reason"].startswith(s.reason):
                bad.append(f"rank {r.rank}: expected disabled ({s.reason}), got {st['disabled_reason']!r} aborted={aborted}")
    for r in faulty:
        if s.fired and s.fired not in r.events:
            bad.append(f"rank {r.rank}: the fault never fired (no {s.fired!r} event): the row tests nothing")
        if s.no_sends is not None:
            cycle, nth = s.no_sends
            steps = [x for x in r.events["steps"] if x[0] == cycle]
            if len(steps) < nth or steps[nth - 1][2] != 0:
                bad.append(f"rank {r.rank}: step {nth} of cycle {cycle} is not one with nothing to send: {steps}")
    # one history everywhere: the same transitions at the same passes
    # (where maps diverge on purpose, a layer committed on some ranks only is the fault itself)
    seen = lambda r: [(h.pass_no, h.trigger, h.dest, h.reason) for h in r.history if not (s.diverges and h.trigger == "next_layer")]
    first = seen(reports[0])
    for r in reports[1:]:
        if seen(r) != first:
            bad.append(f"rank {r.rank} transitioned at other passes or for other reasons than rank 0")
    if s.faults.tick_offset is not None:
        skews = {r.stats["skew_rounds"] for r in reports}
        if len(skews) != 1 or 0 in skews:
            bad.append(f"tick anomaly not reported by every rank at the same rounds: skew rounds {sorted(skews)}")
    if len({tuple(h[0] for h in r.stats["heals"]) for r in reports}) > 1:
        bad.append(f"ranks healed at different passes: {[[h[0] for h in r.stats['heals']] for r in reports]}")
    if s.outcome in ("aborts", "disables", "suspends", "heals"):
        aborts = {next((h.pass_no for h in r.history if h.trigger == "abort"), None) for r in reports}
        if len(aborts) != 1 or None in aborts:
            bad.append(f"cycle 1 ended at different passes: {sorted(aborts, key=str)}")
    if s.reason == "agreement_timeout" and s.outcome == "aborts":
        if any(r.stats["agreement"]["rebuilds"] != 1 for r in reports):
            bad.append(f"agreement group rebuilds: {[r.stats['agreement']['rebuilds'] for r in reports]} (expected 1 each)")
    return bad


def _ranks(rank) -> str:
    if rank == EVERY:
        return "every"
    return str(rank) if isinstance(rank, int) else " and ".join(map(str, rank))


def declared(s: Scenario) -> list[str]:
    """The columns of a row the scenario declares (fault, on rank, hits, outcome); the
    others are measured. docs/architecture.md's tables are checked against these."""
    return [s.name, _ranks(s.rank), s.hits, s.outcome + (f" ({s.reason})" if s.reason else "")]


def table(results: dict, ranks: int) -> str:
    lines = [
        f"| fault ({ranks} ranks) | on rank | hits | outcome | aborted / disabled at pass | cycles completed | max wait (s) | invariants |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in SCENARIOS:
        reports = results.get(s.name)
        if reports is None:
            continue
        r0 = reports[0]
        end = next((h.pass_no for h in r0.history if h.trigger == "abort"), "0 (start-up)" if s.outcome == "refuses" else "")
        bad = verdict(s, reports)
        lines.append(
            f"| {' | '.join(declared(s))} | {end} | {r0.stats['cycles_completed']} "
            f"| {max(r.max_wait_s for r in reports):.2f} | {'ok' if not bad else 'FAILED: ' + bad[0]} |"
        )
    return "\n".join(lines)


def main() -> None:
    import time

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    ap.add_argument("-k", default="", help="only scenarios whose name contains this")
    args = ap.parse_args()
    chosen = [s for s in SCENARIOS if args.k in s.name]
    for ranks in args.ranks:
        t0 = time.monotonic()
        results = run_matrix(ranks, chosen)
        print(table(results, ranks))
        slowest = sorted(results.items(), key=lambda kv: -kv[1][0].stats["wall_s"])[:5]
        print(f"\n({len(results)} scenarios on {ranks} ranks in {time.monotonic() - t0:.0f} s; slowest: "
              + ", ".join(f"{name} {reports[0].stats['wall_s']:.0f} s" for name, reports in slowest) + ")\n")


if __name__ == "__main__":
    main()
