"""Background planner: runs a placement policy off the forward loop.

The forward loop submits a job and then only polls `result()`; it never waits on
the planner (invariant 3). When the job ends, its outcome is rank-local news: the
state machine publishes it through an agreement round before acting on it
(invariant 1).

Two places to plan:
- "process" (default): a child process started once (planner_process.py), so
  planning never holds the serving process's GIL; vLLM's scheduler and the forward
  loop are Python and would otherwise lose time to a Python-heavy policy, and a
  starved planner thread would take far longer (benchmarks/policies.py measures both).
- "thread": a thread of the serving process; no extra process, but the policy's
  Python code competes for the GIL.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from .cost_model import CostModel
from .placement import Topology, moved_slots, placement_digest, predicted_balancedness, validate_placement
from .planner_process import ChildProcessExecutor
from .policies import PlanInput, Policy

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    placement: np.ndarray  # (layers, physical)
    current_balancedness: float  # predicted for the placement in force, on the same load
    predicted_balancedness: float
    moved_slots: int
    plan_seconds: float
    digest: tuple[int, int]
    # the cost model's predicted straggler time per pass (sum over layers of the slowest rank's
    # expert seconds) for the placement in force and for the plan; 0 without a cost model
    current_seconds: float = 0.0
    predicted_seconds: float = 0.0
    plan_cpu_seconds: float = 0.0  # the planning process's CPU time for it (plan_seconds is wall time)

    @property
    def improvement(self) -> float:
        """Relative gain: predicted / current - 1."""
        if self.current_balancedness <= 0:
            return 0.0
        return self.predicted_balancedness / self.current_balancedness - 1.0


def make_plan(
    policy: Policy, logical_load: np.ndarray, current: np.ndarray, topo: Topology, passes: float = 0.0,
    cost: CostModel | None = None,
) -> Plan:
    """The policy's plan and what it predicts. `passes`: the forward passes logical_load was
    summed over (0: unknown); with a cost model, the predicted straggler times too."""
    t0, c0 = time.perf_counter(), time.process_time()
    new = np.ascontiguousarray(policy.place(PlanInput(logical_load, current, topo, passes)), dtype=np.int64)
    validate_placement(new, topo)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    seconds = (0.0, 0.0)
    if cost is not None and passes > 0:
        seconds = tuple(cost.straggler_seconds(p, logical_load, passes, topo.num_ranks) for p in (current, new))
    return Plan(
        placement=new,
        current_balancedness=predicted_balancedness(current, logical_load, topo),
        predicted_balancedness=predicted_balancedness(new, logical_load, topo),
        moved_slots=moved_slots(current, new),
        plan_seconds=elapsed,
        digest=placement_digest(new),
        current_seconds=seconds[0],
        predicted_seconds=seconds[1],
        plan_cpu_seconds=cpu,
    )


def _warm_up(policy: Policy, cost: CostModel | None) -> None:
    """Runs once in a new planner process, before it counts as ready: numpy and the
    policies are imported there, and so is whatever the policy's own module imports (the
    policy and the cost model arrive pickled, as every job carries them), so a plugin's
    imports are not paid inside the first plan's planning_timeout_s; and the policy's own
    warm-up (min-move compiles its loops)."""
    from . import policies  # noqa: F401

    policy.warm_up()


# The start-up a planner process gets before its time counts against planning_timeout_s: twice
# what the first process took here (importing numpy and the policies, the policy's warm-up),
# at least MIN_STARTUP_S; STARTUP_S while no process has answered yet (a first start on a
# machine compiles min-move's loops: about 10 CPU-seconds; a plan is cancelled only past this and
# planning_timeout_s, 60 s by default).
MIN_STARTUP_S, STARTUP_S = 1.0, 30.0


class PlannerDead(RuntimeError):
    """The planner process died more often than `max_restarts` allows."""


class Planner:
    """One worker (thread or process); at most one plan in flight.

    A planner process that died (killed, crashed) is started again at the next
    submit, up to `max_restarts` times; past that `submit` raises PlannerDead. A plan
    that timed out is cancelled: the process computing it is stopped and a fresh one
    started, so a stuck policy cannot hold every later cycle behind it."""

    def __init__(
        self, policy: Policy, topo: Topology, mode: str = "process", max_restarts: int = 3, cost: CostModel | None = None
    ):
        self.policy = policy
        self.topo = topo
        self.cost = cost
        self.mode = mode
        self.max_restarts = max_restarts
        self.restarts = 0  # after an unexpected death
        self.cancels = 0  # after a timeout
        self.startup_s: float | None = None  # the first process's start-up (spawn to warm-up answered)
        if mode not in ("process", "thread"):
            raise ValueError(f"planner mode {mode!r}: use 'process' or 'thread'")
        self._start()
        self._job: Future | None = None
        self.submitted_at = 0.0

    def _start(self) -> None:
        if self.mode == "process":
            self._pool = ChildProcessExecutor()
        else:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="eplb-planner")
        spawned = self._spawned_at = time.monotonic()
        self.ready = self._pool.submit(_warm_up, self.policy, self.cost)  # now, not when the first window ends
        self._ready_at = float("inf")

        def warm(_):
            self._ready_at = time.monotonic()
            if self.startup_s is None:
                self.startup_s = self._ready_at - spawned

        self.ready.add_done_callback(warm)

    def ensure_alive(self) -> None:
        """Start a planner process again if it died (counted as a restart), so it is warm
        when the next plan is due. Raises PlannerDead past max_restarts."""
        if self.alive():
            return
        if self.restarts >= self.max_restarts:
            raise PlannerDead(f"the planner process died {self.restarts + 1} times")
        self.restarts += 1
        log.warning("EPLB planner process %s exited; starting another (%d of %d)", self.pid, self.restarts, self.max_restarts)
        self._start()

    def revive(self) -> bool:
        """At a resume vote after `planner_dead`: a fresh restart budget and a live process."""
        self.restarts = 0
        if not self.alive():
            log.warning("EPLB planner: a new process after a suspension (planner_dead)")
            self._start()  # not a restart: the budget begins afresh after it
        return self.alive()

    @property
    def pid(self) -> int | None:
        return self._pool.pid if self.mode == "process" else None

    def alive(self) -> bool:
        return self.mode != "process" or self._pool.alive

    def submit(self, logical_load: np.ndarray, current: np.ndarray, passes: float = 0.0) -> None:
        """Queue a plan for load summed over `passes` forward passes; never blocks the caller."""
        if self._job is not None and not self._job.done():
            raise RuntimeError("a plan is already in flight")
        self.ensure_alive()
        self.submitted_at = time.monotonic()
        self._job = self._pool.submit(make_plan, self.policy, logical_load, current.copy(), self.topo, passes, self.cost)

    def done(self) -> bool:
        return self._job is not None and self._job.done()

    def result(self) -> Plan:
        """The finished plan; re-raises the policy's exception. Only call when done()."""
        assert self._job is not None and self._job.done()
        return self._job.result()

    def seconds_running(self) -> float:
        """Time the current plan has had a running planner. A process still starting (no answer
        to its warm-up yet) is timed from its spawn, less the start-up a process takes here
        (twice the first one's): one that hangs before its warm-up answers times out like a
        slow plan, one that starts normally costs the plan nothing."""
        now = time.monotonic()
        if self._ready_at != float("inf"):
            return max(0.0, now - max(self.submitted_at, self._ready_at))
        first = self.startup_s
        allowance = STARTUP_S if first is None else max(MIN_STARTUP_S, 2 * first)
        return max(0.0, now - max(self.submitted_at, self._spawned_at) - allowance)

    def discard(self) -> None:
        """Forget the current job (a stale plan is never applied). A still-running job
        finishes in the background and its result is dropped."""
        self._job = None

    def cancel(self) -> None:
        """Drop a job that ran past its time: stop the process computing it and start a
        fresh one (a thread cannot be stopped; its result is dropped)."""
        if self._job is not None and not self._job.done() and self.mode == "process":
            self.cancels += 1
            self._pool.shutdown(wait=False)
            self._start()
        self._job = None

    def shutdown(self) -> None:
        """Stop at once: a plan still running is of no use any more."""
        self._pool.shutdown(wait=False, cancel_futures=True)
