"""The balancer: what each state does on a tick.

`tick()` is called once after every forward pass. It does a few microseconds of
work in idle and collecting, and in the other states only polls: the planner
runs on its thread, agreement rounds and transfers are non-blocking collectives
read a fixed number of passes after they were posted. The forward loop waits
only when such a result is read and is not there yet; every such wait is timed.

Pass timeline of one cycle (L = agreement lag, all numbers relative):
  c            idle -> collecting            (pass counter)
  c+W          collecting -> planning        window summed, copy to host started
  c+W+1        post load all-reduce (SUM)
  c+W+1+L      read it, submit plan; post readiness round
  every L      read readiness round; when every rank has a plan: -> syncing, post digest round
  s+L          read digest round: -> transferring (first step started) | skip | abort
  t            step started: sends/receives of `layers_per_pass` layers posted
  t+1          this rank's data waited for; commit round posted (ok / failed)
  t+1+L        read commit round: commit weights + maps, start the next step | abort
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from .agreement import Agreement, AgreementError, Round, read_any, read_equal, vote_all, vote_any, vote_equal
from .config import BalancerConfig
from .load_window import HostSnapshot, LoadWindow
from .placement import (
    RoutingMaps,
    Topology,
    balancedness_of,
    observed_rank_loads,
    physical_to_logical_load,
    predicted_balancedness,
)
from .planner import Plan, Planner
from .records import PlacementRecord, save
from .policies import Policy, get_policy
from .state_machine import attach_machine
from .stats import BalancerStats, TransitionRecord
from .transfer import InFlightStep, TransferBackend, TransferEngine, TransferError, plan_layer
from .transfer.backend import padded

# A child of vLLM's logger: inside vLLM the lines go through its handlers and format.
log = logging.getLogger("vllm.eplb")


@dataclass
class MoELayout:
    """What the balancer needs from the model."""

    topo: Topology
    num_layers: int
    pass_load: torch.Tensor  # (layers, physical) int64: the router adds tokens per slot into it
    maps: RoutingMaps  # updated in place at commit
    weights_of: Callable[[int], list[torch.Tensor]]  # layer -> this rank's expert tensors (local slots, ...)
    record_flag: torch.Tensor | None = None  # bool scalar the router checks before recording load


@dataclass
class Comm:
    rank: int  # rank inside the expert-parallel group
    world_size: int
    agreement_group: Any  # gloo group (None when world_size == 1)
    backend: TransferBackend


class PassMismatch(RuntimeError):
    """Ranks posted the same round at different pass numbers: a rank missed a tick."""


class Balancer:
    # set by transitions.Machine
    state: str

    def __init__(self, config: BalancerConfig, layout: MoELayout, comm: Comm, policy: Policy | None = None):
        self.config = config
        self.layout = layout
        self.comm = comm
        self.topo = layout.topo
        self.stats = BalancerStats()
        self.pass_no = 0
        self.layer = -1  # next layer to move while transferring
        self.transitions_total = 0
        self.disabled_reason = ""
        self.placement = layout.maps.phy2log.cpu().numpy().copy()
        self.initial_placement = self.placement.copy()  # the baseline of the "initial" balancedness

        self.window = LoadWindow(layout.pass_load, config.window_size, layout.record_flag)
        self.planner = Planner(policy or get_policy(config.policy, tolerance=config.min_move_tolerance), self.topo, config.planner)
        self.agreement = Agreement(comm.agreement_group, comm.world_size, config.agreement_lag)
        self.engine = TransferEngine(comm.backend, layout.weights_of, comm.rank)
        # A step moves at most every local slot of layers_per_pass layers: the staging bound.
        per_layer = max(
            sum(padded(w.numel() * w.element_size()) for w in layout.weights_of(layer)) for layer in range(layout.num_layers)
        )
        comm.backend.prepare(layout.weights_of(0), config.layers_per_pass * per_layer + (1 << 20))  # + message padding
        self._recorder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="eplb-record")
        self._window_load: np.ndarray | None = None

        # The first window ends at step_interval, as upstream's first rearrangement does.
        self.cycle_start = 0
        self.next_cycle_at = max(0, config.step_interval - config.window_size)
        self._reset_cycle()
        self._handlers = {
            "idle": self._tick_idle,
            "collecting": self._tick_collecting,
            "planning": self._tick_planning,
            "syncing": self._tick_syncing,
            "transferring": self._tick_transferring,
        }
        self.machine = attach_machine(self, self._on_transition)

    # ------------------------------------------------------------------ public

    def tick(self) -> None:
        """Advance by one forward pass. Never raises: failures end the cycle."""
        self.pass_no += 1
        try:
            self._handlers[self.state](self.pass_no)
        except (AgreementError, PassMismatch) as exc:
            # A failed round fails on every rank that posted it (gloo tears the pairs
            # down), and a pass mismatch is read identically everywhere: every rank
            # gets here at the same round. The group or the pass count can no longer
            # be trusted, so rebalancing stops on every rank, placement as it is.
            reason = "pass_mismatch" if isinstance(exc, PassMismatch) else "agreement_timeout"
            self._disable(reason, exc)
        except Exception as exc:
            # A bug on this rank. Its peers will wait for rounds it no longer posts,
            # time out and stop too; stop here now rather than run on out of step.
            self._disable("internal_error", exc)

    @property
    def enabled(self) -> bool:
        return not self.disabled_reason

    def shutdown(self) -> None:
        self.planner.shutdown()
        self._recorder.shutdown(wait=True)

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
                dist.barrier(group=self.comm.agreement_group)
            self.engine.commit(step)
            self.layout.maps.write_layer(layer, new_placement[layer], self.topo)
            self.placement[layer] = new_placement[layer]
            moved += 1
        return moved

    # ------------------------------------------------------------------ states

    def _tick_idle(self, p: int) -> None:
        if p >= self.next_cycle_at and self.enabled:
            self.stats.cycles_started += 1
            self.cycle_start = p
            self.start_collecting()
            self.window.reset()  # load recorded while idle is not part of the window

    def _tick_collecting(self, p: int) -> None:
        self.window.record_pass()
        if self.window.full:
            self._window_end = p
            self._snapshot = self.window.snapshot_to_host()
            self.start_planning()

    def _tick_planning(self, p: int) -> None:
        if self._load_round is None:
            # One pass after the window's end the device->host copy is long done.
            load = self._snapshot.wait()
            self._load_round = self.agreement.post(load, p, op=dist.ReduceOp.SUM)
            return
        if not self._plan_submitted:
            if p < self._load_round.due_at:
                return
            physical = self._load_round.result().numpy().astype(np.float64)
            observed = balancedness_of(observed_rank_loads(physical, self.topo))
            self.stats.balancedness_observed = observed
            self.stats.observed_history.append((self._window_end, observed))
            log.info(
                "EPLB rank %d pass %d: window of %d passes, %d expert-token loads, balancedness %.3f",
                self.comm.rank, p, self.config.window_size, int(physical.sum()), observed,
            )
            logical = physical_to_logical_load(physical, self.placement, self.topo.num_logical)
            self._window_load = logical
            self.stats.balancedness_initial = predicted_balancedness(self.initial_placement, logical, self.topo)
            self.planner.submit(logical, self.placement)
            self._plan_submitted = True
            self._post_readiness(p)
            return
        if p < self._round.due_at:
            return
        ready, ok, expired = self._read_vote(3)
        if not ok:
            return self._abort("planner_error", self._plan_error)
        if read_any(expired):
            return self._abort("planning_timeout", None)
        if ready:
            self.plan_agreed()
            self._post_digest(p)
        else:
            self._post_readiness(p)

    def _tick_syncing(self, p: int) -> None:
        if p < self._round.due_at:
            return
        v = self._read_vote(5)
        same = read_equal(v[0:2]) and read_equal(v[2:4])
        worth = v[4] == 1
        if not same:
            return self._abort("plan_mismatch", None)
        plan = self._plan
        log.info(
            "EPLB rank %d pass %d: plan (%s, %.1f ms) balancedness %.3f -> %.3f predicted, %d slots to move",
            self.comm.rank, p, self.planner.policy.name, plan.plan_seconds * 1e3,
            plan.current_balancedness, plan.predicted_balancedness, plan.moved_slots,
        )
        self.stats.balancedness_current = plan.current_balancedness
        self.stats.balancedness_predicted = plan.predicted_balancedness
        self.stats.last_plan_moved_slots = plan.moved_slots
        if not worth:
            self.stats.cycles_skipped["insufficient_improvement"] += 1
            return self.skip(reason="insufficient_improvement")
        self._layers_to_move = [
            layer for layer in range(self.layout.num_layers) if (plan.placement[layer] != self.placement[layer]).any()
        ]
        self.layer = self._layers_to_move[0]
        self.start_transfer()
        self._start_step(p)

    def _tick_transferring(self, p: int) -> None:
        step = self._step
        if self._round is None:
            if p < self._step_started_at + 1:
                return
            # Vote whether this rank's data is complete. The poll never blocks: a step
            # slower than one pass is voted not-ready and polled again next round, so
            # the forward loop never waits on a copy.
            ready, ok = 1, 1
            try:
                if step.handle.done():
                    self.engine.finish(step)
                elif time.perf_counter() - step.started > self.config.transfer_timeout_s:
                    raise TransferError(f"step not complete after {self.config.transfer_timeout_s:.0f} s")
                else:
                    ready = 0
            except Exception as exc:  # TransferError, or anything local: vote it
                ok = 0
                self._transfer_error = exc
            self._round = self._vote([ready, ok], p)
            return
        if p < self._round.due_at:
            return
        ready, ok = self._read_vote(2)
        if ok != 1:
            return self._abort("transfer_error", self._transfer_error)
        if ready != 1:
            self._round = None  # someone is still receiving: poll again
            return
        self._commit(step)
        if self._layers_to_move:
            self.layer = self._layers_to_move[0]
            self.next_layer()
            self._start_step(p)
        else:
            self.stats.cycles_completed += 1
            self.stats.cycle_passes.append(p - self._window_end)
            self.finish()

    # ------------------------------------------------------------------ helpers

    def _vote(self, values: list[int], p: int) -> Round:
        """Post a MIN vote round carrying the pass number, so a rank out of step is caught."""
        return self.agreement.post([*values, *vote_equal(p)], p)

    def _read_vote(self, n: int) -> list[int]:
        """The first n values of the current vote round, once the pass numbers agree."""
        v = self._round.result()
        if not read_equal(v[n : n + 2]):
            raise PassMismatch(
                f"round posted at pass {self._round.posted_at} on this rank was posted at another pass elsewhere"
            )
        return [int(x) for x in v[:n]]

    def _post_readiness(self, p: int) -> None:
        ready, ok = self.planner.done(), True
        if ready and self._plan is None:
            try:
                self._plan = self.planner.result()
                self.stats.last_plan_seconds = self._plan.plan_seconds
                self.stats.plan_seconds.append(self._plan.plan_seconds)
            except Exception as exc:
                ok, self._plan_error = False, exc
        expired = not ready and self.planner.seconds_running() > self.config.planning_timeout_s
        self._round = self._vote([vote_all(ready), vote_all(ok), vote_any(expired)], p)

    def _post_digest(self, p: int) -> None:
        plan = self._plan
        worth = plan.improvement >= self.config.improvement_threshold and plan.moved_slots > 0
        d0, d1 = plan.digest
        self._round = self._vote([*vote_equal(d0), *vote_equal(d1), vote_all(worth)], p)

    def _start_step(self, p: int) -> None:
        n = self.config.layers_per_pass
        layers, self._layers_to_move = self._layers_to_move[:n], self._layers_to_move[n:]
        plans = [plan_layer(layer, self.placement[layer], self._plan.placement[layer], self.topo) for layer in layers]
        self._step = self.engine.start(plans)
        self._step_started_at = p
        self._round = None

    def _commit(self, step: InFlightStep) -> None:
        self.engine.commit(step)
        for job in step.jobs:
            layer = job.plan.layer
            row = self._plan.placement[layer]
            self.layout.maps.write_layer(layer, row, self.topo)
            self.placement[layer] = row
        r = step.result
        s = self.stats
        s.layers_committed += len(step.jobs)
        s.experts_moved += r.experts_received
        s.bytes_moved += r.bytes_received
        s.bytes_sent += r.bytes_sent
        s.last_layer_transfer_seconds = r.seconds / max(1, len(step.jobs))
        s.transfer_seconds.append(r.seconds)
        s.transfer_layers.append(len(step.jobs))
        s.max_staging_bytes = max(s.max_staging_bytes, r.staging_bytes)

    def _abort(self, reason: str, exc: BaseException | None) -> None:
        self.stats.cycles_aborted[reason] += 1
        detail = f": {type(exc).__name__}: {exc}" if exc is not None else ""
        log.error("EPLB rank %d pass %d: cycle aborted (%s)%s", self.comm.rank, self.pass_no, reason, detail)
        if self.state != "idle":
            self.abort(reason=reason)
        else:
            self._reset_cycle()

    def _disable(self, reason: str, exc: BaseException) -> None:
        self.disabled_reason = f"{reason}: {exc}"
        self._abort(reason, exc)
        log.error(
            "EPLB rank %d pass %d: rebalancing disabled (%s); serving continues on the placement in force",
            self.comm.rank,
            self.pass_no,
            reason,
        )

    def _record_placement(self) -> None:
        """Rank 0 writes the placement in force and its window's load, off the forward loop."""
        path = self.config.record_placement_path
        if not path or self.comm.rank != 0:
            return
        rec = PlacementRecord(
            self.placement.copy(), self._window_load, self.topo.num_ranks, self.topo.num_logical,
            self.planner.policy.name, self.pass_no,
        )
        self._recorder.submit(save, rec, path)

    def _reset_cycle(self) -> None:
        self._snapshot: HostSnapshot | None = None
        self._load_round: Round | None = None
        self._round: Round | None = None
        self._plan_submitted = False
        self._plan: Plan | None = None
        self._plan_error: BaseException | None = None
        self._transfer_error: BaseException | None = None
        self._layers_to_move: list[int] = []
        self._step: InFlightStep | None = None
        self._step_started_at = -1
        self._window_end = -1
        self.planner.discard()
        self.layer = -1

    def _on_transition(self, event) -> None:
        reason = event.kwargs.get("reason", "")
        rec = TransitionRecord(
            self.pass_no, event.event.name, event.transition.source, event.transition.dest, self.layer, reason
        )
        self.stats.history.append(rec)
        self.transitions_total += 1
        log.info(
            "EPLB rank %d pass %d: %s -> %s%s%s",
            self.comm.rank,
            self.pass_no,
            rec.source,
            rec.dest,
            f" (layer {self.layer})" if rec.dest == "transferring" else "",
            f" ({reason})" if reason else "",
        )
        if rec.dest == "idle":
            if rec.trigger in ("finish", "skip"):
                self._record_placement()
            self._reset_cycle()
            self.next_cycle_at = max(self.cycle_start + self.config.step_interval, self.pass_no + 1)
