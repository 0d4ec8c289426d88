"""The balancer: what each state and phase does on a pass.

`tick()` is called once after every forward pass. It does a few microseconds of
work in idle and collecting, and in the other states only polls: the planner
runs in its own process, agreement rounds and transfers are non-blocking
collectives read a fixed number of passes after they were posted. The forward
loop waits only when such a result is read and is not there yet; every such wait
is timed and bounded by `agreement_timeout_s`.

The pass clock (core/pass_clock.py). Transitions are scheduled by pass number, so
the number must be the same on every rank at the same forward pass. The balancer
processes every pass up to its `PassClock`: a tick with no new pass is ignored, and a
pass whose tick was missed is processed by `catch_up()`, which the driver calls before
each forward pass (the driver's contract: `catch_up()`, the runner's count advanced as
the pass starts, the pass, `tick()`). So a commit decided at pass p is in force before
pass p + 1 on every rank, whatever the driver's ticks did; anomalies are counted and
reported in the next vote (`skew`), so every rank logs them at the same round. The
clock's two counts (the runner's and the MoE layers') ride in every vote too: a rank
whose count drifted stops rebalancing on every rank at that round (`clock_mismatch`).

One protocol (core/protocol.py): at start-up the ranks compare every field that shapes
the protocol (config keys, topology, backend, clock, vote layouts, placement); on any
difference none balances (`config_mismatch`).

Faults. A failure on one rank (planner, transfer, allocation, a bug) never makes it
stop posting rounds: it becomes the `fault` field of its next vote, and every rank
ends the cycle when it reads that round, at the same pass, with the same reason
(the worst code, and the rank it came from). A round that fails (a rank lagged past
agreement_timeout_s) fails on every rank: the cycle ends where it is read and the
agreement group is rebuilt for the next cycle. Rounds that show the ranks disagree
about the protocol itself (pass, clock, step, weight-update count) stop rebalancing
on every rank.

Weight updates. A server that gets new weights (an RL trainer's push, a reload) has
them written between two forward passes, on every rank of the expert-parallel group
between the same two (one engine's workers take every call in one order; several
engines must pause generation around the update). `weights_changed()` says so. A
cycle in flight when it comes ends: from then on it commits nothing, since what its
steps staged was read before the update, and its next vote carries WEIGHT_UPDATE, so
it ends on every rank at the same pass; the next cycle moves the new weights. Every
vote carries the count of updates each rank applied: counts that differ mean ranks
applied an update at different passes (a step may have been committed on some ranks
only), and rebalancing stops on every rank.

Pass timeline of one cycle (L = agreement lag, W = window, all relative):
  c            idle -> collecting                    window opened
  c+W          -> planning_reducing                  window closed, copy to host started
  c+W+1        load all-reduce posted (SUM, with every rank's fault code)
  c+W+1+L      read: -> planning_waiting, plan submitted; readiness vote posted
  every L      read readiness: every rank has a plan -> syncing, digest vote posted
  s+L          read digest: -> transferring (first step started) | skip | abort
  every pass   transferring: start a step while fewer than L + 1 are in flight; poll every
               step in flight (data in -> commit prepared); post one commit vote naming
               the steps this rank has ready; read the vote posted L passes ago: commit
               every step all ranks voted ready (next_layer / finish) | abort
"""

from __future__ import annotations

import enum
import hashlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from .agreement import FAULT_RANKS, VOTE_WIDTH, Agreement, AgreementError, Round, VoteLayout
from .config import BalancerConfig
from .load_window import HostSnapshot, LoadWindow
from .placement import (
    RoutingMaps,
    StagedLayer,
    Topology,
    balancedness_of,
    observed_rank_loads,
    physical_to_logical_load,
    predicted_balancedness,
)
from .pass_balance import pass_figures
from .pass_clock import PassClock
from .planner import Plan, Planner, PlannerDead
from .planner_process import PlannerExited
from .policies import Policy, get_policy
from .protocol import differences, exchange, protocol_fields, short_digest
from .records import PlacementRecord, save
from .state_machine import attach_machine, top_state
from .stats import BalancerStats, TransitionRecord
from .transfer import InFlightStep, TransferBackend, TransferEngine, TransferError, plan_layer
from .transfer.backend import DeferredBackend, NoBackend, padded

# A child of vLLM's logger: inside vLLM the lines go through its handlers and format.
log = logging.getLogger("vllm.eplb")


class Fault(enum.IntEnum):
    """Local failures, in the order a vote reduces them (the largest wins). The last
    ones end rebalancing on every rank; the others end the cycle only."""

    NONE = 0
    METRICS_ERROR = 1
    INTERNAL_ERROR = 2
    PLANNER_ERROR = 3
    PLANNER_DIED = 4
    PLANNING_TIMEOUT = 5
    TRANSFER_ERROR = 6
    OUT_OF_MEMORY = 7
    WEIGHT_UPDATE = 8  # new weights written: what the cycle staged is stale
    PLANNER_DEAD = 20  # died more often than planner_max_restarts
    TRANSFER_GROUP_BROKEN = 21  # a step's messages were left pending on the transfer group

    @property
    def reason(self) -> str:
        return self.name.lower()

    @property
    def disables(self) -> bool:
        return self >= Fault.PLANNER_DEAD


