"""Fault doubles: what can go wrong on one rank, injected into a real balancer.

Each fault names the rank it hits (or a tuple of ranks, hit alike) and when (a pass, or a
cycle), and is installed by wrapping the real component on that rank only (policy,
backend, planner, window, engine, maps, agreement) or by the driver (ticks, the runner's
pass count, a slow pass, a config that differs), so everything around it runs unchanged.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import torch

from vllm_eplb.core import Balancer
from vllm_eplb.core.policies import PlanInput, Policy
from vllm_eplb.core.transfer import DelegatingBackend, TransferBackend, TransferError, TransferHandle

# Where an exception can be raised, and the state or phase it hits.
RAISE_POINTS = {
    "window_reset": ("window", "reset"),  # idle -> collecting
    "snapshot": ("window", "snapshot_to_host"),  # collecting -> planning
    "load_copy": ("snapshot", "wait"),  # planning_reducing: the window's copy to host
    "plan_submit": ("planner", "submit"),  # planning_reducing
    "plan_result": ("planner", "result"),  # planning_waiting
    "step_start": ("engine", "start"),  # syncing -> transferring (first step), transferring (later ones)
    "step_finish": ("engine", "finish"),  # transferring: a step's data polled in
    "commit_prepare": ("engine", "prepare"),  # transferring: the commit's allocations
    "stage_maps": ("maps", "stage_layer"),  # transferring: the maps' allocations
    "tick_transferring": ("transferring", "tick"),  # a bug escaping the tick (nothing catches it)
}


def hits(spec, rank: int) -> bool:
    """Does a fault spec (its first item: a rank or a tuple of ranks) hit `rank`?"""
    if spec is None:
        return False
    who = spec[0] if isinstance(spec, tuple) else spec
    return rank in who if isinstance(who, (tuple, list)) else who == rank


@dataclass
class Faults:
    planner_error: tuple[int, int] | None = None  # (rank, call): the policy raises on that call on that rank
    transfer_error: tuple[int, int, int] | None = None  # (rank, cycle, step): that step fails on that rank
    slow_planner: tuple[int, float] | None = None  # (rank, seconds): the policy sleeps first
    slow_once: bool = False  # slow_planner sleeps in the first plan only (of this run)
    divergent_plan: int | None = None  # rank whose policy returns a different (valid) plan
    config_override: tuple[int, dict] | None = None  # (rank, BalancerConfig fields) differing on that rank
    setup_override: tuple[int, dict] | None = None  # (rank, HarnessConfig fields: redundant, backend, ...) differing there
    slow_transfer: tuple[int, int] | None = None  # (rank, polls): each step reports not done for that many polls
    # Faults timed by a phase: they fire once, after the first forward pass this rank
    # runs in that phase (e.g. "planning_waiting") during cycle 1.
    tick_offset: tuple[int, str, int] | None = None  # (rank, phase, k): k extra ticks then, or -k ticks missed from then
    kill_planner: tuple[int, str] | None = None  # (rank, phase): SIGKILL the planner process then
    metrics_error: tuple[int, str] | None = None  # (rank, phase): the metrics exporter raises then
    # (rank, RAISE_POINTS key, cycle, "error" | "oom", nth call[, calls in a row that raise, 1 by default])
    raise_at: tuple | None = None
    late_round: tuple[int, int, float] | None = None  # (rank, n, seconds): this rank posts its n-th round late
    # the runner's pass count misses that pass (a forward path that bypasses prepare_forward)
    uncounted_pass: tuple[int, str] | None = None  # (rank, phase)
    # ranks whose MoE layers never record load (a model class whose layers do not report to EPLB)
    unrecorded_load: tuple[int, ...] = ()
    slow_pass: tuple[int, str, float] | None = None  # (rank, phase, seconds): that pass takes this much longer
    # (rank, n): after the start-up check, this rank moves n layers per step (a bug the check
    # cannot see: its steps hold other layers than its peers')
    step_layers_after_start: tuple[int, int] | None = None
    # (ranks, phase, rewrite, k): new weights on those ranks after their (k+1)-th pass in that
    # phase of cycle 1, written into the slots of the placement in force (rewrite) or only announced;
    # k an int, or {rank: k} (ranks updating at different passes)
    weight_update: tuple | None = None
    # ranks whose driver does not tick the pass a weight update comes after (its tick late: an idle
    # data-parallel engine's); the update's timing is then read before the ticks, alike on every rank
    update_tick_missed: tuple[int, ...] = ()
    slow_step: tuple[int, int, float] | None = None  # (rank, cycle, seconds): that cycle's steps finish this late there
    # (rank, seconds): the pass that reads this rank's late round (late_round) pauses this long before its
    # tick: the pass whose tick rebuilds the agreement group
    rebuild_pause: tuple[int, float] | None = None
    hang_replacement: int | None = None  # rank whose next planner process (after the first) stops before its warm-up
    # (rank, phase, "own" | "peer"): between two passes, this rank's maps change with no protocol path:
    # "own": one of its slots takes another local slot's expert (weights and maps); "peer": its map of a
    # peer's slot names another expert (maps only)
    corrupt_maps: tuple[int, str, str] | None = None


class PhaseTrigger:
    """Fires once for (rank, phase) faults: the first pass this rank runs in `phase` in cycle 1."""

    def __init__(self, spec, rank: int):
        self.phase = spec[1] if hits(spec, rank) else None
        self.fired_at = None

    def fires(self, balancer: Balancer) -> bool:
        if self.phase is None or self.fired_at is not None:
            return False
        if balancer.phase == self.phase and balancer.stats.cycles_started <= 1:
            self.fired_at = balancer.pass_no
            return True
        return False


class WeightUpdateTrigger(PhaseTrigger):
    """Fires for weight_update faults on each of their ranks (every rank alike, or some only),
    after k passes in the phase: with k >= 1 in transferring, commit votes posted before the
    update name steps ready."""

    def __init__(self, spec, rank: int):
        super().__init__((rank, spec[1]) if spec is not None and rank in spec[0] else None, rank)
        k = spec[3] if spec is not None else 0
        self.rewrite, self.wait = (bool(spec[2]) if spec is not None else False), (k.get(rank, 0) if isinstance(k, dict) else k)

    def fires(self, balancer: Balancer) -> bool:
        if self.phase is None or self.fired_at is not None:
            return False
        if balancer.phase == self.phase and balancer.stats.cycles_started <= 1 and self.wait > 0:
            self.wait -= 1
            return False
        return super().fires(balancer)


class TickSchedule:
    """How many times the driver ticks after each pass (1 unless a tick offset hits this rank)."""

    def __init__(self, faults: Faults, rank: int):
        self.trigger = PhaseTrigger(faults.tick_offset, rank)
        self.k = faults.tick_offset[2] if self.trigger.phase else 0
        self.missing = 0

    def ticks(self, balancer: Balancer) -> int:
        if self.trigger.fires(balancer):
            if self.k >= 0:
                return 1 + self.k
            self.missing = -self.k
        if self.missing:
            self.missing -= 1
            return 0
        return 1


# ---------------------------------------------------------------- policies


class PolicyDouble(Policy):
    """A fault double around a real policy: its name, and its warm-up (min-move compiles
    there: without it the first plan would)."""

    def __init__(self, inner: Policy):
        self.inner, self.name = inner, inner.name

    def warm_up(self) -> None:
        self.inner.warm_up()


class FailingPolicy(PolicyDouble):
    def __init__(self, inner: Policy, fail_on_call: int):
        super().__init__(inner)
        self.fail_on_call, self.calls = fail_on_call, 0

    def place(self, inp: PlanInput):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise RuntimeError(f"injected planner failure (call {self.calls})")
        return self.inner.place(inp)


class SlowPolicy(PolicyDouble):
    """Sleeps before planning; with `marker`, only while that file does not exist yet (the
    policy travels pickled to a planner process, so a counter would not survive)."""

    def __init__(self, inner: Policy, seconds: float, marker: str | None = None):
        super().__init__(inner)
        self.seconds, self.marker = seconds, marker

    def place(self, inp: PlanInput):
        if self.marker is None or not os.path.exists(self.marker):
            if self.marker is not None:
                open(self.marker, "w").close()
            time.sleep(self.seconds)
        return self.inner.place(inp)


class DivergentPolicy(PolicyDouble):
    """Swaps the experts of the first two ranks' first slots: valid, balanced the same, different."""

    def place(self, inp: PlanInput):
        out = self.inner.place(inp).copy()
        s = inp.topo.slots_per_rank
        out[:, [0, s]] = out[:, [s, 0]]
        return out


