"""The metrics relay (integration/metrics_relay.py): every rank's figures reach EP rank 0,
on real gloo ranks; never a wait; one relayed rank's series written through the same metric
families as a local rank's. (The colocated two-host `vllm serve` run, the front end's /metrics
showing the headless host's rank, is tests/test_e2e_hosts.py.)"""

from __future__ import annotations

import datetime
import time

import torch.distributed as dist

from vllm_eplb.harness.launcher import launch
from vllm_eplb.integration import metrics_relay as mr


def _relay_rank(rank: int, world: int) -> dict:
    """Rank 1 skips ticks (jumps of up to 40 passes) where rank 0 ticks every pass: both
    post the same gathers in the same order; rank 0 sees rank 1's passes rise."""
    group = dist.new_group(list(range(world)), backend="gloo")
    seen: list = []
    now = {"pass": 0}
    relay = mr.MetricsRelay(rank, world, group, lambda: {"pass": now["pass"], "rank": rank},
                            lambda r, snap: seen.append((r, snap["pass"])))
    skipped = set(range(60, 100)) | set(range(201, 240))  # rank 1's ticks missed there
    for p in range(1, 401):
        dist.barrier()  # the ranks' passes run in step, as the MoE layers' collectives pair them
        now["pass"] = p
        if rank == 0 or p not in skipped:
            relay.step(p)
    deadline = time.monotonic() + 10  # the last gathers finish; then read them
    while relay._pending and time.monotonic() < deadline:
        relay.step(p)
        time.sleep(0.01)
    dist.barrier()
    return {"posted": relay._posted, "seen": seen, "stopped": relay.stopped}


def test_rank0_reads_every_rank_and_ranks_post_alike_whatever_their_ticks():
    r0, r1 = launch(_relay_rank, 2, timeout_s=120)
    assert r0["posted"] == r1["posted"] == 400 // mr.EVERY
    assert not r0["stopped"] and not r1["stopped"]
    assert r1["seen"] == []  # only rank 0 writes
    passes = [p for r, p in r0["seen"] if r == 1]
    assert len(passes) == r0["posted"] and passes == sorted(passes) and passes[-1] == 400, passes


def _peer_gone_rank(rank: int, world: int) -> dict:
    """Rank 1 stops serving after 50 passes and leaves; rank 0 goes on passing: its gathers
    fail once the group's timeout (2 s here) ends them, and it stops relaying; no step waits."""
    group = dist.new_group(list(range(world)), backend="gloo", timeout=datetime.timedelta(seconds=2))
    relay = mr.MetricsRelay(rank, world, group, lambda: {"rank": rank}, lambda r, snap: None)
    slowest, p = 0.0, 0
    deadline = time.monotonic() + (0 if rank else 20)
    while p < 50 or (time.monotonic() < deadline and not relay.stopped):
        p += 1
        t = time.perf_counter()
        relay.step(p)
        slowest = max(slowest, time.perf_counter() - t)
        time.sleep(0.001 if rank else 0.01)
    return {"stopped": relay.stopped, "slowest_step_s": slowest, "passes": p}


def test_a_rank_that_stops_serving_stops_the_relay_without_a_wait():
    r0, _ = launch(_peer_gone_rank, 2, timeout_s=120)
    assert r0["stopped"], r0  # a failed gather (the peer's timeout), not a hang
    assert r0["slowest_step_s"] < 0.5, r0


def test_a_snapshot_of_real_stats_fits_with_its_histories_cut():
    from vllm_eplb.core.stats import BalancerStats, TransitionRecord

    stats = BalancerStats()
    for p in range(100_000):
        stats.history.append(TransitionRecord(p, "t", "idle", "collecting", -1))
    stats.plan_seconds.extend([0.01] * 500)
    t = time.perf_counter()
    cut = mr._cut_histories(stats)
    assert time.perf_counter() - t < 0.01  # O(KEEP), not O(history)
    assert len(stats.history) == 100_000 and [r.pass_no for r in cut.history] == list(range(100_000 - mr.KEEP, 100_000))
    snap = {"stats": cut, "disabled_reason": "x" * 10_000}
    back = mr.unpack(mr.pack(snap))
    assert back["stats"].history[-1].pass_no == 99_999 and len(back["disabled_reason"]) == 10_000
    huge = {"stats": mr._cut_histories(stats), "disabled_reason": "y" * 40_000}
    back = mr.unpack(mr.pack(huge))  # too large: free text cut to fit
    assert len(back["disabled_reason"]) == 200


def test_rank0_writes_a_relayed_rank_through_the_same_families(tmp_path, monkeypatch):
    from vllm_eplb.core.stats import BalancerStats
    from vllm_eplb.integration import metrics

    # values live in files where an earlier test in this process switched to multiprocess mode
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))

    stats = BalancerStats(cycles_completed=3, layers_committed=12, balancedness_observed=0.93)
    snap = dict(
        identity=("another-host", "/tmp/elsewhere"), stats=stats, pass_no=480, transitions_total=15, state="idle",
        layer=-1, num_layers=4, enabled=True, disabled_reason="", wait=0.25, step_interval=64,
        stall_warning_windows=3, step_ns=10**6, verifier=(96, 0),
    )
    relayed = metrics.RelayedRanks()
    relayed.apply(5, snap)
    m = metrics._families

    def value(family, *labels):
        return family.labels(*labels)._value.get()

    assert value(m.RELAYED, "5") == 480
    assert value(m.CYCLES, "5", "completed", "") == 3
    assert value(m.LAYERS, "5") == 12
    assert value(m.BALANCEDNESS, "5", "observed") == 0.93
    assert value(m.SLOT_CHECKS, "5", "ok") == 96
    assert value(m.STATE, "5", "idle") == 1
    snap["stats"] = BalancerStats(cycles_completed=4, layers_committed=16)
    relayed.apply(5, snap)  # counters rise by what is new, as for a local rank
    assert value(m.CYCLES, "5", "completed", "") == 4 and value(m.LAYERS, "5") == 16
    # a rank whose series reach this /metrics on their own is not written twice
    here = dict(snap, identity=mr.identity(), pass_no=999)
    relayed.apply(6, here)
    assert value(m.RELAYED, "6") == 0 and value(m.LAYERS, "6") == 0
