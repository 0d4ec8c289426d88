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

What each phase does on a pass is one table, `state_machine.PHASE_WORK` (a row per phase,
beside the transitions and DECIDED_BY, checked at import): the method run, and for the planning and syncing
phases the round each posts and reads. Transferring runs the transfer pipeline
(core/pipeline.py: steps, in-flight limit, commit votes, the transfer group's health).

Faults (core/faults.py). A failure on one rank (planner, transfer, allocation, a bug)
never makes it stop posting rounds: it is reported to `LocalFaults`, becomes the `fault`
field of its next vote, and every rank ends the cycle when it reads that round, at the
same pass, with the same reason (the worst code, and the rank it came from); a code that
`suspends` pauses rebalancing instead (the table's `suspend`: a back-off, then a resume
vote). A round that fails (a rank lagged past agreement_timeout_s, or stopped voting after
its tick failed twice) fails on every rank: the cycle ends where it is read and the
agreement group is rebuilt for the next cycle (three such ends in a row suspend). Rounds
that show the ranks disagree about the protocol itself (pass, clock, step) stop
rebalancing on every rank (`disabled`); weight updates applied at different passes
suspend it. Every round carries a digest of each rank's maps: maps that differ, whatever
made them differ, are healed at the round that shows it (core/heal.py).

Weight updates. A server that gets new weights (an RL trainer's push, a reload) has
them written between two forward passes, on every rank of the expert-parallel group
between the same two (one engine's workers take every call in one order; several
engines must pause generation around the update). `weights_changed()` says so. A
cycle in flight when it comes ends: from then on it commits nothing, since what its
steps staged was read before the update, and its next vote carries WEIGHT_UPDATE, so
it ends on every rank at the same pass; the next cycle moves the new weights. Every
vote carries the count of updates each rank applied: counts that differ mean ranks
applied an update at different passes (a step may have been committed on some ranks
only), and rebalancing is suspended on every rank (the maps digest heals such a step).
A rank whose tick for the last pass is late processes that pass first (`settle`).

The placement of record is the routing maps' host copy (`RoutingMaps.placement`): what
the balancer plans from, moves from and records is what the model routes with.

A cycle starts every step_interval passes, or earlier when the load trigger's vote says the
traffic shifted (core/load_trigger.py: its watch rounds run while idle).

Pass timeline of one cycle (L = agreement lag, W = window, all relative):
  c            idle -> collecting                    window opened
  c+W          -> planning_reducing                  window closed, copy to host started
  c+W+1        load all-reduce posted (SUM, with every rank's fault code)
  c+W+1+L      read: -> planning_waiting, plan submitted; readiness vote posted
  every L      read readiness: every rank has a plan -> syncing, digest vote posted
  s+L          read digest: -> transferring (first step started) | skip | abort
  every pass   transferring: start a step while fewer than min(L + 1, 6) are in flight; poll every
               step in flight (data in -> commit prepared); post one commit vote naming
               the steps this rank has ready; read the vote posted L passes ago: commit
               every step all ranks voted ready (next_layer / finish) | abort
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from .agreement import DIGEST, PROTOCOL, READINESS, RESUME, Agreement, AgreementError, LoadLayout, Round, VoteLayout
from .config import BalancerConfig
from .cost_model import CostModel, expert_size
from .faults import Fault, LocalFaults, ProtocolMismatch, Reason, decode, describe, fault_of
from .heal import composite, heal_target
from .load_trigger import LoadTrigger
from .load_window import HostSnapshot, LoadWindow
from .pass_balance import pass_figures
from .pass_clock import PassClock
from .pipeline import CommitFailed, TransferPipeline
from .placement import (
    Topology,
    balancedness_of,
    maps_digest,
    observed_rank_loads,
    physical_to_logical_load,
    predicted_balancedness,
)
from .planner import Plan, Planner, PlannerDead

# agreement_timeout aborts in a row that suspend rebalancing (the group keeps failing: back off)
TIMEOUTS_TO_SUSPEND = 3
MAX_BACKOFF_DOUBLINGS = 6  # a suspension's back-off: step_interval passes x 2^(suspensions in a row - 1), capped
from .planner_process import PlannerExited
from .policies import Policy, get_policy
from .protocol import differences, exchange, protocol_fields, short_digest
from .records import PlacementRecord, save
from .routing_maps import RoutingMaps
from .state_machine import ACTIVE, PHASE_WORK, PHASES, attach_machine, top_state
from .stats import BalancerStats, TransitionRecord
from .transfer import TransferBackend, TransferEngine
from .transfer.backend import DeferredBackend, NoBackend

# A child of vLLM's logger: inside vLLM the lines go through its handlers and format.
log = logging.getLogger("vllm.eplb")


@dataclass
class MoELayout:
    """What the balancer needs from the model."""

    topo: Topology
    num_layers: int
    pass_load: torch.Tensor  # (layers, physical) int32/int64: the router adds tokens per slot into it
    maps: RoutingMaps  # updated in place at commit; its host copy is the placement of record
    weights_of: Callable[[int], list[torch.Tensor]]  # layer -> this rank's expert tensors (local slots, ...)
    record_flag: torch.Tensor | None = None  # bool scalar the router checks before recording load
    max_pass_tokens: int = 0  # most tokens one pass can route (0: unknown), for the overflow check
    # ranks that record each token (every tensor-parallel rank routes the whole batch): the
    # window's summed load counts a token this many times; the cost model needs tokens per pass
    load_copies: int = 1


@dataclass
class Comm:
    rank: int  # rank inside the expert-parallel group
    world_size: int
    agreement_group: Any  # gloo group (None when world_size == 1)
    backend: TransferBackend | DeferredBackend  # deferred: built once the start-up check passed


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
        if not isinstance(clock, PassClock):  # before anything starts (planner, rounds, groups)
            raise TypeError(f"Balancer(clock=...) needs this rank's PassClock (core/pass_clock.py), not {clock!r}")
        self.config = config
        self.layout = layout
        self.comm = comm
        self.topo = layout.topo
        self.stats = BalancerStats()
        self.pass_no = 0  # last pass processed
        self.clock = clock
        self.transitions_total = 0
        self.disabled_reason = ""  # "reason: detail" once disabled, for /metrics and the harness
        self.suspended_reason = ""  # "reason: detail" while suspended
        self.resume_at = 0  # while suspended: the pass the resume vote is posted at
        self._resume_round: Round | None = None
        self._suspensions = 0  # in a row (the back-off's exponent); a decided cycle resets it
        self._timeouts_in_row = 0  # cycles ended by agreement_timeout in a row
        self._weights_base = 0  # weight updates counted before the last weight_update_skew (votes carry the rest)
        self._early = -1  # a pass a weight update processed before its tick came: that tick is no extra one
        self._draining: list[Round] = []  # an ended cycle's commit votes still in flight: read for their maps digest
        self.initial_placement = self.placement.copy()  # the baseline of the "initial" balancedness
        self.faults = LocalFaults(comm.rank, self.stats.local_faults, self._where, self._in_cycle)

        self.window = LoadWindow(
            layout.pass_load, config.window_size, layout.record_flag, layout.max_pass_tokens, ranks=self.topo.num_ranks
        )
        sampler = self.window.sampler
        self._load_layout = LoadLayout(
            tuple(layout.pass_load.shape), (sampler.samples, sampler.layers, sampler.ranks), comm.world_size
        )
        nbytes, params = expert_size(layout.weights_of(0))
        self.cost = CostModel.for_expert(
            nbytes, params, config.step_interval, config.cost_tflops, config.cost_read_gbps, config.cost_move_gbps
        ) if params else None
        self.planner = Planner(
            policy or get_policy(config.policy, tolerance=config.min_move_tolerance, cost=self.cost),
            self.topo,
            config.planner,
            max_restarts=config.planner_max_restarts,
            cost=self.cost,
        )
        self.agreement = Agreement(comm.agreement_group, comm.world_size, config.agreement_lag, config.agreement_timeout_s)
        self.trigger = LoadTrigger(
            config, self.topo, self.agreement, self.window, comm.rank, comm.world_size, self.stats,
            self._common, self._read_round, layout.load_copies,
        )
        self._recorder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="eplb-record")
        self._skewed = False  # a tick anomaly not yet reported in a vote
        self._weights_pass = -1  # the pass clock when the last weight update came
        # the maps' digest, computed when they change (version), with the placement it is of: a
        # round read with every rank's digest equal makes that placement the last agreed one
        self._digest: tuple[int, int, np.ndarray] = (-1, 0, self.placement)
        self._agreed = self.placement.copy()

        # The first window ends at step_interval, as upstream's first rearrangement does.
        self.next_cycle_at = max(1, config.step_interval - config.window_size)
        self.cycle: Cycle | None = None
        self._cycles = 0
        self.machine = attach_machine(self, self._on_transition)
        self._tick_phase = self._tick_idle  # this phase's PHASE_WORK tick, bound at every state change
        agreed = self._check_protocol(shared or {})
        if isinstance(comm.backend, DeferredBackend):
            comm.backend = comm.backend.build() if agreed else NoBackend(comm.backend.name)
        self.engine = TransferEngine(comm.backend, layout.weights_of, comm.rank)
        self.pipeline = TransferPipeline(
            self.engine, layout.maps, self.topo, self.config, self.faults, self.stats, self._post_vote
        )
        if agreed:
            self.pipeline.reserve_staging(layout.weights_of, layout.num_layers, comm.rank)

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
            self._disable(Reason.AGREEMENT_TIMEOUT, exc)
            return False
        diff = differences(everyone)
        if diff:
            self._disable(Reason.CONFIG_MISMATCH, detail=diff)
            return False
        return True

    # ------------------------------------------------------------------ public

    @property
    def state(self) -> str:
        """The top-level state: idle, collecting, planning, syncing, transferring or disabled."""
        return top_state(self.phase)

    @property
    def enabled(self) -> bool:
        return self.phase != "disabled"

    @property
    def placement(self) -> np.ndarray:
        """The placement of record: the host copy of the routing maps (core/routing_maps.py)."""
        return self.layout.maps.placement

    @property
    def layer(self) -> int:
        """The next layer to move while transferring, else -1."""
        return self.pipeline.next_layer if self.phase == "transferring" else -1

    def tick(self) -> None:
        """After a forward pass: process it. Never raises: failures end the cycle."""
        now = self.clock.now()
        if now <= self.pass_no:
            if now == self._early:  # a weight update processed this pass before its tick came
                self._early = -1
                return
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

    def report_fault(self, code: Fault, exc: BaseException) -> None:
        """A failure outside tick() (metrics, hooks): it ends the cycle through the next vote."""
        self.faults.report(code, exc)

    def settle(self) -> None:
        """Between two forward passes: process every pass the clock counted, its tick come or
        not. A weight update comes between passes, and a rank's tick for the last one may be
        late (in vLLM data parallel a busy engine ticks after sampling, an idle one after its
        dummy pass): what that pass decided (a commit) must be in force before the update,
        as it is on the peers that ticked, so every rank marks the update at the pass its
        clock is at and decides from the same placement."""
        now = self.clock.now()
        if now > self.pass_no:
            self._catch_up_to(now)
            self._early = now  # the tick that comes for it later is not an extra one

    def weights_changed(self) -> None:
        """New weights are being written into the expert slots (a weight update), between
        two forward passes. Called by every rank at the same point of its pass sequence,
        as often as the update's writes like: one pass counts one update."""
        self.settle()
        now = self.clock.now()
        if now != self._weights_pass:
            self._weights_pass = now
            self.stats.weight_updates += 1
        c = self.cycle
        if not self._in_cycle() or c.weights_changed:
            return  # idle: the next cycle reads the new weights, nothing more to do
        c.weights_changed = True
        self.faults.report(Fault.WEIGHT_UPDATE, None)

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
        return self.pipeline.move_now(new_placement, self.agreement.group, self.comm.world_size)

    # ------------------------------------------------------------------ the clock

    def _catch_up_to(self, now: int) -> None:
        missed = now - self.pass_no - 1
        if missed > 0:
            self.stats.missed_ticks += missed
            self._skewed = True
        while self.pass_no < now:
            self._run(self.pass_no + 1)

    def _run(self, p: int) -> None:
        """One pass: the phase's work (PHASE_WORK). Every handler decides (schedule
        arithmetic, transitions from votes) before it does fallible local work, which it
        catches into this rank's fault; an exception that escapes anyway is a bug, and a
        vote like any fault: reported, it travels in this rank's next vote. In a scheduled
        phase a pass that failed before posting anything is retried once, so this rank keeps
        its peers' schedule; a retry that fails too leaves the rank unable to vote (whether
        this pass owed a round is lost with the pass): it stops posting (`Agreement.mute`),
        so its peers' next round fails on every rank at its read, at the same pass, and the
        cycle ends everywhere there (the timeout path). No rank stops rebalancing alone."""
        self.pass_no = p
        posts, muted = self.agreement.posts, self.agreement.muted
        if self._draining:
            self._drain(p)
        try:
            self._tick_phase(p)
        except (AgreementError, ProtocolMismatch) as exc:
            self._lost_agreement(exc)
        except Exception as exc:
            self.faults.report(Fault.INTERNAL_ERROR, exc)
            work = PHASE_WORK[self.phase]
            if not work.scheduled or self.agreement.posts != posts:
                return  # its round went out: the fault travels in the next one
            try:
                getattr(self, work.tick)(p)
            except (AgreementError, ProtocolMismatch) as again:
                self._lost_agreement(again)
            except Exception as again:
                if self.agreement.posts != posts:
                    return
                if muted:
                    # failing on every pass: it cannot read the rounds that would end its cycle
                    # either; end it here (its peers end theirs at the read of its first missing round)
                    return self._lost_agreement(AgreementError(muted))
                why = f"rank {self.comm.rank} stopped voting at pass {p}: its tick failed twice ({describe(again)})"
                log.error("EPLB %s; the cycle ends on every rank when its next round is read", why)
                self.agreement.mute(why)
                self._unposted(p, why)

    def _unposted(self, p: int, why: str) -> None:
        """The round this rank's schedule owed at pass p (its peers posted it) stands in its
        place as failed: read `agreement_lag` passes later, at the pass its peers' fails."""
        if self.phase == "transferring":
            # the pass's commits and step start are schedule, not votes: done as its peers did
            # them (a step they started and this rank did not would leave their messages pending)
            try:
                self._transfer_work(p, vote=False)
            except (AgreementError, ProtocolMismatch) as exc:
                return self._lost_agreement(exc)
            except Exception as exc:
                log.error("EPLB rank %d pass %d: %s", self.comm.rank, p, describe(exc))
        c, phase = self.cycle, self.phase
        failed = Round(torch.zeros(0), None, p, p + self.agreement.lag, self.agreement, error=AgreementError(why))
        if phase == "transferring" and self.pipeline.steps:
            self.pipeline.votes.append(failed)  # a commit vote every pass while steps are in flight
        elif phase == "suspended" and self._resume_round is None and p >= self.resume_at:
            self._resume_round = failed
        elif PHASE_WORK[phase].post and c is not None and c.round is None and p >= c.post_at:
            c.round = failed

    def _lost_agreement(self, exc: Exception) -> None:
        if isinstance(exc, ProtocolMismatch):
            # Read identically by every rank: they disagree about the protocol itself.
            return self._disable(exc.reason, detail=str(exc))
        # The round failed, and so it did on every rank (see agreement.py), read at this
        # same pass: end the cycle here; its group's connections are gone, so build a new
        # one, ready long before the next cycle's first round.
        self.agreement.rebuild()
        if self.phase == "suspended":
            return self._back_off(self.pass_no, f"the resume round failed: {describe(exc)}")
        if self.state in ACTIVE:
            self._timeouts_in_row += 1
        self._abort(Reason.AGREEMENT_TIMEOUT, detail=describe(exc))
        if self._timeouts_in_row >= TIMEOUTS_TO_SUSPEND:
            self._suspend(Reason.AGREEMENT_REPEATED,
                          detail=f"{self._timeouts_in_row} cycles in a row ended by agreement_timeout")

    # ------------------------------------------------------------------ states

    def _tick_disabled(self, p: int) -> None:
        """Rebalancing stopped: serving goes on on the placement in force."""

    def _tick_suspended(self, p: int) -> None:
        """Rebalancing paused for a transient cause: at `resume_at` (the back-off over) every
        rank posts whether it is ready again; read `agreement_lag` passes later: every rank
        ready -> idle (a cycle starts next pass), else back off twice as long."""
        r = self._resume_round
        if r is not None:
            if p < r.due_at:
                return
            self._resume_round = None
            v = self._read_round(r, p)
            if v is None or not v.ready:
                return self._back_off(p, "not every rank is ready" if v is not None else "the resume round ended early")
            self.stats.reenabled += 1
            log.warning("EPLB rank %d pass %d: rebalancing resumed (was suspended: %s)", self.comm.rank, p,
                        self.suspended_reason)
            self.suspended_reason = ""
            self.next_cycle_at = p + 1
            return self.resume(reason="every rank ready")
        if p < self.resume_at:
            return
        try:
            self.agreement.wait_rebuilt()
        except AgreementError as exc:  # its post fails: the round fails on every rank, the rebuild is retried
            log.warning("EPLB rank %d pass %d: %s", self.comm.rank, p, exc)
        self._resume_round = self._post_vote(RESUME, p, ready=self._ready_to_resume())

    def _ready_to_resume(self) -> bool:
        """This rank's part of the resume vote: its planner alive (a fresh restart budget
        after planner_dead), its transfer group healthy (no dropped step pending), its
        agreement group built."""
        parts = {"agreement group": self.comm.world_size == 1 or self.agreement.group is not None}
        try:
            parts["planner"] = self.planner.alive() or self.planner.revive()
        except Exception as exc:
            log.warning("EPLB rank %d: planner not revived: %s", self.comm.rank, describe(exc))
            parts["planner"] = False
        parts["transfer group"] = self.pipeline.recover()
        if not all(parts.values()):
            log.warning("EPLB rank %d pass %d: not ready to resume: %s", self.comm.rank, self.pass_no,
                        ", ".join(k for k, ok in parts.items() if not ok))
        return all(parts.values())

    def _drain(self, p: int) -> None:
        """Read an ended cycle's commit votes when due, for their maps digest only: a commit
        made on some ranks only in its last passes (a weight update applied at different
        passes) shows there, and is healed at the same pass on every rank."""
        if self.phase == "disabled":
            self._draining = []
            return
        while self._draining and p >= self._draining[0].due_at:
            r = self._draining.pop(0)
            try:
                v = r.votes()
            except AgreementError:
                continue  # failed on every rank: the cycle already ended on that path
            if v.maps[1]:
                self._agreed = r.sent.get("placement", self._agreed)
            else:
                try:
                    self._heal(p)
                except AgreementError as exc:
                    log.warning("EPLB rank %d pass %d: %s; the next round checks the maps again", self.comm.rank, p, exc)
                self._draining = []

    def _back_off(self, p: int, why: str) -> None:
        self._suspensions += 1
        self.resume_at = p + self._backoff()
        log.warning("EPLB rank %d pass %d: still suspended (%s); next resume vote at pass %d", self.comm.rank, p, why,
                    self.resume_at)

    def _backoff(self) -> int:
        return self.config.step_interval * 2 ** min(max(0, self._suspensions - 1), MAX_BACKOFF_DOUBLINGS)

    def _tick_idle(self, p: int) -> None:
        load = p < self.next_cycle_at and self.trigger.due(p, self.placement, self.next_cycle_at)
        if load or p >= self.next_cycle_at:
            self.trigger.disarm()
            try:
                self.agreement.wait_rebuilt()  # after a failed round: the new group, before any round
            except AgreementError as exc:
                # a rank that cannot vote: this cycle's first round fails on every rank at its
                # read, and the rebuild is retried there
                log.warning("EPLB rank %d pass %d: %s", self.comm.rank, p, exc)
            self.stats.cycles_started += 1
            self._cycles += 1
            self.cycle = Cycle(self._cycles, p, carried=self.trigger.take_carried() if load else None)
            self.faults.clear()
            self.start_collecting(reason="load trigger" if load else "")
            # a load-triggered cycle collects fewer passes: the watch windows it carries make up the rest
            self.window.expect(self.config.window_size - self.cycle.carried.passes if self.cycle.carried else None)
            try:
                self.window.reset()  # load recorded while idle is not part of the window
            except Exception as exc:
                self.faults.report(Fault.INTERNAL_ERROR, exc)
            try:
                restarts = self.planner.restarts
                self.planner.ensure_alive()  # a planner that died since: warm again by the window's end
                self.stats.planner_restarts += self.planner.restarts - restarts
            except PlannerDead as exc:
                self.faults.report(Fault.PLANNER_DEAD, exc)

    def _tick_collecting(self, p: int) -> None:
        c = self.cycle
        self.window.record_pass()
        if not self.window.full:
            return
        c.window_end = p
        c.post_at = p + 1  # one pass later the device->host copy is long done
        self.window_full()
        c.snapshot = self.window.snapshot_to_host()

    def _tick_round(self, p: int) -> None:
        """planning and syncing: read the phase's round when due (which may move the machine
        on), then post the phase's round if it is due. Local work done while reading or
        posting that fails becomes this rank's fault, voted in that round."""
        c = self.cycle
        if c.round is not None:
            if p < c.round.due_at:
                return
            r, c.round = c.round, None
            read = PHASE_WORK[self.phase].read
            v = self._read_round(r, p)
            if v is None:
                return
            getattr(self, read)(p, v)
            if self.cycle is None:
                return  # the cycle ended
        post = PHASE_WORK[self.phase].post
        if c.round is None and p >= c.post_at and post:
            getattr(self, post)(p)

    # ---- planning

    def _post_load(self, p: int) -> None:
        c = self.cycle
        load = per_pass = None
        if c.snapshot is not None:
            try:
                load, per_pass = c.snapshot.wait()
            except Exception as exc:
                self.faults.report(Fault.INTERNAL_ERROR, exc)
        if load is None:
            load, per_pass = self._load_layout.zeros()
        common = self._common()
        sent = self._load_layout.encode(load, per_pass, self.comm.rank, self._take_fault(), p, common["clock"],
                                        common["maps"])
        c.round = self.agreement.post(sent, p, op=dist.ReduceOp.SUM, layout=self._load_layout)
        c.round.sent = common

    def _read_load(self, p: int, v) -> None:
        c = self.cycle
        # Decided from the round alone, so every rank moves on here; the local work
        # below can fail only into this rank's next vote.
        self.load_reduced()
        c.post_at = p + 1  # first readiness vote next pass: a fast plan is ready by then
        try:
            physical = v.load.numpy().astype(np.float64)
            if c.carried is not None:
                physical = physical + c.carried.load  # the rest of the window: the watch's (core/load_trigger.py)
            observed = balancedness_of(observed_rank_loads(physical, self.topo))
            self.stats.balancedness_observed = observed
            self.stats.observed_history.append((c.window_end, observed))
            passes = pass_figures(v.per_pass.numpy())
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
                self.planner.submit(logical, self.placement, self.config.window_size * self.layout.load_copies)
            finally:
                self.stats.planner_restarts += self.planner.restarts - restarts
        except PlannerDead as exc:
            self.faults.report(Fault.PLANNER_DEAD, exc)
        except Exception as exc:
            self.faults.report(fault_of(exc, Fault.PLANNER_ERROR), exc)

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
            self.faults.report(Fault.PLANNER_DIED, exc)
        except Exception as exc:  # the policy's exception, re-raised by result()
            self.faults.report(Fault.PLANNER_ERROR, exc)
        self._vote(READINESS, p, ready=ready, expired=expired)

    def _read_readiness(self, p: int, v) -> None:
        if v.expired:
            self.planner.cancel()  # the plan still computing: stopped, a fresh planner for the next cycle
            return self._abort(Fault.PLANNING_TIMEOUT)
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
            return self._abort(Reason.PLAN_MISMATCH)
        plan = c.plan  # every rank voted ready with this digest: the plan is here
        self.stats.balancedness_current = plan.current_balancedness
        self.stats.balancedness_predicted = plan.predicted_balancedness
        self.stats.pass_seconds_current = plan.current_seconds
        self.stats.pass_seconds_predicted = plan.predicted_seconds
        self.stats.last_plan_moved_slots = plan.moved_slots
        log.info(
            "EPLB rank %d pass %d: plan (%s, %.1f ms) balancedness %.3f -> %.3f predicted, %d slots to move",
            self.comm.rank, p, self.planner.policy.name, plan.plan_seconds * 1e3,
            plan.current_balancedness, plan.predicted_balancedness, plan.moved_slots,
        )
        if not v.worth:
            skipped = Reason.INSUFFICIENT_IMPROVEMENT.label
            self.stats.cycles_skipped[skipped] += 1
            return self.skip(reason=skipped)
        self.pipeline.begin(c.number, plan.placement)
        self.start_transfer()
        self.pipeline.start(p)

    # ---- transferring

    def _tick_transferring(self, p: int) -> None:
        """Read the commit vote due now (commits every step all ranks voted ready), start
        the next step if there is room, poll every step in flight and post this pass's
        vote (core/pipeline.py). Decisions come from votes and the pass clock only; local
        failures go into this rank's vote."""
        self._transfer_work(p)

    def _transfer_work(self, p: int, vote: bool = True) -> None:
        pipe = self.pipeline
        # every vote due: one per pass, or two after a pass whose tick failed (its commits are
        # made now, one pass late, not one pass later each)
        while (r := pipe.due(p)) is not None:
            v = self._read_round(r, p)
            if v is None:
                return
            try:
                committed = pipe.commit_voted(r, v, current=not self.cycle.weights_changed)
            except CommitFailed as exc:
                # this rank's layer is in an unknown state: say so as loudly as we can
                log.critical("EPLB rank %d pass %d: commit failed part-way: %s", self.comm.rank, p, exc.__cause__)
                return self._disable(Reason.COMMIT_FAILED, detail=str(exc))
            if committed:
                if pipe.finished:
                    self.stats.cycles_completed += 1
                    self.stats.cycle_passes.append(p - self.cycle.window_end)
                    return self.finish()
                self.next_layer()
        if pipe.can_start():
            pipe.start(p)
        if pipe.steps:
            pipe.poll()
            if vote:
                pipe.vote(p)

    # ------------------------------------------------------------------ votes and faults

    def _vote(self, layout: VoteLayout, p: int, **values) -> None:
        self.cycle.round = self._post_vote(layout, p, **values)

    def _post_vote(self, layout: VoteLayout, p: int, **values) -> Round:
        values.update(fault=self._take_fault(), skew=self._skewed, **self._common())
        self._skewed = False
        return self.agreement.vote(layout, values, p)

    def _common(self) -> dict:
        """What every round carries besides pass and fault: the clock's offset, the weight
        updates applied (since the last weight_update_skew), the maps' digest (and, for this
        rank only, the placement it is of: the last agreed one once a round shows it equal)."""
        maps = self.layout.maps
        if self._digest[0] != maps.version:
            placement = maps.placement.copy()
            self._digest = (maps.version, maps_digest(placement), placement)
        return dict(clock=self.clock.offset(), weights=self.stats.weight_updates - self._weights_base,
                    maps=self._digest[1], placement=self._digest[2])

    def _take_fault(self) -> int:
        """This rank's fault for the round being posted, after the transfer group's health
        (a standing fault once broken)."""
        self.pipeline.check_health()
        return self.faults.take()

    def _read_round(self, r: Round, p: int):
        """A round's fields, after the checks every round gets: posted at one pass
        everywhere, pass clocks that agree, tick skew reported, a fault ends the cycle
        (then None)."""
        v = r.votes()
        if not v.pass_no[1]:
            raise ProtocolMismatch(Reason.PASS_MISMATCH, r.layout.pass_mismatch(v, r.posted_at))
        if not v.clock[1]:
            detail = (
                f"a rank's pass count drifted: in the round posted at pass {r.posted_at}, runner passes - MoE-layer "
                f"passes {r.layout.clock_spread(v)}, {r.sent['clock']} on this rank (clock: {self.clock.source})"
            )
            raise ProtocolMismatch(Reason.CLOCK_MISMATCH, detail)
        if v.skew:
            self._report_skew(p)
        if v.maps[1]:
            self._agreed = r.sent.get("placement", self._agreed)
        else:
            self._heal(p)
        if not v.weights[1]:
            self._suspend(
                Reason.WEIGHT_UPDATE_SKEW,
                detail=f"ranks applied weight updates at different forward passes ({v.weights[0]} to {v.weights[2]} "
                f"updates across ranks, {self.stats.weight_updates - self._weights_base} here); pause generation on "
                "every engine around a weight update",
            )
            return None
        if not v.maps[1]:
            return None
        if v.fault:
            self._end_on_fault(v.fault)
            return None
        return v

    def _end_on_fault(self, value: int) -> None:
        code, rank = decode(value)
        detail = self.faults.detail if rank == self.comm.rank else ""
        if code.suspends:
            return self._suspend(code, rank=rank, detail=detail)
        self._abort(code, rank=rank, detail=detail)

    def _report_skew(self, p: int) -> None:
        self.stats.skew_rounds += 1
        log.warning(
            "EPLB rank %d pass %d: a rank's driver ticked out of step with its forward passes "
            "(absorbed by the pass clock: extra ticks %d, missed %d here)",
            self.comm.rank, p, self.stats.extra_ticks, self.stats.missed_ticks,
        )

    def _where(self) -> str:
        return f"EPLB rank {self.comm.rank} pass {self.pass_no}"

    def _in_cycle(self) -> bool:
        return self.cycle is not None and self.state in ACTIVE

    def _abort(self, reason: Fault | Reason, rank: int | None = None, detail: str = "") -> None:
        if self.state not in ACTIVE:
            return  # no cycle to end (a round read while idle or suspended)
        label = reason.label
        self.stats.cycles_aborted[label] += 1
        where = f"rank {rank}, " if rank is not None else ""
        self.stats.last_abort = f"{label} ({where}pass {self.pass_no})" + (f": {detail}" if detail else "")
        log.warning("EPLB rank %d pass %d: cycle aborted: %s", self.comm.rank, self.pass_no, self.stats.last_abort)
        self.abort(reason=label)

    def _heal(self, p: int) -> None:
        """A round read at pass p shows maps that differ across ranks (whatever made them
        differ), on every rank alike: the cycle ends, and before the next forward pass every
        rank routes with the last agreed placement again, its slots holding what it names
        (core/heal.py). Blocking: one all-gather of the placements and one transfer step per
        layer that moves, on this rare path only. A heal that fails fails like a round (the
        group is rebuilt); the maps still differ, so the next round heals again."""
        if self.state in ACTIVE:
            self._abort(Reason.MAPS_DIVERGED, detail=f"maps digests differ across ranks in the round read at pass {p}")
        n, group = self.comm.world_size, self.agreement.group
        try:
            mine = torch.from_numpy(self.placement.copy())
            everyone = [torch.empty_like(mine) for _ in range(n)]
            dist.all_gather(everyone, mine, group=group)
            views = [t.numpy() for t in everyone]
            held = composite(views, self.topo)
            staged: list = [None] * n  # what each rank received in steps never committed
            dist.all_gather_object(staged, set(self.pipeline.staged_experts()), group=group)
            target, weights, lost = heal_target(self._agreed, held, views, self.topo, set().union(*staged))
            moved = self.pipeline.heal(target, weights, held, staged, group, n)
        except Exception as exc:
            raise AgreementError(f"healing the maps failed: {describe(exc)}") from exc
        self._agreed = target.copy()
        # the ended cycle's votes in flight were posted before the heal: what they show is healed
        self._draining = [r for r in self._draining if r.posted_at > p]
        self.stats.maps_healed += 1
        self.stats.heals.append((p, moved, len(lost)))
        log.warning("EPLB rank %d pass %d: routing maps differed across ranks; healed to the last agreed placement "
                    "(%d layers' weights moved)", self.comm.rank, p, moved)
        if lost:
            log.critical("EPLB rank %d pass %d: experts (layer, expert) held by no slot any more, mapped to slots "
                         "holding other weights until the next weight update: %s", self.comm.rank, p, lost[:8])

    def _suspend(self, reason: Fault | Reason, rank: int | None = None, detail: str = "") -> None:
        """Pause rebalancing for a transient cause (the table's `suspend`), decided from a
        round every rank read alike: the cycle in flight ends first; after a back-off the
        ranks vote to resume."""
        if self.phase in ("suspended", "disabled"):
            return
        if self.state in ACTIVE:
            self._abort(reason, rank, detail)
        self.trigger.disarm()
        self.faults.clear()  # the ended cycle's: the resume vote carries none
        if reason is Reason.WEIGHT_UPDATE_SKEW:
            self._weights_base = self.stats.weight_updates  # counted afresh from this pass, on every rank
        self._suspensions += 1
        self.stats.suspensions[reason.label] += 1
        self.suspended_reason = reason.label + (f": {detail}" if detail else "")
        self._resume_round = None
        self.resume_at = self.pass_no + self._backoff()
        self.suspend(reason=reason.label)
        log.warning(
            "EPLB rank %d pass %d: rebalancing suspended (%s); serving continues on the placement in force; "
            "the ranks vote to resume at pass %d", self.comm.rank, self.pass_no, self.suspended_reason, self.resume_at,
        )

    def _disable(self, reason: Fault | Reason, exc: BaseException | None = None, rank: int | None = None, detail: str = "") -> None:
        """Stop rebalancing (the table's `disable`): the cycle in flight ends first."""
        if not self.enabled:
            return
        if exc is not None:
            detail = describe(exc)
        self.disabled_reason = reason.label + (f": {detail}" if detail else "")
        if self.state in ACTIVE:
            self._abort(reason, rank, detail)
        self.trigger.disarm()  # a watch in progress: recording stops with it
        self.disable(reason=reason.label)
        log.warning(
            "EPLB rank %d pass %d: rebalancing disabled (%s); serving continues on the placement in force",
            self.comm.rank, self.pass_no, self.disabled_reason,
        )

    # ------------------------------------------------------------------ end of cycle

    def _on_enter_idle(self, event) -> None:
        """The table's callback for every way back to idle: keep what may still be in
        flight, reset, schedule the next cycle."""
        c = self.cycle
        if c is None:
            return
        self._draining += self.pipeline.votes  # paired on every rank: read when due, for their maps digest
        self.pipeline.end()
        self.planner.discard()
        # a decided cycle leaves a promise the load trigger holds the load to (core/load_trigger.py)
        promise = {"finish": "predicted_balancedness", "skip": "current_balancedness"}.get(event.event.name)
        if promise:  # a decided cycle: the transient troubles behind any back-off are over
            self._timeouts_in_row = self._suspensions = 0
        if promise and c.plan is not None:
            self.trigger.arm(getattr(c.plan, promise), c.started_at, self.pass_no)
        else:
            self.trigger.disarm()
        self.cycle = None
        self.next_cycle_at = max(c.started_at + self.config.step_interval, self.pass_no + 1)

    def _record_placement(self, event) -> None:
        """The table's callback before a cycle's decided ends (finish, skip): rank 0 writes
        the placement in force and its window's load, off the forward loop."""
        path = self.config.record_placement_path
        if not path or self.comm.rank != 0:
            return
        rec = PlacementRecord(
            self.placement.copy(), self.cycle.window_load, self.topo.num_ranks, self.topo.num_logical,
            self.planner.policy.name, self.pass_no,
        )
        self._recorder.submit(save, rec, path)

    def _on_transition(self, event) -> None:
        # bound here, not looked up per pass: the idle and collecting passes cost microseconds
        self._tick_phase = getattr(self, PHASE_WORK[self.phase].tick)
        source, dest = top_state(event.transition.source), top_state(event.transition.dest)
        trigger = event.event.name
        reason = event.kwargs.get("reason", "")
        log.debug("EPLB rank %d pass %d: %s -> %s (%s)", self.comm.rank, self.pass_no, event.transition.source, event.transition.dest, trigger)
        if source == dest and trigger != "next_layer":
            return  # a phase change inside a state: not an operator-visible transition
        layer = self.layer
        rec = TransitionRecord(self.pass_no, trigger, source, dest, layer, reason)
        self.stats.history.append(rec)
        self.transitions_total += 1
        log.info(
            "EPLB rank %d pass %d: %s -> %s%s%s",
            self.comm.rank, self.pass_no, source, dest,
            f" (layer {layer})" if dest == "transferring" else "",
            f" ({reason})" if reason else "",
        )