def wrap_policy(policy: Policy, faults: Faults, rank: int) -> Policy:
    if hits(faults.planner_error, rank):
        policy = FailingPolicy(policy, faults.planner_error[1])
    if hits(faults.slow_planner, rank):
        marker = None
        if faults.slow_once:
            import tempfile

            marker = os.path.join(tempfile.mkdtemp(prefix="eplb-slow-"), "planned")
        policy = SlowPolicy(policy, faults.slow_planner[1], marker)
    if hits(faults.divergent_plan, rank):
        policy = DivergentPolicy(policy)
    return policy


# ---------------------------------------------------------------- transfer backends


class FailingHandle(TransferHandle):
    def __init__(self, inner: TransferHandle):
        self.inner = inner

    def done(self):
        return self.inner.done()

    def wait(self):
        self.inner.wait()  # complete the real sends/receives so peers are not left hanging
        raise TransferError("injected transfer failure")

    @property
    def staging_bytes(self):
        return self.inner.staging_bytes

    def release(self):
        self.inner.release()


class SlowHandle(TransferHandle):
    """Reports not done for the first `polls` polls, or for `seconds` after its start, as a
    copy slower than a pass would."""

    def __init__(self, inner: TransferHandle, polls: int = 0, seconds: float = 0.0):
        self.inner, self.polls, self.until = inner, polls, time.monotonic() + seconds

    def done(self):
        if self.polls > 0:
            self.polls -= 1
            return False
        return time.monotonic() >= self.until and self.inner.done()

    def wait(self):
        return self.inner.wait()

    @property
    def staging_bytes(self):
        return self.inner.staging_bytes

    def release(self):
        self.inner.release()


