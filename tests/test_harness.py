"""Multi-process runs of the balancer over a real gloo group (no vLLM).

Every run checks, on every pass: routing maps identical across ranks, every slot
holding the weights its map names, and probe outputs equal to those before any
rebalance. On top, each test asserts what its scenario is about."""

from __future__ import annotations

import numpy as np
import pytest

from vllm_eplb.harness.runner import Faults, HarnessConfig, run_harness

FAST = dict(window_size=20, step_interval=60, agreement_lag=2)


def run(ranks=2, passes=200, faults=None, balancer=None, **kw):
    cfg = HarnessConfig(
        ranks=ranks,
        passes=passes,
        redundant=kw.pop("redundant", ranks),
        balancer={**FAST, **(balancer or {})},
        faults=faults or Faults(),
        **kw,
    )
    return run_harness(cfg, timeout_s=300)


def transitions(report):
    return [(h.pass_no, h.trigger, h.source, h.dest, h.layer, h.reason) for h in report.history]


def assert_consistent(reports, same_history=True):
    passes = reports[0].checks
    for r in reports:
        assert r.checks == passes > 0
        assert r.map_disagreements == [], f"rank {r.rank}: maps differed across ranks at passes {r.map_disagreements[:5]}"
        assert r.slot_mismatches == [], f"rank {r.rank}: slots held wrong experts: {r.slot_mismatches[:5]}"
        assert r.output_mismatches == [], f"rank {r.rank}: probe outputs changed at passes {r.output_mismatches[:5]}"
        assert np.array_equal(r.placement, reports[0].placement)
    if same_history:
        for r in reports[1:]:
            assert transitions(r) == transitions(reports[0]), f"rank {r.rank} transitioned at other passes than rank 0"


def completed_cycles(report):
    return report.stats["cycles_completed"]


@pytest.fixture(scope="module", params=[2, 4])
def drifting(request):
    """Hot experts rotate every 60 passes, a low threshold: the machine cycles fully again and again."""
    ranks = request.param
    return run(ranks=ranks, passes=260, drift_every=60, zipf=1.5, balancer=dict(improvement_threshold=0.01))


def test_full_cycles_consistent(drifting):
    assert_consistent(drifting)
    r = drifting[0]
    assert completed_cycles(r) >= 2
    states = [t[3] for t in transitions(r)]
    # each completed cycle went through every state, in order
    text = " ".join(states)
    assert text.count("collecting planning syncing transferring") >= 2
    assert r.stats["experts_moved"] + sum(x.stats["experts_moved"] for x in drifting[1:]) > 0


def test_every_transition_logged_with_pass_and_layer(drifting):
    for t in transitions(drifting[0]):
        pass_no, trigger, src, dst, layer, _ = t
        assert pass_no > 0
        if dst == "transferring":
            assert 0 <= layer < 4


@pytest.fixture(scope="module")
def steady():
    return run(ranks=4, passes=200, zipf=1.5)


def test_balancedness_improves_on_skewed_load(steady):
    assert_consistent(steady)
    r = steady[0]
    hist = r.stats["observed_history"]
    assert len(hist) >= 2
    before, after = hist[0][1], hist[1][1]
    assert after > before + 0.1, hist
    assert r.stats["balancedness_predicted"] >= r.stats["balancedness_current"]
    # the last window, predicted for the layout in force and for the start-up one
    assert r.stats["balancedness_current"] > r.stats["balancedness_initial"] + 0.1, r.stats


def test_a_model_that_records_no_load_is_reported_not_balanced(steady):
    """MoE layers that never report their routed tokens (a model class the adapter does not wire):
    every window is counted on every rank (vllm:eplb_unrecorded_windows, a warning once), nothing
    moves. Where one rank's layers do record, no window is reported."""
    assert all(r.stats["unrecorded_windows"] == 0 for r in steady)
    blind = run(ranks=2, passes=200, zipf=1.5, faults=Faults(unrecorded_load=(0, 1)))
    assert_consistent(blind)
    for r in blind:
        windows = r.stats["cycles_started"]
        assert windows >= 2 and r.stats["unrecorded_windows"] == windows, r.stats
        assert r.stats["cycles_completed"] == 0 and r.stats["experts_moved"] == 0
    one = run(ranks=2, passes=140, zipf=1.5, faults=Faults(unrecorded_load=(1,)))
    assert all(r.stats["unrecorded_windows"] == 0 for r in one)


def test_later_cycle_skipped_when_gain_is_small(steady):
    # the load does not move: after the first rebalance nothing is worth 5%
    r = steady[0]
    assert completed_cycles(r) == 1
    assert r.stats["cycles_skipped"]["insufficient_improvement"] >= 1


def test_planner_error_aborts_everywhere_then_recovers():
    # thread planner: the failing policy counts its calls, which a planner process would not keep
    reports = run(ranks=2, passes=200, faults=Faults(planner_error=(1, 1)), balancer=dict(planner="thread"))
    assert_consistent(reports)
    for r in reports:
        assert r.stats["cycles_aborted"]["planner_error"] == 1
        assert completed_cycles(r) == 1  # the next cycle went through
        assert r.stats["disabled_reason"] == ""


