"""The load trigger (core/load_trigger.py): a cycle starts early, at the same pass on every rank,
when the traffic mix changes; never on unchanged traffic; never with trigger_margin 0."""

from __future__ import annotations

import math

import numpy as np
import pytest
from pydantic import ValidationError

from vllm_eplb.core import BalancerConfig
from vllm_eplb.core.load_trigger import sampling_noise, watch_passes
from vllm_eplb.harness.runner import HarnessConfig, run_scenarios

SHIFT = 560  # the rig's topic mix rotates here (DriftingWorkload.drift_every); the next rotation is past the run
SCHEDULE = dict(window_size=40, step_interval=400, agreement_lag=2, planner="thread")  # cycles start at 360, 760


def transitions(report):
    return [(h.pass_no, h.trigger, h.source, h.dest, h.layer, h.reason) for h in report.history]


@pytest.fixture(scope="module")
def runs():
    common = dict(ranks=2, passes=900, tokens=128, zipf=1.5, drift_every=SHIFT, check_every=5, redundant=4)
    cfgs = [HarnessConfig(balancer={**SCHEDULE, "trigger_margin": m}, **common) for m in (0.0, 0.02)]
    return dict(zip(("fixed", "trigger"), run_scenarios(cfgs, timeout_s=600)))


def starts(report):
    return [(h.pass_no, h.reason) for h in report.history if h.trigger == "start_collecting"]


def assert_consistent(reports):
    for r in reports:
        assert r.checks > 0
        assert r.map_disagreements == [] and r.slot_mismatches == [] and r.output_mismatches == []
        assert transitions(r) == transitions(reports[0]), f"rank {r.rank} transitioned at other passes than rank 0"
        assert np.array_equal(r.placement, reports[0].placement)


def test_fixed_interval_starts_cycles_on_the_schedule_only(runs):
    reports = runs["fixed"]
    assert_consistent(reports)
    assert starts(reports[0]) == [(360, ""), (760, "")]
    assert reports[0].stats["load_triggers"] == 0
    assert reports[0].stats["agreement"]["rounds"] > 0


def test_a_shift_starts_a_cycle_early_on_every_rank_at_one_pass(runs):
    reports = runs["trigger"]
    assert_consistent(reports)  # the same transitions at the same passes, maps and slots agree
    early = [p for p, why in starts(reports[0]) if why == "load trigger"]
    # not before the mix changed (unchanged traffic never triggers), well before the schedule's 760
    assert early and SHIFT < early[0] < SHIFT + 2 * SCHEDULE["window_size"], starts(reports[0])
    assert all(r.stats["load_triggers"] == len(early) for r in reports)
    # the early cycle completed: a new placement was live before the scheduled cycle would have started
    finished = [h.pass_no for h in reports[0].history if h.trigger in ("finish", "skip") and h.pass_no > early[0]]
    assert finished and finished[0] < 760
    assert reports[0].stats["cycles_completed"] >= 2


def test_a_triggered_cycle_carries_the_watch_windows_judged_short(runs):
    """The load-triggered cycle's window ends sooner than window_size passes after it started: the
    watch windows every rank judged short alone are part of its load (core/load_trigger.py,
    Carried); the scheduled cycle still collects a whole window."""
    v = watch_passes(BalancerConfig(**SCHEDULE))
    for mode, why, windows in (("trigger", "load trigger", range(1, 4)), ("fixed", "", (0,))):
        hist = runs[mode][0].history
        start = next(h.pass_no for h in hist if h.trigger == "start_collecting" and h.reason == why)
        full = next(h.pass_no for h in hist if h.trigger == "window_full" and h.pass_no > start)
        assert any(full - start == SCHEDULE["window_size"] - k * v for k in windows), (mode, start, full)
    for r in runs["trigger"]:
        assert r.map_disagreements == [] and r.stats["disabled_reason"] == "" and not r.stats["cycles_aborted"]