class WrappedBackend(DelegatingBackend):
    def __init__(self, inner: TransferBackend, wrap_handle):
        super().__init__(inner)
        self.wrap_handle = wrap_handle

    def start(self, jobs, rank):
        return self.wrap_handle(self.inner.start(jobs, rank))


class StepLog(WrappedBackend):
    """Records what every step this rank started carried: (cycle, layers, experts sent,
    experts received), so a verdict can tell what a faulted step held."""

    def __init__(self, inner: TransferBackend, balancer_ref: list):
        super().__init__(inner, lambda h: h)
        self.balancer_ref = balancer_ref
        self.steps: list[tuple[int, list[int], int, int]] = []

    def start(self, jobs, rank):
        parts = [j.plan.part(rank) for j in jobs]
        cycle = self.balancer_ref[0].stats.cycles_started if self.balancer_ref else 0
        self.steps.append((cycle, [j.plan.layer for j in jobs], sum(len(t.experts) for p in parts for t in p.sends),
                           sum(len(t.experts) for p in parts for t in p.recvs)))
        return self.inner.start(jobs, rank)


def wrap_backend(backend: TransferBackend, faults: Faults, rank: int, balancer_ref: list) -> TransferBackend:
    if hits(faults.transfer_error, rank):
        _, cycle, step = faults.transfer_error
        seen: dict[int, int] = {}

        def failing(handle):
            c = balancer_ref[0].stats.cycles_started
            seen[c] = seen.get(c, 0) + 1
            return FailingHandle(handle) if (c, seen[c]) == (cycle, step) else handle

        backend = WrappedBackend(backend, failing)
    if hits(faults.slow_transfer, rank):
        polls = faults.slow_transfer[1]
        backend = WrappedBackend(backend, lambda h: SlowHandle(h, polls))
    if hits(faults.slow_step, rank):
        _, cycle, seconds = faults.slow_step
        backend = WrappedBackend(
            backend, lambda h: SlowHandle(h, seconds=seconds) if balancer_ref[0].stats.cycles_started == cycle else h
        )
    return backend


# ---------------------------------------------------------------- the balancer's parts


def install(balancer: Balancer, faults: Faults, rank: int) -> None:
    """Wrap this rank's balancer components for the faults that hit it."""
    if hits(faults.raise_at, rank):
        _, point, cycle, kind, nth = faults.raise_at[:5]
        times = faults.raise_at[5] if len(faults.raise_at) > 5 else 1
        owner_name, method = RAISE_POINTS[point]
        fired, calls = [], [0]

        def wrap(original):
            def raising(*args, **kwargs):
                if len(fired) < times and balancer.stats.cycles_started == cycle:
                    calls[0] += 1
                if len(fired) < times and nth <= calls[0] < nth + times:
                    fired.append(balancer.pass_no)
                    if kind == "oom":
                        raise torch.OutOfMemoryError(f"injected out of memory in {point}")
                    raise RuntimeError(f"injected error in {point}")
                return original(*args, **kwargs)

            return raising

        if owner_name == "snapshot":  # a new object every window: wrap the one handed out
            take = balancer.window.snapshot_to_host

            def snapshot_to_host():
                snap = take()
                snap.wait = wrap(snap.wait)
                return snap

            balancer.window.snapshot_to_host = snapshot_to_host
        else:
            owners = {"maps": balancer.layout.maps}
            owner = owners[owner_name] if owner_name in owners else getattr(balancer, owner_name)
            setattr(owner, method, wrap(getattr(owner, method)))
    late: dict = {}
    if hits(faults.late_round, rank):
        _, n, seconds = faults.late_round
        _delay_round(balancer, n, seconds, late)
    if hits(faults.step_layers_after_start, rank):
        # a rank whose settings changed after the start-up check: the balancer's and its pipeline's
        balancer.config = balancer.pipeline.config = balancer.config.model_copy(
            update={"layers_per_pass": faults.step_layers_after_start[1]})
    if faults.hang_replacement == rank:
        _hang_next_planner(balancer, late)
    return late