READINESS = VoteLayout("readiness", ("ready", "all"), ("expired", "any"))
DIGEST = VoteLayout("digest", ("digest_a", "equal"), ("digest_b", "equal"), ("worth", "all"))
MAX_IN_FLIGHT = 6  # steps a commit vote can name (its layout's width)
# `layers`: a digest of the layers of every step it names, so a step is never committed as
# different layers on different ranks
COMMIT = VoteLayout(
    "commit", ("first_seq", "equal"), ("layers", "equal"), *((f"ready{i}", "all") for i in range(MAX_IN_FLIGHT))
)
LOAD_TAIL = 3  # per rank, after the load round's load: fault, pass number, clock offset
# What the ranks' rounds mean: equal on every rank (compared at start-up) or no round pairs.
PROTOCOL = short_digest(repr((VOTE_WIDTH, FAULT_RANKS, [(f.name, f.value) for f in Fault],
                              [(v.name, v.fields) for v in (READINESS, DIGEST, COMMIT)])).encode())


@dataclass
class MoELayout:
    """What the balancer needs from the model."""

    topo: Topology
    num_layers: int
    pass_load: torch.Tensor  # (layers, physical) int32/int64: the router adds tokens per slot into it
    maps: RoutingMaps  # updated in place at commit
    weights_of: Callable[[int], list[torch.Tensor]]  # layer -> this rank's expert tensors (local slots, ...)
    record_flag: torch.Tensor | None = None  # bool scalar the router checks before recording load
    max_pass_tokens: int = 0  # most tokens one pass can route (0: unknown), for the overflow check


@dataclass
class Comm:
    rank: int  # rank inside the expert-parallel group
    world_size: int
    agreement_group: Any  # gloo group (None when world_size == 1)
    backend: TransferBackend | DeferredBackend  # deferred: built once the start-up check passed


class ProtocolMismatch(RuntimeError):
    """A round every rank read shows the ranks disagree about the protocol itself: posted at
    different passes (`pass_mismatch`), pass clocks that drifted apart (`clock_mismatch`),
    a step holding different layers (`step_mismatch`), weight updates applied at different
    passes (`weight_update_skew`). Read alike everywhere: every rank
    stops rebalancing at that round."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def layers_digest(steps: list["Step"]) -> int:
    """The steps' sequence numbers and layers, as one int64 every rank computes alike."""
    text = repr([(s.seq, s.layers) for s in steps]).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 2


@dataclass
class Cycle:
    """Everything one cycle knows; created when it starts, dropped when it ends."""

    number: int
    started_at: int
    window_end: int = -1
    snapshot: HostSnapshot | None = None
    round: Round | None = None  # the round in flight
    post_at: int = 0  # the phase's next round is posted at or after this pass
    fault: int = 0  # worst local fault since the last vote: code * FAULT_RANKS + rank
    fault_detail: str = ""
    plan: Plan | None = None
    window_load: np.ndarray | None = None
    layers_to_move: list[int] = field(default_factory=list)
    inflight: list["Step"] = field(default_factory=list)  # started, not yet committed, in start order
    next_seq: int = 0
    start_failed: bool = False  # a step failed to start on this rank
    votes: list[Round] = field(default_factory=list)  # commit votes in flight, in posting order
    weights_changed: bool = False  # a weight update came: nothing of this cycle commits any more


@dataclass
class Step:
    """One transfer step of a cycle: layers_per_pass layers moved together."""

    seq: int
    layers: list[int]
    started_at: int
    inflight: InFlightStep | None = None  # None if starting it failed on this rank
    prepared: bool = False  # data in, local snapshots taken, maps staged: ready to commit
    staged: list[StagedLayer] = field(default_factory=list)


