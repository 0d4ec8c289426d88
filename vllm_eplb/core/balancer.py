"""The balancer: the conductor. `Balancer.tick()` runs once after every forward pass (and
`catch_up()` before one): it processes every pass its pass clock counted (core/pass_clock.py)
and runs what `PHASE_WORK` (core/state_machine.py, beside the transitions) names for the phase
it is in; the table's triggers are its methods. The work itself lives in its parts:

  cycle.py        idle and collecting: a cycle's start, its window, its end and the next one
  plan_rounds.py  planning and syncing: the load, readiness and digest rounds
  transferring.py transferring: the pipeline's commits, steps and votes (core/pipeline.py)
  suspension.py   suspended: the back-off and the resume vote
  votes.py        what every round carries, the checks every read gets
  ends.py         abort, disable, a fault read, a round failed, a pass whose work raised
  heal.py         maps that differ across ranks, healed to the last agreed placement

How it all fits, the pass timeline of a cycle and the invariants: docs/architecture.md.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from operator import attrgetter
from typing import Any, Callable

import numpy as np
import torch

from .agreement import PROTOCOL, Agreement, AgreementError
from .config import BalancerConfig
from .cost_model import CostModel, expert_size
from .cycle import Cycle, Cycles
from .ends import Ends
from .faults import Fault, LocalFaults, ProtocolMismatch
from .heal import Healing
from .load_trigger import LoadTrigger
from .load_window import LoadWindow
from .pass_clock import PassClock
from .pipeline import TransferPipeline
from .placement import Topology
from .plan_rounds import PlanRounds
from .planner import Planner
from .policies import Policy, get_policy
from .protocol import startup_check
from .routing_maps import RoutingMaps
from .state_machine import ACTIVE, PHASE_WORK, attach_machine, top_state
from .stats import BalancerStats, TransitionRecord
from .suspension import Suspension
from .transfer import TransferBackend, TransferEngine
from .transfer.backend import DeferredBackend, NoBackend
from .transferring import Transferring
from .votes import Votes

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


class Balancer:
    # set by transitions: the full nested state, e.g. "planning_waiting"
    phase: str
    cycle: Cycle | None  # the cycle in flight (core/cycle.py), None while idle, suspended or disabled

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
        self._early = -1  # a pass a weight update processed before its tick came: that tick is no extra one
        self._weights_pass = -1  # the pass clock when the last weight update came
        self.faults = LocalFaults(comm.rank, self.stats.local_faults, self._where, self._in_cycle)

        self.window = LoadWindow(
            layout.pass_load, config.window_size, layout.record_flag, layout.max_pass_tokens, ranks=self.topo.num_ranks
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
        # the parts (see the module docstring); each reads the balancer's shared state through it
        self.votes = Votes(self)
        self.healing = Healing(self)
        self.ends = Ends(self)
        self.suspension = Suspension(self)
        self.cycles = Cycles(self)
        self.plan_rounds = PlanRounds(self)
        self.transferring = Transferring(self)
        self.trigger = LoadTrigger(
            config, self.topo, self.agreement, self.window, comm.rank, comm.world_size, self.stats,
            self.votes.common, self.votes.read, layout.load_copies,
        )
        self.cycle = None
        self.machine = attach_machine(self, self._on_transition)
        self._tick_phase = self.cycles.tick_idle  # this phase's PHASE_WORK tick, bound at every state change
        refused = startup_check(config, layout, comm, clock, self.placement, PROTOCOL, shared or {})
        if refused:
            reason, detail = refused
            self.ends.disable(reason, detail=detail)
        agreed = refused is None
        if isinstance(comm.backend, DeferredBackend):
            comm.backend = comm.backend.build() if agreed else NoBackend(comm.backend.name)
        self.engine = TransferEngine(comm.backend, layout.weights_of, comm.rank)
        self.pipeline = TransferPipeline(
            self.engine, layout.maps, self.topo, self.config, self.faults, self.stats, self.votes.post
        )
        if agreed:
            self.pipeline.reserve_staging(layout.weights_of, layout.num_layers, comm.rank)

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
            self.votes.skewed = True
            return
        self._catch_up_to(now)

    def catch_up(self) -> None:
        """Before a forward pass: process every pass that ran without its tick, so what
        was decided for them is in force before this pass runs. Cheap when up to date."""
        now = self.clock.now()
        if now > self.pass_no:
            self.stats.missed_ticks += 1  # the last pass's tick never came
            self.votes.skewed = True
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
        self.cycles.recorder.shutdown(wait=True)
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
            self.votes.skewed = True
        while self.pass_no < now:
            self._run(self.pass_no + 1)

    def _run(self, p: int) -> None:
        """One pass: the phase's work (PHASE_WORK). Every handler decides (schedule
        arithmetic, transitions from votes) before it does fallible local work, which it
        catches into this rank's fault; an exception that escapes anyway is a bug, voted like
        any fault, and its pass retried or the rank muted (core/ends.py). No rank stops
        rebalancing alone."""
        self.pass_no = p
        posts, muted = self.agreement.posts, self.agreement.muted
        if self.healing.draining:
            self.healing.drain(p)
        try:
            self._tick_phase(p)
        except (AgreementError, ProtocolMismatch) as exc:
            self.ends.lost_agreement(exc)
        except Exception as exc:
            self.ends.pass_failed(p, exc, posts, muted)

    def phase_method(self, name: str) -> Callable:
        """A method `PHASE_WORK` names: the balancer's own (`_tick_round`) or one of its
        parts' (`suspension.tick`)."""
        return attrgetter(name)(self)

    def _tick_disabled(self, p: int) -> None:
        """Rebalancing stopped: serving goes on on the placement in force."""

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
            v = self.votes.read(r, p)
            if v is None:
                return
            self.phase_method(read)(p, v)
            if self.cycle is None:
                return  # the cycle ended
        post = PHASE_WORK[self.phase].post
        if c.round is None and p >= c.post_at and post:
            self.phase_method(post)(p)

    # ------------------------------------------------------------------ the table's callbacks

    def _where(self) -> str:
        return f"EPLB rank {self.comm.rank} pass {self.pass_no}"

    def _in_cycle(self) -> bool:
        return self.cycle is not None and self.state in ACTIVE

    def _on_enter_idle(self, event) -> None:
        """Every way back to idle (core/cycle.py)."""
        self.cycles.ended(event)

    def _record_placement(self, event) -> None:
        """Before a cycle's decided ends, finish and skip (core/cycle.py)."""
        self.cycles.record(event)

    def _on_transition(self, event) -> None:
        # bound here, not looked up per pass: the idle and collecting passes cost microseconds
        self._tick_phase = self.phase_method(PHASE_WORK[self.phase].tick)
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