def _hang_next_planner(balancer: Balancer, events: dict) -> None:
    """The planner process started next (a replacement) stops before its warm-up answers."""
    planner = balancer.planner
    start = planner._start

    def start_stopped():
        start()
        if "hung_planner" not in events:
            os.kill(planner.pid, signal.SIGSTOP)
            events["hung_planner"] = planner.pid

    planner._start = start_stopped


class _LateWork:
    """A collective posted from a timer thread `seconds` after it was due."""

    def __init__(self, post, seconds: float):
        self._work = None
        self._posted = threading.Event()

        def later():
            time.sleep(seconds)
            self._work = post()
            self._posted.set()

        threading.Thread(target=later, daemon=True).start()

    def is_completed(self) -> bool:
        return self._posted.is_set() and self._work.is_completed()

    def wait(self, timeout=None):
        t0 = time.monotonic()
        limit = timeout.total_seconds() if timeout is not None else None
        if not self._posted.wait(limit):
            raise TimeoutError("round not posted in time")
        if limit is None:
            return self._work.wait()
        return self._work.wait(timeout=timedelta(seconds=max(0.001, limit - (time.monotonic() - t0))))


def _delay_round(balancer: Balancer, n: int, seconds: float, late: dict) -> None:
    """This rank posts its n-th agreement round `seconds` late, from a thread, as a
    stuck gloo thread or a descheduled process would (`late["read_at"]`: the pass it is read)."""
    import torch.distributed as dist

    from vllm_eplb.core.agreement import Round

    agreement = balancer.agreement
    original = agreement.post
    count = [0]

    def post_late(values, pass_no, op=dist.ReduceOp.MIN, layout=None):
        count[0] += 1
        if count[0] != n:
            return original(values, pass_no, op, layout)
        tensor = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=torch.int64)
        group = agreement.group  # the group of the post, not one rebuilt since
        late["read_at"] = pass_no + agreement.lag
        work = _LateWork(lambda: dist.all_reduce(tensor, op=op, group=group, async_op=True), seconds)
        return Round(tensor, work, pass_no, pass_no + agreement.lag, agreement, layout)

    agreement.post = post_late


def corrupt_maps(balancer: Balancer, model, rank: int, kind: str) -> tuple[int, int, int]:
    """Change this rank's maps with no protocol path (a bug, memory written by someone else):
    (layer, slot, expert it names now). "own": a local slot whose expert has another copy takes
    another local slot's expert, weights and maps alike (its own rows stay true: the peers'
    view of it is what is wrong); "peer": its map of such a slot of a peer names another expert."""
    topo, layer = balancer.topo, balancer.layout.num_layers - 1  # the last layer: moved last in a cycle
    row = balancer.placement[layer].copy()
    n = topo.slots_per_rank
    mine = list(topo.rank_slots(rank))
    slots = mine if kind == "own" else [s for s in range(topo.num_physical) if s not in mine]
    # a slot whose expert keeps a copy elsewhere (the maps stay valid: a heal must fetch it back),
    # not its rank's first slot; none (every expert of these slots unique): two local slots swap
    slot = next((s for s in reversed(slots) if (row == row[s]).sum() > 1 and s % n), None)
    swap = slot is None
    slot = slots[-1] if swap else slot
    source = slot - slot % n  # the first slot of the same rank
    if kind == "own":
        for w in model.weights_of(layer):
            a, b = w[slot - rank * n].clone(), w[source - rank * n].clone()
            w[slot - rank * n].copy_(b)
            if swap:
                w[source - rank * n].copy_(a)
    row[slot], row[source] = (row[source], row[slot]) if swap else (row[source], row[source])
    balancer.layout.maps.write_layer(layer, row, topo)
    return layer, slot, int(row[slot])


def kill_planner(balancer: Balancer) -> int:
    pid = balancer.planner.pid
    os.kill(pid, signal.SIGKILL)
    return pid