class Balancer:
    # set by transitions: the full nested state, e.g. "planning_waiting"
    phase: str

    def __init__(
        self,
        config: BalancerConfig,
        layout: MoELayout,
        comm: Comm,
        policy: Policy | None = None,
        *,
        clock: PassClock,
        shared: dict | None = None,
    ):
        """Collective over the EP group (the start-up protocol check): every rank builds its
        balancer at the same point. `clock`: this rank's pass clock, whose runner count the
        driver advances as each forward pass starts. `shared`: more fields every rank must
        hold alike (the integration's keys), compared with the rest at start-up."""
        self.config = config
        self.layout = layout
        self.comm = comm
        self.topo = layout.topo
        self.stats = BalancerStats()
        self.pass_no = 0  # last pass processed
        self.clock = clock
        self.layer = -1  # next layer to move while transferring
        self.transitions_total = 0
        self.disabled_reason = ""
        self.placement = layout.maps.phy2log.cpu().numpy().copy()
        self.initial_placement = self.placement.copy()  # the baseline of the "initial" balancedness

        self.window = LoadWindow(
            layout.pass_load, config.window_size, layout.record_flag, layout.max_pass_tokens, ranks=self.topo.num_ranks
        )
        self.planner = Planner(
            policy or get_policy(config.policy, tolerance=config.min_move_tolerance),
            self.topo,
            config.planner,
            max_restarts=config.planner_max_restarts,
        )
        self.agreement = Agreement(comm.agreement_group, comm.world_size, config.agreement_lag, config.agreement_timeout_s)
        self._recorder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="eplb-record")
        self._skewed = False  # a tick anomaly not yet reported in a vote
        self._aborted_steps: list[InFlightStep] = []  # their messages may still be pending
        self._transfer_group_broken = False
        self._weights_pass = -1  # the pass clock when the last weight update came

        # The first window ends at step_interval, as upstream's first rearrangement does.
        self.next_cycle_at = max(1, config.step_interval - config.window_size)
        self.cycle: Cycle | None = None
        self._cycles = 0
        self._on_round = {
            "planning_reducing": self._read_load,
            "planning_waiting": self._read_readiness,
            "syncing": self._read_digest,
        }
        self._post = {
            "planning_reducing": self._post_load,
            "planning_waiting": self._post_readiness,
            "syncing": self._post_digest,
        }
        self.machine = attach_machine(self, self._on_transition)
        agreed = self._check_protocol(shared or {})
        if isinstance(comm.backend, DeferredBackend):
            comm.backend = comm.backend.build() if agreed else NoBackend(comm.backend.name)
        self.engine = TransferEngine(comm.backend, layout.weights_of, comm.rank)
        if agreed:
            self._reserve_staging()

    def _check_protocol(self, shared: dict) -> bool:
        """Compare every field that shapes the protocol with every peer's (core/protocol.py).
        On a difference, or if the peers cannot be reached, rebalancing is off here, as it
        is on every rank (each read the same fields): False."""
        layout, t = self.layout, self.topo
        shapes = sorted({repr([(tuple(w.shape), str(w.dtype)) for w in layout.weights_of(layer)])
                         for layer in range(layout.num_layers)})
        fields = protocol_fields(
            self.config,
            protocol=PROTOCOL,
            ep_size=self.comm.world_size,
            topology=(f"{t.num_ranks} ranks x {t.slots_per_rank} slots, {t.num_logical} experts, "
                      f"ranks per node: {t.ranks_per_node or 'all'}, expert groups: {t.num_groups}"),
            moe_layers=layout.num_layers,
            weights=" + ".join(shapes),
            backend=self.comm.backend.name,
            device=layout.weights_of(0)[0].device.type,
            clock=self.clock.source,
            placement=short_digest(self.placement.tobytes()),
            **shared,
        )
        try:
            everyone = exchange(self.comm.agreement_group, self.comm.world_size, fields)
        except Exception as exc:  # a peer that never gets here: nothing can be agreed with it
            self._disable("agreement_timeout", exc)
            return False
        diff = differences(everyone)
        if diff:
            self._disable("config_mismatch", None, detail=diff)
            return False
        return True

    def _reserve_staging(self) -> None:
        """A step moves at most every local slot of layers_per_pass layers: the staging bound
        (+ message padding), for every step that can be in flight, reserved now."""
        layout, comm = self.layout, self.comm
        per_layer = max(
            sum(padded(w.numel() * w.element_size()) for w in layout.weights_of(layer)) for layer in range(layout.num_layers)
        )
        comm.backend.prepare(layout.weights_of(0), self.config.layers_per_pass * per_layer + (1 << 20), self.max_in_flight)
        if comm.backend.reserved_bytes:
            log.info(
                "vllm-eplb rank %d: %d MB of transfer staging reserved on %s (%d steps in flight)", comm.rank,
                comm.backend.reserved_bytes >> 20, layout.weights_of(0)[0].device, self.max_in_flight,
            )

    # ------------------------------------------------------------------ public

    @property
    def state(self) -> str:
        """The top-level state: idle, collecting, planning, syncing or transferring."""
        return top_state(self.phase)

    @property
    def enabled(self) -> bool:
        return not self.disabled_reason

    def tick(self) -> None:
        """After a forward pass: process it. Never raises: failures end the cycle."""
        now = self.clock.now()
        if now <= self.pass_no:
            self.stats.extra_ticks += 1  # no forward pass since the last tick
            self._skewed = True
            return
        self._catch_up_to(now)

    def catch_up(self) -> None:
        """Before a forward pass: process every pass that ran without its tick, so what
        was decided for them is in force before this pass runs. Cheap when up to date."""
        now = self.clock.now()
        if now > self.pass_no:
            self.stats.missed_ticks += 1  # the last pass's tick never came
            self._skewed = True
            self._catch_up_to(now)

    def report_fault(self, reason: str, exc: BaseException) -> None:
        """A failure outside tick() (metrics, hooks): it ends the cycle through the next vote."""
        self._fault(Fault.METRICS_ERROR if reason == "metrics_error" else Fault.INTERNAL_ERROR, exc)

    def weights_changed(self) -> None:
        """New weights are being written into the expert slots (a weight update), between
        two forward passes. Called by every rank at the same point of its pass sequence,
        as often as the update's writes like: one pass counts one update."""
        now = self.clock.now()
        if now != self._weights_pass:
            self._weights_pass = now
            self.stats.weight_updates += 1
        c = self.cycle
        if c is None or self.phase == "idle" or c.weights_changed:
            return  # idle: the next cycle reads the new weights, nothing more to do
        c.weights_changed = True
        self._fault(Fault.WEIGHT_UPDATE, None)

    def shutdown(self) -> None:
        self.planner.shutdown()
        self._recorder.shutdown(wait=True)
        try:
            self.comm.backend.close()
        except Exception:  # shutting down: nothing left to protect
            log.debug("EPLB backend close failed", exc_info=True)

    def rebalance_now(self, new_placement: np.ndarray) -> int:
        """Move every layer to `new_placement` right now, blocking (start-up, benchmarks'
        stop-the-world baseline). Every rank must call it at the same point. Returns the
        number of layers moved."""
        moved = 0
        for layer in range(self.layout.num_layers):
            if (new_placement[layer] == self.placement[layer]).all():
                continue
            step = self.engine.start([plan_layer(layer, self.placement[layer], new_placement[layer], self.topo)])
            self.engine.finish(step)
            if self.comm.world_size > 1:
                # every rank's data is in before any rank overwrites a slot a peer may read
                dist.barrier(group=self.agreement.group)
            self.engine.commit(step)
            self.layout.maps.write_layer(layer, new_placement[layer], self.topo)
            self.placement[layer] = new_placement[layer]
            moved += 1
        return moved

    # ------------------------------------------------------------------ the clock

    def _catch_up_to(self, now: int) -> None:
        missed = now - self.pass_no - 1
        if missed > 0:
            self.stats.missed_ticks += missed
            self._skewed = True
        while self.pass_no < now:
            self._run(self.pass_no + 1)

    def _run(self, p: int) -> None:
        """One pass. Every handler decides (schedule arithmetic, transitions from votes)
        before it does fallible local work, which it catches into this rank's fault; an
        exception that escapes anyway is a bug: recorded as a fault, and the pass's due
        read or post is retried once, so this rank keeps its peers' schedule."""
        self.pass_no = p
        try:
            if self.phase == "idle":
                self._tick_idle(p)
            elif self.phase == "collecting":
                self._tick_collecting(p)
            elif self.phase == "transferring":
                self._tick_transferring(p)
            else:
                self._tick_phase(p)
        except (AgreementError, ProtocolMismatch) as exc:
            self._lost_agreement(exc)
        except Exception as exc:
            self._fault(Fault.INTERNAL_ERROR, exc)
            if self.phase in self._post or self.phase in self._on_round or self.phase == "transferring":
                try:
                    self._tick_transferring(p) if self.phase == "transferring" else self._tick_phase(p)
                except (AgreementError, ProtocolMismatch) as again:
                    self._lost_agreement(again)
                except Exception as again:
                    self._disable("internal_error", again)

    def _lost_agreement(self, exc: Exception) -> None:
        if isinstance(exc, ProtocolMismatch):
            # Read identically by every rank: they disagree about the protocol itself.
            self._disable(exc.reason, None, detail=str(exc))
        else:
            # The round failed, and so it did on every rank (see agreement.py), read at this
            # same pass: end the cycle here; its group's connections are gone, so build a
            # new one, ready long before the next cycle's first round.
            self._abort("agreement_timeout", detail=f"{type(exc).__name__}: {exc}")
            self.agreement.rebuild()

    # ------------------------------------------------------------------ states

    def _tick_idle(self, p: int) -> None:
        if p >= self.next_cycle_at and self.enabled:
            try:
                self.agreement.wait_rebuilt()  # after a failed round: the new group, before any round
            except AgreementError as exc:
                return self._disable("agreement_timeout", exc)
            self.stats.cycles_started += 1
            self._cycles += 1
            self.cycle = Cycle(self._cycles, p)
            self.start_collecting()
            try:
                self.window.reset()  # load recorded while idle is not part of the window
            except Exception as exc:
                self._fault(Fault.INTERNAL_ERROR, exc)
            try:
                restarts = self.planner.restarts
                self.planner.ensure_alive()  # a planner that died since: warm again by the window's end
                self.stats.planner_restarts += self.planner.restarts - restarts
            except PlannerDead as exc:
                self._fault(Fault.PLANNER_DEAD, exc)

    def _tick_collecting(self, p: int) -> None:
        c = self.cycle
        self.window.record_pass()
        if not self.window.full:
            return
        c.window_end = p
        c.post_at = p + 1  # one pass later the device->host copy is long done
        self.window_full()
        c.snapshot = self.window.snapshot_to_host()

    def _tick_phase(self, p: int) -> None:
        """planning, syncing, transferring: read the round due now (which may move the
        machine on), then post the phase's round if it is due. Local work done while
        reading or posting that fails becomes this rank's fault, voted in that round."""
        c = self.cycle
        if c.round is not None:
            if p < c.round.due_at:
                return
            r, c.round = c.round, None
            handler = self._on_round[self.phase]
            if r.layout is not None:
                v = self._read_votes(r, p)
                if v is None:
                    return
                handler(p, v)
            else:
                handler(p, r)
            if self.phase == "idle":
                return
        post = self._post.get(self.phase)
        if c.round is None and p >= c.post_at and post is not None:
            post(p)

    # ---- planning

    def _post_load(self, p: int) -> None:
        c = self.cycle
        load = per_pass = None
        if c.snapshot is not None:
            try:
                load, per_pass = c.snapshot.wait()
            except Exception as exc:
                self._fault(Fault.INTERNAL_ERROR, exc)
        if load is None:
            load = torch.zeros(self.layout.pass_load.shape, dtype=torch.int64)
            per_pass = torch.zeros(self._per_pass_shape, dtype=torch.int64)
        # Every rank's fault code, pass number and clock offset ride along at its own index:
        # the SUM hands every rank all of them.
        n, me = self.comm.world_size, self.comm.rank
        tail = torch.zeros(LOAD_TAIL * n, dtype=torch.int64)
        tail[me], tail[n + me], tail[2 * n + me] = self._take_fault(), p, self.clock.offset()
        sent = torch.cat([load.reshape(-1), per_pass.reshape(-1), tail])
        c.round = self.agreement.post(sent, p, op=dist.ReduceOp.SUM)
        c.round.sent = {"clock": int(tail[2 * n + me])}

    def _read_load(self, p: int, r: Round) -> None:
        c = self.cycle
        value = r.result()
        n = self.comm.world_size
        faults, passes, clocks = value[-LOAD_TAIL * n:].reshape(LOAD_TAIL, n)
        if not bool((passes == r.posted_at).all()):
            raise ProtocolMismatch("pass_mismatch", f"load round posted at pass {r.posted_at} here was posted at passes {passes.tolist()} by ranks 0..{n - 1}")
        if not bool((clocks == clocks[0]).all()):
            raise ProtocolMismatch("clock_mismatch", self._clock_detail(r.posted_at, f"by ranks 0..{n - 1}: {clocks.tolist()}", r.sent["clock"]))
        worst = int(faults.max())
        if worst:
            return self._end_on_fault(worst)
        # Decided from the round alone, so every rank moves on here; the local work
        # below can fail only into this rank's next vote.
        self.load_reduced()
        c.post_at = p + 1  # first readiness vote next pass: a fast plan is ready by then
        try:
            size = self.layout.pass_load.numel()
            physical = value[:size].reshape(self.layout.pass_load.shape).numpy().astype(np.float64)
            observed = balancedness_of(observed_rank_loads(physical, self.topo))
            self.stats.balancedness_observed = observed
            self.stats.observed_history.append((c.window_end, observed))
            passes = pass_figures(value[size : -LOAD_TAIL * n].reshape(self._per_pass_shape).numpy())
            self.stats.balancedness_pass = passes.pass_balancedness
            self.stats.straggler_share = passes.straggler_share
            log.info(
                "EPLB rank %d pass %d: window of %d passes, %d expert-token loads, balancedness %.3f over the window, "
                "%.3f per pass (%d passes sampled; stragglers cost %.1f%% of MoE time)",
                self.comm.rank, p, self.config.window_size, int(physical.sum()), observed,
                passes.pass_balancedness, passes.passes, 100 * passes.straggler_share,
            )
            logical = physical_to_logical_load(physical, self.placement, self.topo.num_logical)
            c.window_load = logical
            self.stats.balancedness_initial = predicted_balancedness(self.initial_placement, logical, self.topo)
            restarts = self.planner.restarts
            try:
                self.planner.submit(logical, self.placement)
            finally:
                self.stats.planner_restarts += self.planner.restarts - restarts
        except PlannerDead as exc:
            self._fault(Fault.PLANNER_DEAD, exc)
        except Exception as exc:
            self._fault(self._fault_of(exc, Fault.PLANNER_ERROR), exc)

    def _post_readiness(self, p: int) -> None:
        c = self.cycle
        ready = False
        expired = False
        try:
            ready = self.planner.done()
            if ready and c.plan is None:
                c.plan = self.planner.result()
                self.stats.last_plan_seconds = c.plan.plan_seconds
                self.stats.plan_seconds.append(c.plan.plan_seconds)
                self.stats.plans_total += 1
            expired = not ready and self.planner.seconds_running() > self.config.planning_timeout_s
        except PlannerExited as exc:
            self._fault(Fault.PLANNER_DIED, exc)
        except Exception as exc:  # the policy's exception, re-raised by result()
            self._fault(Fault.PLANNER_ERROR, exc)
        self._vote(READINESS, p, ready=ready, expired=expired)

    def _read_readiness(self, p: int, v) -> None:
        if v.expired:
            return self._abort("planning_timeout")
        if not v.ready:
            self.cycle.post_at = p  # a rank is still planning: vote again now (no transition)
            return
        self.plan_agreed()
        self.cycle.post_at = p

    # ---- syncing

    def _post_digest(self, p: int) -> None:
        plan = self.cycle.plan
        d0, d1 = plan.digest if plan is not None else (0, 0)
        worth = plan is not None and plan.improvement >= self.config.improvement_threshold and plan.moved_slots > 0
        self._vote(DIGEST, p, digest_a=d0, digest_b=d1, worth=worth)

    def _read_digest(self, p: int, v) -> None:
        c = self.cycle
        if not (v.digest_a[1] and v.digest_b[1]):
            return self._abort("plan_mismatch")
        plan = c.plan  # every rank voted ready with this digest: the plan is here
        self.stats.balancedness_current = plan.current_balancedness
        self.stats.balancedness_predicted = plan.predicted_balancedness
        self.stats.last_plan_moved_slots = plan.moved_slots
        log.info(
            "EPLB rank %d pass %d: plan (%s, %.1f ms) balancedness %.3f -> %.3f predicted, %d slots to move",
            self.comm.rank, p, self.planner.policy.name, plan.plan_seconds * 1e3,
            plan.current_balancedness, plan.predicted_balancedness, plan.moved_slots,
        )
        if not v.worth:
            self.stats.cycles_skipped["insufficient_improvement"] += 1
            return self.skip(reason="insufficient_improvement")
        c.layers_to_move = [
            layer for layer in range(self.layout.num_layers) if (plan.placement[layer] != self.placement[layer]).any()
        ]
        self.layer = c.layers_to_move[0]
        self.start_transfer()
        self._start_step(p)

    # ---- transferring

    @property
    def _per_pass_shape(self) -> tuple[int, int, int]:
        sampler = self.window.sampler
        return (sampler.samples, sampler.layers, sampler.ranks)

    @property
    def max_in_flight(self) -> int:
        """Steps in flight at once: enough to start one every pass (a step is committed
        1 + agreement_lag passes after it started, at the earliest)."""
        return min(self.config.agreement_lag + 1, MAX_IN_FLIGHT)

    def _tick_transferring(self, p: int) -> None:
        """Read the commit vote due now (commits every step all ranks voted ready), start
        the next step if there is room, poll every step in flight and post this pass's
        vote. Decisions come from votes and the pass clock only; local failures go into
        this rank's vote."""
        c = self.cycle
        if c.votes and p >= c.votes[0].due_at:
            r = c.votes.pop(0)
            v = self._read_votes(r, p)
            if v is None:
                return
            if not (v.first_seq[1] and v.layers[1]):
                raise ProtocolMismatch(
                    "step_mismatch",
                    f"commit vote posted at pass {r.posted_at} names other steps or other layers on other ranks "
                    f"(here: {r.sent['steps']})",
                )
            first = v.first_seq[0]
            ready = {first + i for i in range(MAX_IN_FLIGHT) if getattr(v, f"ready{i}")}
            # after a weight update nothing commits: the steps' data predates it, and the
            # vote posted since carries the fault that ends the cycle
            done = [] if c.weights_changed else [s for s in c.inflight if s.seq in ready]
            if done:
                for step in done:
                    try:
                        self._commit(c, step)
                    except Exception as exc:
                        return self._disable("commit_failed", exc)
                c.inflight = [s for s in c.inflight if s.seq not in ready]
                if not c.inflight and not c.layers_to_move:
                    self.stats.cycles_completed += 1
                    self.stats.cycle_passes.append(p - c.window_end)
                    return self.finish()
                self.layer = (c.inflight[0].layers[0] if c.inflight else c.layers_to_move[0])
                self.next_layer()
        if c.layers_to_move and len(c.inflight) < self.max_in_flight:
            self._start_step(p)
        if c.inflight:
            self._post_commit(p)

    def _start_step(self, p: int) -> None:
        c = self.cycle
        n = self.config.layers_per_pass
        layers, c.layers_to_move = c.layers_to_move[:n], c.layers_to_move[n:]
        step = Step(c.next_seq, layers, p)
        c.next_seq += 1
        c.inflight.append(step)
        if c.start_failed:
            return  # see below: this rank posts no more messages this cycle
        try:
            plans = [plan_layer(layer, self.placement[layer], c.plan.placement[layer], self.topo) for layer in layers]
            # numbered by cycle and step, alike on every rank: a step's messages pair only with its own
            step.inflight = self.engine.start(plans, seq=c.number * 1024 + step.seq)
        except Exception as exc:
            # Peers posted this step's messages to and from this rank; this rank did not.
            # Starting later steps would pair their messages with this one's: post no
            # more this cycle (it ends at the next vote read), leaving peers' pending.
            c.start_failed = True
            self._fault(self._fault_of(exc, Fault.TRANSFER_ERROR), exc)

    def _post_commit(self, p: int) -> None:
        """Vote which steps in flight this rank has ready. Never waits on a copy: a step
        whose data is not in yet is voted not ready, and polled again next pass."""
        c = self.cycle
        for step in c.inflight:
            if step.prepared or step.inflight is None:
                continue
            try:
                handle = step.inflight.handle
                if handle.done():
                    self.engine.finish(step.inflight)  # returns at once; snapshots local sources
                    step.staged = [
                        self.layout.maps.stage_layer(layer, c.plan.placement[layer], self.topo) for layer in step.layers
                    ]
                    step.prepared = True
                elif time.perf_counter() - step.inflight.started > self.config.transfer_timeout_s:
                    raise TransferError(f"step not complete after {self.config.transfer_timeout_s:g} s")
            except Exception as exc:
                if isinstance(exc, TransferError) and exc.__cause__ is not None:
                    # the group itself failed (gloo tears its pairs down on a timeout or a
                    # lost peer): later steps on it would fail too, or pair stale messages
                    self._transfer_group_broken = True
                self._fault(self._fault_of(exc, Fault.TRANSFER_ERROR), exc)
        first = c.inflight[0].seq
        ready = {f"ready{s.seq - first}": s.prepared for s in c.inflight}
        ready.update({f"ready{i}": False for i in range(MAX_IN_FLIGHT) if f"ready{i}" not in ready})
        vote = self._post_vote(COMMIT, p, first_seq=first, layers=layers_digest(c.inflight), **ready)
        vote.sent["steps"] = [(s.seq, s.layers) for s in c.inflight]
        c.votes.append(vote)

    def _commit(self, c: Cycle, step: Step) -> None:
        """Every rank voted this step prepared: copies only, weights then maps, on this
        pass, so the next forward pass routes with the new layers everywhere."""
        inflight = step.inflight
        try:
            self.engine.commit(inflight)
            for staged in step.staged:
                self.layout.maps.apply(staged)
                self.placement[staged.layer] = c.plan.placement[staged.layer]
        except Exception as exc:
            # Copies into existing memory do not fail short of a broken device; if they
            # do, this rank's layer is in an unknown state: say so as loudly as we can.
            log.critical("EPLB rank %d pass %d: commit failed part-way: %s", self.comm.rank, self.pass_no, exc)
            raise
        r = inflight.result
        s = self.stats
        s.layers_committed += len(inflight.jobs)
        s.experts_moved += r.experts_received
        s.bytes_moved += r.bytes_received
        s.bytes_sent += r.bytes_sent
        s.last_layer_transfer_seconds = r.seconds / max(1, len(inflight.jobs))
        s.transfer_seconds.append(r.seconds)
        s.transfer_layers.append(len(inflight.jobs))
        s.steps_total += 1
        s.max_staging_bytes = max(s.max_staging_bytes, r.staging_bytes)

    # ------------------------------------------------------------------ votes and faults

    def _vote(self, layout: VoteLayout, p: int, **values) -> None:
        self.cycle.round = self._post_vote(layout, p, **values)

    def _post_vote(self, layout: VoteLayout, p: int, **values) -> Round:
        values.update(
            fault=self._take_fault(), skew=self._skewed, clock=self.clock.offset(), weights=self.stats.weight_updates
        )
        self._skewed = False
        return self.agreement.vote(layout, values, p)

    def _read_votes(self, r: Round, p: int):
        """A vote round's fields, after the checks every vote gets: posted at one pass
        everywhere, pass clocks that agree, tick skew reported, a fault ends the cycle
        (then None)."""
        v = r.votes()
        if not v.pass_no[1]:
            raise ProtocolMismatch(
                "pass_mismatch", f"round posted at pass {r.posted_at} on this rank was posted at another pass elsewhere"
            )
        if not v.clock[1]:
            raise ProtocolMismatch("clock_mismatch", self._clock_detail(r.posted_at, f"from {v.clock[0]} to {v.clock[2]} across ranks", r.sent["clock"]))
        if v.skew:
            self._report_skew(p)
        if not v.weights[1]:
            raise ProtocolMismatch(
                "weight_update_skew",
                f"ranks applied weight updates at different forward passes ({v.weights[0]} to {v.weights[2]} updates "
                f"across ranks, {self.stats.weight_updates} here): a step may have been committed on some ranks only; "
                "pause generation on every engine around a weight update",
            )
        if v.fault:
            self._end_on_fault(v.fault)
            return None
        return v

    def _take_fault(self) -> int:
        """This rank's fault for the vote being posted (and forget it: it is on its way)."""
        c = self.cycle
        if any(not step.handle.done() for step in self._aborted_steps):
            # A whole cycle later an aborted step's messages are still pending: they
            # were addressed to a rank that never posted its side. The transfer group
            # would match them against a later step's; stop rebalancing everywhere.
            self._transfer_group_broken = True
        pending = []
        for step in self._aborted_steps:  # done() read once: a step done now is released, not dropped
            if step.handle.done():
                step.handle.release()  # nothing writes its staging any more
            else:
                pending.append(step)
        self._aborted_steps = pending
        if self._transfer_group_broken:
            self._fault(Fault.TRANSFER_GROUP_BROKEN, None)
        fault, c.fault = c.fault, 0
        return fault

    def _fault(self, code: Fault, exc: BaseException | None) -> None:
        """Record a local failure: it travels in this rank's next vote."""
        self.stats.local_faults[code.reason] += 1
        detail = f"{type(exc).__name__}: {exc}" if exc is not None else ""
        c = self.cycle
        if c is None or self.phase == "idle":
            log.warning("EPLB rank %d pass %d: %s while idle%s", self.comm.rank, self.pass_no, code.reason, f": {detail}" if detail else "")
            return
        mine = int(code) * FAULT_RANKS + self.comm.rank
        if mine > c.fault:
            c.fault, c.fault_detail = mine, detail
        if code != Fault.TRANSFER_GROUP_BROKEN or exc is not None:
            log.warning(
                "EPLB rank %d pass %d: %s%s; voting to end the cycle",
                self.comm.rank, self.pass_no, code.reason, f": {detail}" if detail else "",
            )

    @staticmethod
    def _fault_of(exc: BaseException, default: Fault) -> Fault:
        return Fault.OUT_OF_MEMORY if isinstance(exc, (torch.OutOfMemoryError, MemoryError)) else default

    def _end_on_fault(self, fault: int) -> None:
        code, rank = Fault(fault // FAULT_RANKS), fault % FAULT_RANKS
        detail = self.cycle.fault_detail if rank == self.comm.rank else ""
        if code.disables:
            return self._disable(code.reason, None, rank=rank, detail=detail)
        self._abort(code.reason, rank=rank, detail=detail)

    def _clock_detail(self, posted_at: int, spread: str, mine: int) -> str:
        return (
            f"a rank's pass count drifted: in the round posted at pass {posted_at}, runner passes - MoE-layer passes "
            f"{spread}, {mine} on this rank (clock: {self.clock.source})"
        )

    def _report_skew(self, p: int) -> None:
        self.stats.skew_rounds += 1
        log.warning(
            "EPLB rank %d pass %d: a rank's driver ticked out of step with its forward passes "
            "(absorbed by the pass clock: extra ticks %d, missed %d here)",
            self.comm.rank, p, self.stats.extra_ticks, self.stats.missed_ticks,
        )

    def _abort(self, reason: str, rank: int | None = None, detail: str = "") -> None:
        self.stats.cycles_aborted[reason] += 1
        where = f"rank {rank}, " if rank is not None else ""
        self.stats.last_abort = f"{reason} ({where}pass {self.pass_no})" + (f": {detail}" if detail else "")
        log.warning("EPLB rank %d pass %d: cycle aborted: %s", self.comm.rank, self.pass_no, self.stats.last_abort)
        if reason == "planning_timeout":
            self.planner.cancel()
        if self.phase != "idle":
            self.abort(reason=reason)

    def _disable(self, reason: str, exc: BaseException | None, rank: int | None = None, detail: str = "") -> None:
        if exc is not None:
            detail = f"{type(exc).__name__}: {exc}"
        self.disabled_reason = reason + (f": {detail}" if detail else "")
        if self.phase != "idle":
            self._abort(reason, rank, detail)
        log.warning(
            "EPLB rank %d pass %d: rebalancing disabled (%s); serving continues on the placement in force",
            self.comm.rank, self.pass_no, self.disabled_reason,
        )

    # ------------------------------------------------------------------ end of cycle

    def _on_enter_idle(self, event) -> None:
        """The table's callback for every way back to idle: record, keep what may still be
        in flight, reset, schedule the next cycle."""
        c = self.cycle
        if c is None:
            return
        if event.event.name in ("finish", "skip"):
            self._record_placement(c)
        self._aborted_steps += [s.inflight for s in c.inflight if s.inflight is not None]
        self.planner.discard()
        self.cycle = None
        self.layer = -1
        self.next_cycle_at = max(c.started_at + self.config.step_interval, self.pass_no + 1)

    def _record_placement(self, c: Cycle) -> None:
        """Rank 0 writes the placement in force and its window's load, off the forward loop."""
        path = self.config.record_placement_path
        if not path or self.comm.rank != 0:
            return
        rec = PlacementRecord(
            self.placement.copy(), c.window_load, self.topo.num_ranks, self.topo.num_logical,
            self.planner.policy.name, self.pass_no,
        )
        self._recorder.submit(save, rec, path)

    def _on_transition(self, event) -> None:
        source, dest = top_state(event.transition.source), top_state(event.transition.dest)
        trigger = event.event.name
        reason = event.kwargs.get("reason", "")
        log.debug("EPLB rank %d pass %d: %s -> %s (%s)", self.comm.rank, self.pass_no, event.transition.source, event.transition.dest, trigger)
        if source == dest and trigger != "next_layer":
            return  # a phase change inside a state: not an operator-visible transition
        rec = TransitionRecord(self.pass_no, trigger, source, dest, self.layer, reason)
        self.stats.history.append(rec)
        self.transitions_total += 1
        log.info(
            "EPLB rank %d pass %d: %s -> %s%s%s",
            self.comm.rank, self.pass_no, source, dest,
            f" (layer {self.layer})" if dest == "transferring" else "",
            f" ({reason})" if reason else "",
        )
