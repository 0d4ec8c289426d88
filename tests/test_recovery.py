"""Recovery (docs/architecture.md, fault model): maps that differ are healed to one placement,
transient causes suspend and resume by vote, a rebuild waits for a paused rank, a planner
timed from its spawn, the config's timeout order. The matrix rows (vllm_eplb/harness/matrix.py)
run each scenario end to end; these are the parts, and one suspend-resume cycle that the
matrix's short rows stop before."""

from __future__ import annotations

import time

import numpy as np
import pydantic
import pytest
import torch
import torch.distributed as dist

from vllm_eplb.core import BalancerConfig
from vllm_eplb.core.agreement import Agreement, AgreementError
from vllm_eplb.core.heal import composite, heal_target
from vllm_eplb.core.placement import Topology, maps_digest
from vllm_eplb.core.planner import MIN_STARTUP_S, Planner
from vllm_eplb.core.policies import get_policy
from vllm_eplb.harness.launcher import launch
from vllm_eplb.harness.runner import Faults, HarnessConfig, run_harness

TOPO = Topology(2, 4, 6)  # 3 slots per rank


def test_composite_takes_each_ranks_own_slots():
    a = np.array([[0, 1, 2, 3, 0, 1]])
    b = np.array([[9, 9, 9, 3, 2, 1]])  # rank 1's view: its own slots 3..5 hold 3, 2, 1
    assert composite([a, b], TOPO).tolist() == [[0, 1, 2, 3, 2, 1]]


def test_heal_target_is_the_agreed_placement_when_every_expert_is_held():
    agreed = np.array([[0, 1, 2, 3, 0, 1]])
    held = np.array([[0, 1, 2, 3, 2, 1]])  # slot 4 took expert 2 on one rank only
    maps, weights, lost = heal_target(agreed, held, [agreed, held], TOPO)
    assert maps.tolist() == weights.tolist() == agreed.tolist() and lost == []


def test_heal_target_takes_a_whole_rank_view_when_the_agreed_one_lost_an_expert():
    agreed = np.array([[0, 1, 2, 3, 0, 1]])
    new = np.array([[2, 1, 0, 3, 0, 1]])  # a commit made on rank 0 only: its slot 0 overwrote...
    held = composite([new, agreed], TOPO)  # ...nothing lost: expert 0 is still in slot 4
    maps, weights, lost = heal_target(agreed, held, [new, agreed], TOPO)
    assert maps.tolist() == agreed.tolist() and lost == []  # 0 fetched back from slot 4
    agreed = np.array([[0, 1, 2, 3, 1, 1]])
    new = np.array([[3, 1, 2, 0, 1, 1]])  # expert 0 moves to rank 1, 3 to rank 0; only rank 0 committed
    held = composite([new, agreed], TOPO)  # [3, 1, 2, 3, 1, 1]: expert 0 held nowhere
    maps, weights, lost = heal_target(agreed, held, [new, agreed], TOPO)
    assert lost == [(0, 0)]  # no row is whole: 0 is mapped at its agreed slot, its weights lost
    assert maps.tolist() == [[0, 1, 2, 3, 1, 1]] and weights.tolist() == [[3, 1, 2, 3, 1, 1]]


def test_maps_digest_tells_placements_apart_and_fits_an_int64_vote():
    a, b = np.array([[0, 1, 2, 3, 0, 1]]), np.array([[0, 1, 2, 3, 1, 0]])
    assert maps_digest(a) == maps_digest(a.copy()) != maps_digest(b)
    assert 0 <= maps_digest(a) < 2**62


def test_config_refuses_an_agreement_timeout_not_below_the_transfer_timeout():
    BalancerConfig(agreement_timeout_s=59, transfer_timeout_s=60)
    with pytest.raises(pydantic.ValidationError, match=r"agreement_timeout_s \(60\) must be less than transfer_timeout_s \(60\)"):
        BalancerConfig(agreement_timeout_s=60, transfer_timeout_s=60)


def test_a_planner_that_never_answers_its_warm_up_is_timed_from_its_spawn():
    planner = Planner(get_policy("greedy"), TOPO, "thread")
    try:
        planner.ready.result()
        planner.startup_s = 0.1  # the first start-up: the allowance is max(MIN_STARTUP_S, 0.2)
        planner._ready_at, planner._spawned_at = float("inf"), time.monotonic() - 5.0  # spawned 5 s ago, no answer
        planner.submitted_at = time.monotonic() - 5.0
        assert planner.seconds_running() == pytest.approx(5.0 - MIN_STARTUP_S, abs=0.2)
        planner._ready_at = time.monotonic() - 1.0  # it answered 1 s ago: timed from then
        assert planner.seconds_running() == pytest.approx(1.0, abs=0.2)
    finally:
        planner.shutdown()


def _rebuild_after_a_pause(rank: int, world: int) -> list:
    group = dist.new_group(list(range(world)), backend="gloo", timeout=__import__("datetime").timedelta(seconds=1))
    agreement = Agreement(group, world, lag=1, timeout_s=1.0)
    agreement.mute("stopped voting")
    muted = agreement.post([1], 0).result if rank == 1 else None
    failed = False
    if muted is not None:
        try:
            muted()
        except AgreementError:
            failed = True
    t0 = time.monotonic()
    if rank == 1:
        time.sleep(2.5)  # a pause on the rebuild pass, longer than the 1 s round timeout
    agreement.rebuild()
    time.sleep(max(0.0, 3.0 - (time.monotonic() - t0)))
    agreement.wait_rebuilt()
    out = agreement.post([rank + 1], 1, op=dist.ReduceOp.SUM).result()
    return [failed, int(out[0]), agreement.muted]


def test_a_rebuild_waits_for_a_rank_paused_past_the_round_timeout():
    """Rank 1 starts its rebuild 2.5 s after rank 0 (round timeout 1 s): the group is built on
    both and carries a round; a muted rank's round fails at its read without waiting."""
    r0, r1 = launch(_rebuild_after_a_pause, 2, (), timeout_s=120)
    assert r1[0] is True
    assert r0[1:] == r1[1:] == [3, ""]


def test_suspended_by_a_dead_planner_then_resumed_by_vote():
    """planner_max_restarts 0 and the planner killed mid-plan: every rank suspends at the same
    pass (planner_dead), votes to resume after the back-off (step_interval passes), revives its
    planner, and a later cycle completes; maps agree on every pass."""
    cfg = HarnessConfig(
        # passes of 20 ms: the revived planner process starts (seconds on a loaded box) while they run
        ranks=2, passes=400, redundant=2, zipf=1.5, pass_sleep_s=0.02,
        balancer=dict(window_size=20, step_interval=60, agreement_lag=2, planning_timeout_s=20.0, planner_max_restarts=0),
        faults=Faults(kill_planner=(1, "planning_waiting"), slow_planner=(1, 1.0), slow_once=True),
    )
    reports = run_harness(cfg, timeout_s=300)
    histories = [[(h.pass_no, h.trigger, h.reason) for h in r.history] for r in reports]
    assert histories[0] == histories[1]
    triggers = [t for _, t, _ in histories[0]]
    assert "suspend" in triggers and "resume" in triggers and triggers.index("resume") > triggers.index("suspend")
    for r in reports:
        assert r.map_disagreements == [] and r.slot_mismatches == [] and r.output_mismatches == []
        assert dict(r.stats["suspensions"]) == {"planner_dead": 1} and r.stats["reenabled"] == 1
        assert r.stats["cycles_completed"] >= 1 and not r.stats["disabled_reason"]