def test_planner_process_error_aborts_everywhere():
    """The policy raises inside the planner process on rank 1 (every call): every cycle
    aborts on both ranks at the same pass, nothing moves."""
    reports = run(ranks=2, passes=130, faults=Faults(planner_error=(1, 1)))
    assert_consistent(reports)
    for r in reports:
        assert r.stats["cycles_aborted"]["planner_error"] == 2
        assert r.stats["layers_committed"] == 0


def test_planning_timeout_aborts_everywhere():
    reports = run(ranks=2, passes=130, faults=Faults(slow_planner=(1, 2.0)), balancer=dict(planning_timeout_s=0.5))
    assert_consistent(reports)
    for r in reports:
        assert r.stats["cycles_aborted"]["planning_timeout"] >= 1
        assert completed_cycles(r) == 0


def test_plan_mismatch_detected_nothing_moves():
    reports = run(ranks=2, passes=100, faults=Faults(divergent_plan=1))
    assert_consistent(reports)
    for r in reports:
        assert r.stats["cycles_aborted"]["plan_mismatch"] >= 1
        assert r.stats["layers_committed"] == 0


def test_transfer_error_keeps_one_placement_per_layer():
    """Step 2 fails on rank 1 in cycle 1: layer 0 is committed everywhere, the rest stays old
    everywhere; the next cycle completes."""
    reports = run(ranks=4, passes=200, zipf=1.5, faults=Faults(transfer_error=(1, 1, 2)))
    assert_consistent(reports)
    for r in reports:
        assert r.stats["cycles_aborted"]["transfer_error"] == 1
        assert completed_cycles(r) >= 1
    aborts = [t for t in transitions(reports[0]) if t[1] == "abort"]
    assert len(aborts) == 1


@pytest.mark.parametrize("faults", [None, Faults(transfer_error=(1, 1, 2))], ids=["clean", "transfer_error"])
def test_reserved_staging_comes_back_through_commits_and_aborts(faults):
    """Staging reserved at start-up (what every GPU backend does; here gloo on CPU, under the
    rig's every-pass checks): regions serve step after step, come back at each commit and
    from an aborted cycle's steps once done; no step ever needs memory outside them, and no
    region is reused while its data is still wanted (slots, maps and outputs are checked)."""
    reports = run(ranks=4, passes=200, zipf=1.5, faults=faults, cpu_staging=True)
    assert_consistent(reports)
    for r in reports:
        assert completed_cycles(r) >= 1
        assert r.stats["staging"]["regions"] == 3  # agreement_lag + 1
        assert r.stats["staging"]["reserved_seen"] == r.stats["staging"]["reserved"] > 0  # through the fault wrapper
        assert r.stats["staging"]["fallbacks"] == 0
        assert r.stats["layers_committed"] > 3  # the regions were reused
    if faults is not None:
        assert all(r.stats["cycles_aborted"]["transfer_error"] == 1 for r in reports)


def test_ranks_on_different_schedules_refused_at_start_up():
    """Rank 1 would read rounds one pass later than rank 0 (a mismatched config): the
    start-up check sees it, no rank ever posts a round, each says which key and ranks."""
    reports = run(ranks=2, passes=80, faults=Faults(config_override=(1, dict(agreement_lag=3))))
    assert_consistent(reports)
    for r in reports:
        assert r.stats["disabled_reason"] == "config_mismatch: agreement_lag differs (rank 0: 2 | rank 1: 3)"
        assert [(h.pass_no, h.trigger, h.dest) for h in r.history] == [(0, "disable", "disabled")]
        assert r.stats["agreement"]["rounds"] == 0


def test_step_held_as_other_layers_is_never_committed():
    """Past the start-up check, rank 1 moves two layers per step and rank 0 one (a bug): the
    steps' messages are tagged by layer, so the layer only one rank sends never pairs
    (gloo would abort the process on the size mismatch); the first commit vote names the
    steps' layers, every rank reads the difference there and stops before any commit."""
    # the unpaired messages pend until the transfer group's timeout: short, or the ranks'
    # exit waits for it (their waiter threads are joined)
    reports = run(ranks=2, passes=110, faults=Faults(step_layers_after_start=(1, 2)), balancer=dict(transfer_timeout_s=5.0, agreement_timeout_s=3.0))
    assert_consistent(reports)
    for r in reports:
        assert r.stats["disabled_reason"].startswith("step_mismatch")
        assert r.stats["layers_committed"] == 0
    assert reports[1].events["steps"][0][1] == [0, 1] and reports[0].events["steps"][0][1] == [0]


def test_eight_ranks_two_layers_per_pass():
    reports = run(ranks=8, passes=140, check_every=5, balancer=dict(layers_per_pass=2), zipf=1.5)
    assert_consistent(reports)
    assert completed_cycles(reports[0]) == 1
    assert reports[0].stats["steps_total"] == 2  # 4 layers, 2 per step
    assert reports[0].stats["layers_committed"] == 4


