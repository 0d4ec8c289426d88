"""A cycle's start and end on this rank: the idle and collecting phases, and the bookkeeping
of every way back to idle.

Idle: a cycle starts when the schedule says (every step_interval passes) or earlier when the
load trigger's vote says the traffic shifted (core/load_trigger.py: its watch rounds run while
idle). Collecting: the window records one pass per pass; when full it closes and its load is
copied to host for the load round (core/plan_rounds.py). The end, however it came (the table's
`on_enter` callback of idle): the ended cycle's commit votes still in flight are kept for their
maps digest (core/heal.py), a decided cycle (finish, skip) leaves the load trigger its promise
and clears the back-off (core/suspension.py), and the next cycle is scheduled. Before a decided
end (the table's `before` callback of finish and skip) rank 0 records the placement in force
(core/records.py), off the forward loop.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from .agreement import AgreementError, Round
from .faults import Fault
from .load_window import HostSnapshot
from .planner import Plan, PlannerDead
from .records import PlacementRecord, save

log = logging.getLogger("vllm.eplb")


@dataclass
class Cycle:
    """Everything one cycle knows until its transfers start (the pipeline holds those);
    created when it starts, dropped when it ends."""

    number: int
    started_at: int
    window_end: int = -1
    snapshot: HostSnapshot | None = None
    round: Round | None = None  # the round in flight
    post_at: int = 0  # the phase's next round is posted at or after this pass
    plan: Plan | None = None
    window_load: np.ndarray | None = None
    weights_changed: bool = False  # a weight update came: nothing of this cycle commits any more
    carried: Any = None  # a load-triggered cycle's watch windows, part of its load (load_trigger.Carried)


class Cycles:
    """The balancer's cycles: `b.cycle` is the one in flight (None while idle); `next_at`
    the pass the next one starts at, by the schedule."""

    def __init__(self, b):
        self.b = b
        # The first window ends at step_interval, as upstream's first rearrangement does.
        self.next_at = max(1, b.config.step_interval - b.config.window_size)
        self.count = 0
        self.recorder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="eplb-record")

    def tick_idle(self, p: int) -> None:
        b = self.b
        load = p < self.next_at and b.trigger.due(p, b.placement, self.next_at)
        if load or p >= self.next_at:
            b.trigger.disarm()
            try:
                b.agreement.wait_rebuilt()  # after a failed round: the new group, before any round
            except AgreementError as exc:
                # a rank that cannot vote: this cycle's first round fails on every rank at its
                # read, and the rebuild is retried there
                log.warning("EPLB rank %d pass %d: %s", b.comm.rank, p, exc)
            b.stats.cycles_started += 1
            self.count += 1
            b.cycle = Cycle(self.count, p, carried=b.trigger.take_carried() if load else None)
            b.faults.clear()
            b.start_collecting(reason="load trigger" if load else "")
            # a load-triggered cycle collects fewer passes: the watch windows it carries make up the rest
            b.window.expect(b.config.window_size - b.cycle.carried.passes if b.cycle.carried else None)
            try:
                b.window.reset()  # load recorded while idle is not part of the window
            except Exception as exc:
                b.faults.report(Fault.INTERNAL_ERROR, exc)
            try:
                restarts = b.planner.restarts
                b.planner.ensure_alive()  # a planner that died since: warm again by the window's end
                b.stats.planner_restarts += b.planner.restarts - restarts
            except PlannerDead as exc:
                b.faults.report(Fault.PLANNER_DEAD, exc)

    def tick_collecting(self, p: int) -> None:
        b = self.b
        c = b.cycle
        b.window.record_pass()
        if not b.window.full:
            return
        c.window_end = p
        c.post_at = p + 1  # one pass later the device->host copy is long done
        b.window_full()
        c.snapshot = b.window.snapshot_to_host()

    def ended(self, event) -> None:
        """Every way back to idle: keep what may still be in flight, reset, schedule the next
        cycle."""
        b = self.b
        c = b.cycle
        if c is None:
            return
        b.healing.draining += b.pipeline.votes  # paired on every rank: read when due, for their maps digest
        b.pipeline.end()
        b.planner.discard()
        # a decided cycle leaves a promise the load trigger holds the load to (core/load_trigger.py)
        promise = {"finish": "predicted_balancedness", "skip": "current_balancedness"}.get(event.event.name)
        if promise:  # a decided cycle: the transient troubles behind any back-off are over
            b.suspension.decided()
        if promise and c.plan is not None:
            b.trigger.arm(getattr(c.plan, promise), c.started_at, b.pass_no)
        else:
            b.trigger.disarm()
        b.cycle = None
        self.next_at = max(c.started_at + b.config.step_interval, b.pass_no + 1)

    def record(self, event) -> None:
        """Before a decided end (finish, skip): rank 0 writes the placement in force and its
        window's load, off the forward loop."""
        b = self.b
        path = b.config.record_placement_path
        if not path or b.comm.rank != 0:
            return
        rec = PlacementRecord(
            b.placement.copy(), b.cycle.window_load, b.topo.num_ranks, b.topo.num_logical,
            b.planner.policy.name, b.pass_no,
        )
        self.recorder.submit(save, rec, path)
