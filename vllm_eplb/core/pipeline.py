"""The transfer pipeline: a cycle's steps from their start to their commit, and the health of
the transfer group across cycles.

A step moves `layers_per_pass` layers. While the balancer is transferring, every pass:
`read` the commit vote posted `agreement_lag` passes ago and commit every step all ranks voted
ready; `start` a step while fewer than `max_in_flight` are in flight; `poll` the steps in
flight; `vote` which of them this rank has ready. A step goes live 1 + agreement_lag passes
after it started at the earliest, and with agreement_lag + 1 in flight one starts every pass;
`max_in_flight` caps that at MAX_IN_FLIGHT (6, the width of a commit vote), so from
agreement_lag 6 on a step starts on fewer than every pass.

A step on this rank is in one of these states (`StepState`):

    (start) --> MOVING --> PREPARED --> committed (leaves the pipeline)
                  |
                  +-----> FAILED        (finishing failed here: never voted ready)
    (start fails, or this rank stopped posting) --> NOT_POSTED

PREPARED means everything the commit allocates is done (data in, snapshots of local sources,
the maps staged), so the commit only copies into existing memory. A start that fails leaves
the peers' messages to and from this rank pending; starting later steps would pair their
messages with those, so the pipeline stops posting for the rest of the cycle (`posting`). When
a cycle ends, every step still in the pipeline is dropped: its staging is released once its
messages are done. The transfer group itself is HEALTHY or BROKEN (`GroupHealth`): broken when
a step's messages failed on the group (gloo tears its pairs down on a timeout or a lost peer),
when this rank failed to post a step its peers posted, or a dropped step's messages are still
pending past `transfer_timeout_s` (addressed to a rank
that never posted its side: they would pair with a later step's; a slow step dropped by an
unrelated abort is only slow, and is released once done). Broken is a standing fault: every
vote carries TRANSFER_GROUP_BROKEN, which suspends rebalancing on every rank; the group is
healthy again (`recover`, at the resume vote) once no dropped step is pending.

Every failure is reported through `LocalFaults` (core/faults.py) and travels in the next vote;
the pipeline never decides a transition itself. It raises only what every rank reads alike
(`ProtocolMismatch` for a step held as other layers elsewhere) or what leaves this rank's layer
in an unknown state (`CommitFailed`).
"""

from __future__ import annotations

import enum
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from .agreement import COMMIT, MAX_IN_FLIGHT, Round, layers_digest
from .config import BalancerConfig
from .faults import Fault, LocalFaults, ProtocolMismatch, Reason, fault_of
from .placement import Topology
from .routing_maps import RoutingMaps, StagedLayer
from .stats import BalancerStats
from .transfer import InFlightStep, TransferEngine, TransferError, plan_layer
from .transfer.backend import padded

log = logging.getLogger("vllm.eplb")

STEP_SEQ_PER_CYCLE = 1024  # message numbering: cycle * this + step, alike on every rank


class StepState(enum.Enum):
    NOT_POSTED = "not posted"
    MOVING = "moving"
    PREPARED = "prepared"
    FAILED = "failed"


class GroupHealth(enum.Enum):
    HEALTHY = "healthy"
    BROKEN = "broken"


class CommitFailed(RuntimeError):
    """A commit's copies failed part-way: this rank's layer is in an unknown state."""


@dataclass
class Step:
    """One transfer step of a cycle: layers_per_pass layers moved together."""

    seq: int
    layers: list[int]
    started_at: int
    state: StepState
    inflight: InFlightStep | None = None  # None when NOT_POSTED
    staged: list[StagedLayer] = field(default_factory=list)