def test_p2p_backend_batched_isend_irecv():
    """The NCCL backend's message logic (packed rows, batched isend/irecv, receives
    matched in plan order) over gloo: the same checks as the gloo backend."""
    reports = run(ranks=4, passes=200, zipf=1.5, backend="p2p")
    assert_consistent(reports)
    assert completed_cycles(reports[0]) == 1
    assert sum(r.stats["experts_moved"] for r in reports) > 0


def test_slow_transfer_is_polled_not_waited_for():
    """Rank 1's data arrives 5 polls late at every step: every rank votes again until
    it is there, the cycle completes at the same pass everywhere, later than normal."""
    normal = run(ranks=2, passes=200, zipf=1.5)
    slow = run(ranks=2, passes=200, zipf=1.5, faults=Faults(slow_transfer=(1, 5)))
    assert_consistent(slow)
    for r in slow:
        assert completed_cycles(r) == 1
        assert r.stats["cycles_aborted"]["transfer_error"] == 0
    # steps overlap in the pipeline, but the last one still waits its 5 extra polls
    assert slow[0].stats["cycle_passes"][0] >= normal[0].stats["cycle_passes"][0] + 5


def test_new_placement_live_within_layers_plus_four_lags_plus_four():
    """One layer goes live per pass once the pipeline is full: from the window's end to the
    last commit takes at most num_layers + 4 * agreement_lag + 4 passes (issue 11's target),
    with passes as long as a small model's (20 ms) so the plan is ready at the first
    readiness round."""
    layers, lag = 8, 2
    reports = run(ranks=2, passes=110, layers=layers, zipf=1.5, pass_sleep_s=0.02, balancer=dict(window_size=20, step_interval=80))
    assert_consistent(reports)
    live = reports[0].stats["cycle_passes"]
    assert live and live[0] <= layers + 4 * lag + 4, live


def _checker_sees(rank: int, world: int) -> dict:
    """One rank of two: the rig's checker (the probe batch riding in a pass, as the harness
    runs it) on a clean pass, then after rank 1's slot 0 of layer 1 is overwritten with
    another expert's weights, then after rank 1's map of layer 2 alone is changed."""
    import torch

    from vllm_eplb.core.placement import Topology
    from vllm_eplb.harness.checks import InvariantChecker
    from vllm_eplb.harness.synthetic_moe import DriftingWorkload, SyntheticMoE

    torch.set_num_threads(1)
    topo = Topology(world, 16, 20)
    model = SyntheticMoE.exact_model(topo, 4, 16, 2, rank)
    work = DriftingWorkload(16, 64)
    probe = work.probe()
    checker = InvariantChecker(model.maps, model.slot_mismatches, lambda: model.probe(probe), world)

    def one_pass(p):
        batch = work.batch(p)
        out = model.forward(torch.cat([batch, probe]), record_rows=len(batch))
        checker.check(p, probe_out=out[len(batch):])

    one_pass(1)
    if rank == 1:
        model.weights[1][0][0].copy_(model.expert_weights(1, 15)[0])  # a slot holding the wrong expert
    one_pass(2)
    if rank == 1:
        model.weights[1][0][0].copy_(model.expert_weights(1, int(model.maps.phy2log[1, model.first]))[0])
        model.maps.log2phy[2].copy_(model.maps.log2phy[2].roll(1, dims=0))  # this rank routes elsewhere
    one_pass(3)
    return {"maps": checker.map_disagreements, "slots": [e[:2] for e in checker.slot_errors], "outputs": checker.output_changes}


def test_the_checks_see_a_wrong_slot_and_a_map_only_one_rank_has():
    """The invariant checker can fail: a slot overwritten on one rank changes the probe's
    outputs on every rank (pass 2) and names the slot on that rank; a map changed on one rank
    is seen by every rank (pass 3)."""
    from vllm_eplb.harness.launcher import launch

    r0, r1 = launch(_checker_sees, 2, timeout_s=120)
    assert r1["slots"] == [(2, 1)] and r0["slots"] == []
    assert r0["outputs"][0] == r1["outputs"][0] == 2
    assert r0["maps"] == r1["maps"] == [3]


def _rank_times_ten(rank: int, world: int) -> int:
    return rank * 10


def _rank_one_hangs(rank: int, world: int) -> int:
    import time

    from vllm_eplb.harness.launcher import checkpoint

    checkpoint({"rank": rank, "done": 1})
    if rank == 1:
        time.sleep(60)
    return rank


def test_launcher_deadlines_far_off_and_passed():
    """A deadline far off (a benchmark's default) is waited for in slices the OS accepts; a
    rank still running at the deadline is named and what every rank checkpointed comes back."""
    from vllm_eplb.harness.launcher import TimedOut, launch

    assert launch(_rank_times_ten, 2, timeout_s=1e9) == [0, 10]
    with pytest.raises(TimedOut) as exc:
        launch(_rank_one_hangs, 2, timeout_s=20)  # rank 0 starts, imports torch and returns well within it, even on a loaded box
    assert exc.value.hung == [1]
    assert exc.value.partial == [0, {"rank": 1, "done": 1}]