def test_a_shift_seen_only_over_four_windows_carries_the_windows_judged():
    """A smaller shift (benchmarks/adapt.py's rig: one topic of 16 rotates; 64 tokens a pass): no
    watch window falls short alone, the last four together do. The cycle that verdict starts
    carries the last three windows judged (most of the shift is in them), so it collects a quarter
    of a window and its placement is live well within a window of the vote (before this, it
    collected the whole window: 2.32 windows to adapt on that rig, 1.56 with the carry)."""
    shift, window = 1700, 200
    balancer = dict(window_size=window, step_interval=1200, agreement_lag=2, planner="thread", improvement_threshold=0.0)
    cfg = HarnessConfig(ranks=2, layers=4, logical=16, redundant=4, dim=16, top_k=2, tokens=64, passes=2150, zipf=1.2,
                        drift_every=shift, topics=16, check_every=50, balancer=balancer)
    reports = run_scenarios([cfg], timeout_s=600)[0]
    assert_consistent(reports)
    hist = reports[0].history
    start = next(h.pass_no for h in hist if h.trigger == "start_collecting" and h.reason == "load trigger")
    assert shift < start < shift + 2 * window, starts(reports[0])
    full = next(h.pass_no for h in hist if h.trigger == "window_full" and h.pass_no > start)
    assert full - start == window - 3 * watch_passes(BalancerConfig(**balancer)), (start, full)
    live = next(h.pass_no for h in hist if h.trigger in ("finish", "skip") and h.pass_no > start)
    assert live - start < window // 2, (start, live)
    assert reports[0].stats["cycles_completed"] >= 2 and not reports[0].stats["cycles_aborted"]


def test_the_trigger_needs_the_shift_to_outrun_sampling_noise():
    assert watch_passes(BalancerConfig(window_size=1000)) == 250
    load = np.full((2, 8), 100.0)  # 2 layers, 8 slots on 2 ranks: 400 tokens per rank and layer
    assert sampling_noise(load, 2) == pytest.approx(math.sqrt(2 * math.log(2) / 400))
    assert sampling_noise(load, 2, load_copies=2) == pytest.approx(math.sqrt(2 * math.log(2) / 200))
    assert sampling_noise(np.zeros((2, 8)), 2) == math.inf


def test_config_refuses_a_spacing_the_schedule_overrides():
    with pytest.raises(ValidationError, match="trigger_min_spacing .* must not exceed step_interval"):
        BalancerConfig(window_size=10, step_interval=100, trigger_min_spacing=101)
    with pytest.raises(ValidationError, match="trigger_margin"):
        BalancerConfig(trigger_margin=1.5)
    assert BalancerConfig(window_size=10, step_interval=100).trigger_spacing == 10


@pytest.mark.parametrize("point", ["window_reset", "snapshot"])
def test_a_watch_window_failing_on_one_rank_keeps_the_schedule(point):
    """The second call of `point` in cycle 1's era is the load trigger's first watch window on
    rank 1: that rank posts no load for it, but posts its rounds at the same passes, so no round
    pairs wrongly, nothing stops, and the next cycle starts on schedule on every rank."""
    from vllm_eplb.harness.faults import Faults

    cfg = HarnessConfig(ranks=2, passes=600, tokens=128, zipf=1.5, check_every=10, redundant=4,
                        balancer={**SCHEDULE, "trigger_margin": 0.02}, faults=Faults(raise_at=(1, point, 1, "error", 2)))
    reports = run_scenarios([cfg], timeout_s=600)[0]
    assert_consistent(reports)
    for r in reports:
        assert r.stats["disabled_reason"] == "" and not r.stats["cycles_aborted"]
        assert r.stats["agreement"]["rounds"] == reports[0].stats["agreement"]["rounds"] > 4
    assert [p for p, _ in starts(reports[0])] == [360]  # unchanged traffic: no early cycle (the next is due at 760)