class TransferPipeline:
    def __init__(
        self,
        engine: TransferEngine,
        maps: RoutingMaps,
        topo: Topology,
        config: BalancerConfig,
        faults: LocalFaults,
        stats: BalancerStats,
        post_vote: Callable[..., Round],
    ):
        """`config`: the balancer's settings (a value: set `config` to change them); `post_vote(layout, p, **values)`:
        posts a vote with the fields every vote carries (the balancer's)."""
        self.engine, self.maps, self.topo = engine, maps, topo
        self.config, self.faults, self.stats, self._post_vote = config, faults, stats, post_vote
        self.health = GroupHealth.HEALTHY
        self._dropped: list[InFlightStep] = []  # steps of ended cycles whose messages may still be pending
        self._reset()

    def _reset(self) -> None:
        self.cycle = 0
        self.target: np.ndarray | None = None  # the placement being moved to
        self.layers_to_move: list[int] = []
        self.steps: list[Step] = []  # started, not yet committed, in start order
        self.votes: list[Round] = []  # commit votes in flight, in posting order
        self.next_seq = 0
        self.posting = True  # False once a step failed to start on this rank: nothing more is posted this cycle

    @property
    def max_in_flight(self) -> int:
        """Steps in flight at once: enough to start one every pass (a step is committed
        1 + agreement_lag passes after it started, at the earliest)."""
        return min(self.config.agreement_lag + 1, MAX_IN_FLIGHT)

    # ---- start-up

    def reserve_staging(self, weights_of, num_layers: int, rank: int) -> None:
        """A step moves at most every local slot of layers_per_pass layers: the staging bound
        (+ message padding), for every step that can be in flight, reserved now."""
        backend = self.engine.backend
        per_layer = max(sum(padded(w.numel() * w.element_size()) for w in weights_of(layer)) for layer in range(num_layers))
        backend.prepare(weights_of(0), self.config.layers_per_pass * per_layer + (1 << 20), self.max_in_flight)
        if backend.reserved_bytes:
            log.info(
                "vllm-eplb rank %d: %d MB of transfer staging reserved on %s (%d steps in flight)", rank,
                backend.reserved_bytes >> 20, weights_of(0)[0].device, self.max_in_flight,
            )

    # ---- one cycle

    def begin(self, cycle: int, target: np.ndarray) -> None:
        """Move to `target`: the layers whose rows differ, in order."""
        self._reset()
        self.cycle, self.target = cycle, target
        current = self.maps.placement
        self.layers_to_move = [layer for layer in range(target.shape[0]) if (target[layer] != current[layer]).any()]

    @property
    def next_layer(self) -> int:
        """The first layer not yet committed."""
        return self.steps[0].layers[0] if self.steps else self.layers_to_move[0]

    @property
    def finished(self) -> bool:
        return not self.steps and not self.layers_to_move

    def due(self, p: int) -> Round | None:
        """The commit vote to read at pass p, if one is due (taken off the pipeline)."""
        if self.votes and p >= self.votes[0].due_at:
            return self.votes.pop(0)
        return None

    def commit_voted(self, r: Round, v, current: bool = True) -> bool:
        """Commit every step the vote `r` (decoded: `v`) shows every rank has ready. Returns
        whether any was committed. `current`: False once a weight update came during the
        cycle: nothing commits (the steps' data predates it; the vote posted since carries
        the fault that ends the cycle)."""
        if not (v.first_seq[1] and v.layers[1]):
            raise ProtocolMismatch(
                Reason.STEP_MISMATCH,
                f"commit vote posted at pass {r.posted_at} names other steps or other layers on other ranks "
                f"(here: {r.sent['steps']})",
            )
        if not current:
            return False
        first = v.first_seq[0]
        ready = {first + i for i in range(MAX_IN_FLIGHT) if getattr(v, f"ready{i}")}
        done = [s for s in self.steps if s.seq in ready]
        for step in done:
            self._commit(step)
        self.steps = [s for s in self.steps if s.seq not in ready]
        return bool(done)

    def can_start(self) -> bool:
        return bool(self.layers_to_move) and len(self.steps) < self.max_in_flight

    def start(self, p: int) -> None:
        n = self.config.layers_per_pass
        layers, self.layers_to_move = self.layers_to_move[:n], self.layers_to_move[n:]
        step = Step(self.next_seq, layers, p, StepState.NOT_POSTED)
        self.next_seq += 1
        self.steps.append(step)
        if not self.posting:
            return
        try:
            current = self.maps.placement
            plans = [plan_layer(layer, current[layer], self.target[layer], self.topo) for layer in layers]
            step.inflight = self.engine.start(plans, seq=self.cycle * STEP_SEQ_PER_CYCLE + step.seq)
            step.state = StepState.MOVING
        except Exception as exc:
            # Peers posted this step's messages to and from this rank; this rank did not.
            # Starting later steps would pair their messages with this one's: post no
            # more this cycle (it ends at the next vote read), leaving peers' pending.
            self.posting = False
            self.faults.report(fault_of(exc, Fault.TRANSFER_ERROR), exc)
            # and the peers' side of this step stays pending on the group: broken, now (its
            # standing fault travels in this very vote), not once they time out
            self.health = GroupHealth.BROKEN
            self.faults.standing(Fault.TRANSFER_GROUP_BROKEN)

    def poll(self) -> None:
        """Every step whose data is in gets its commit prepared. Never waits on a copy: a step
        whose data is not in yet is polled again next pass."""
        timeout = self.config.transfer_timeout_s
        for step in self.steps:
            if step.state is not StepState.MOVING:
                continue
            try:
                if step.inflight.handle.done():
                    self.engine.finish(step.inflight)  # returns at once; snapshots local sources
                    step.staged = [self.maps.stage_layer(layer, self.target[layer], self.topo) for layer in step.layers]
                    step.state = StepState.PREPARED
                elif time.perf_counter() - step.inflight.started > timeout:
                    raise TransferError(f"step not complete after {timeout:g} s")
            except Exception as exc:
                step.state = StepState.FAILED
                if isinstance(exc, TransferError) and exc.__cause__ is not None:
                    # the group itself failed: later steps on it would fail too, or pair stale messages
                    self.health = GroupHealth.BROKEN
                self.faults.report(fault_of(exc, Fault.TRANSFER_ERROR), exc)

    def vote(self, p: int) -> None:
        """Post this pass's commit vote: which steps in flight this rank has ready."""
        first = self.steps[0].seq
        ready = {f"ready{i}": False for i in range(MAX_IN_FLIGHT)}
        ready.update({f"ready{s.seq - first}": s.state is StepState.PREPARED for s in self.steps})
        named = [(s.seq, s.layers) for s in self.steps]
        vote = self._post_vote(COMMIT, p, first_seq=first, layers=layers_digest(named), **ready)
        vote.sent["steps"] = named
        self.votes.append(vote)

    def _commit(self, step: Step) -> None:
        """Every rank voted this step prepared: copies only, weights then maps, on this
        pass, so the next forward pass routes with the new layers everywhere."""
        inflight = step.inflight
        try:
            self.engine.commit(inflight)
            for staged in step.staged:
                self.maps.apply(staged)
        except Exception as exc:
            # Copies into existing memory do not fail short of a broken device; if they
            # do, this rank's layer is in an unknown state.
            raise CommitFailed(f"{type(exc).__name__}: {exc}") from exc
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

    def end(self) -> None:
        """The cycle ended (however): what is in flight is dropped, its messages left to finish."""
        self._dropped += [s.inflight for s in self.steps if s.inflight is not None]
        self._reset()

    # ---- across cycles

    def check_health(self) -> None:
        """Before every vote: dropped steps whose messages are done give their staging back;
        one still pending past transfer_timeout_s breaks the group (a slow step is not a
        broken one). A broken group is a standing fault in every vote."""
        timeout = self.config.transfer_timeout_s
        now = time.perf_counter()
        pending = []
        for step in self._dropped:  # done() read once: a step done now is released, not dropped
            if step.handle.done():
                step.handle.release()  # nothing writes its staging any more
                continue
            pending.append(step)
            if now - step.started > timeout:
                self.health = GroupHealth.BROKEN
        self._dropped = pending
        if self.health is GroupHealth.BROKEN:
            self.faults.standing(Fault.TRANSFER_GROUP_BROKEN)

    def recover(self) -> bool:
        """At a resume vote: healthy again once no dropped step is pending (their messages
        completed, failed or timed out: nothing left to pair with a later step's)."""
        pending = []
        for step in self._dropped:
            if step.handle.done():
                step.handle.release()
            else:
                pending.append(step)
        self._dropped = pending
        if not pending:
            self.health = GroupHealth.HEALTHY
        return self.health is GroupHealth.HEALTHY

    def staged_experts(self) -> dict[tuple[int, int], list]:
        """(layer, expert) -> tensors of every expert this rank received in a step that was
        never committed (an ended cycle's, data in): a heal's last source for an expert a
        commit made on some ranks only overwrote in every slot."""
        out: dict = {}
        for inflight in self._dropped + [s.inflight for s in self.steps if s.inflight is not None]:
            out.update(inflight.received or {})
        return out

    def heal(self, target: np.ndarray, weights: np.ndarray, held: np.ndarray, staged: list[set], group,
             world_size: int) -> int:
        """Every layer's maps to `target`, its slots to `weights`, blocking (core/heal.py): the
        weights every slot lacks, from a slot that holds them (`held`, the same on every rank)
        or else from a rank that has them staged (`staged`: per rank, its (layer, expert)
        keys), then the maps written where this rank's differ. Every rank calls it at the
        same pass. The weights travel over `group` (the agreement group), not the transfer
        backend: an ended cycle's steps may still be pending there, and a heal must not queue
        behind them. Returns the layers whose weights moved (here or on a peer)."""
        moved = 0
        mine = self.staged_experts() if any(staged) else {}
        for layer in range(target.shape[0]):
            if (weights[layer] != held[layer]).any():
                self._heal_layer(layer, held[layer], weights[layer], staged, mine, group, world_size)
                moved += 1
            if (target[layer] != self.maps.placement[layer]).any():
                self.maps.write_layer(layer, target[layer], self.topo)
        return moved

    def _heal_layer(self, layer: int, held: np.ndarray, want: np.ndarray, staged: list[set], mine: dict, group,
                    world_size: int) -> None:
        """One layer's moves as blocking sends and receives, in one order every rank computes
        (slot order; each rank waits only on moves it is part of, in that order: no cycle), then
        the writes, once every rank has what it needs."""
        rank, n = self.engine.rank, self.topo.slots_per_rank
        weights = self.engine.weights_of(layer)
        local = {}  # expert -> snapshot of a local slot holding it (a slot copied from may be overwritten)
        moves: list[tuple[int, int]] = []  # (destination rank, expert) to fetch, once each
        for slot in np.nonzero(want != held)[0]:
            dst, e = int(slot) // n, int(want[slot])
            own = np.nonzero(held[dst * n:(dst + 1) * n] == e)[0]
            if len(own):
                if dst == rank and e not in local:
                    local[e] = [w[int(own[0])].clone() for w in weights]
            elif (dst, e) not in moves:
                moves.append((dst, e))
        received: dict[int, list] = {}
        for dst, e in moves:
            holders = np.nonzero(held == e)[0]
            src = int(holders[0]) // n if len(holders) else next(r for r in range(world_size) if (layer, e) in staged[r])
            if src == rank:
                tensors = [w[int(holders[0]) - rank * n] for w in weights] if len(holders) else mine[(layer, e)]
                if dst == rank:
                    received[e] = [t.clone() for t in tensors]
                else:
                    for t in tensors:
                        dist.send(t.contiguous().cpu(), group=group, group_dst=dst)
            elif dst == rank:
                bufs = [torch.empty(w.shape[1:], dtype=w.dtype) for w in weights]
                for buf in bufs:
                    dist.recv(buf, group=group, group_src=src)
                received[e] = bufs
        if world_size > 1:
            dist.all_reduce(torch.zeros(1), group=group)  # every rank's data in before a source slot is overwritten
        for slot in range(rank * n, (rank + 1) * n):
            if want[slot] != held[slot]:
                e = int(want[slot])
                for w, src in zip(weights, local.get(e) or received[e]):
                    w[slot - rank * n].copy_(src)

    def move_now(self, target: np.ndarray, group, world_size: int) -> int:
        """Every layer to `target` now, blocking (start-up, a stop-the-world rebalance).
        Every rank calls it at the same point. Returns the layers moved."""
        moved = 0
        for layer in range(target.shape[0]):
            current = self.maps.placement
            if (target[layer] == current[layer]).all():
                continue
            step = self.engine.start([plan_layer(layer, current[layer], target[layer], self.topo)])
            self.engine.finish(step)
            if world_size > 1:
                # every rank's data is in before any rank overwrites a slot a peer may read
                dist.barrier(group=group)
            self.engine.commit(step)
            self.maps.write_layer(layer, target[layer], self.topo)
            moved += 1
        return moved
