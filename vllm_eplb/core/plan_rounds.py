"""The rounds from a closed window to one plan on every rank: planning and syncing.

`PHASE_WORK` (core/state_machine.py) names these methods as each phase's `post` and `read`;
the balancer's `_tick_round` runs them when due:

  planning_reducing  post_load: the window's load, SUM over ranks (LoadLayout: every rank's
                     fault, pass and clock at its own index); read_load: -> planning_waiting,
                     the window's figures, the plan submitted to the planner (core/planner.py)
  planning_waiting   post_readiness: this rank has its plan (or planning_timeout_s passed);
                     read_readiness: every rank has it -> syncing; a rank still planning:
                     vote again now; expired: abort
  syncing            post_digest: the plan's digest and whether it is worth moving;
                     read_digest: digests differ -> abort; not worth it -> skip; else the
                     pipeline begins and the first step starts (-> transferring)
"""

from __future__ import annotations

import logging

import numpy as np
import torch.distributed as dist

from .agreement import DIGEST, READINESS, LoadLayout
from .faults import Fault, Reason, fault_of
from .pass_balance import pass_figures
from .placement import balancedness_of, observed_rank_loads, physical_to_logical_load, predicted_balancedness
from .planner import PlannerDead
from .planner_process import PlannerExited

log = logging.getLogger("vllm.eplb")


class PlanRounds:
    def __init__(self, b):
        self.b = b
        self.initial_placement = b.placement.copy()  # the baseline of the "initial" balancedness
        sampler = b.window.sampler
        self.load_layout = LoadLayout(
            tuple(b.layout.pass_load.shape), (sampler.samples, sampler.layers, sampler.ranks), b.comm.world_size
        )

    # ---- planning_reducing

    def post_load(self, p: int) -> None:
        b = self.b
        c = b.cycle
        load = per_pass = None
        if c.snapshot is not None:
            try:
                load, per_pass = c.snapshot.wait()
            except Exception as exc:
                b.faults.report(Fault.INTERNAL_ERROR, exc)
                c.snapshot.routed = 0  # a copy that failed says nothing of what the layers recorded
        if load is None:
            load, per_pass = self.load_layout.zeros()
        common = b.votes.common()
        sent = self.load_layout.encode(load, per_pass, b.comm.rank, b.votes.take_fault(), p, common["clock"],
                                       common["maps"])
        c.round = b.agreement.post(sent, p, op=dist.ReduceOp.SUM, layout=self.load_layout)
        c.round.sent = common

    def read_load(self, p: int, v) -> None:
        b = self.b
        c = b.cycle
        # Decided from the round alone, so every rank moves on here; the local work
        # below can fail only into this rank's next vote.
        b.load_reduced()
        c.post_at = p + 1  # first readiness vote next pass: a fast plan is ready by then
        try:
            physical = v.load.numpy().astype(np.float64)
            if c.snapshot is not None and c.snapshot.routed and not physical.any():
                self._nothing_recorded(p, c.snapshot.routed)
            if c.carried is not None:
                physical = physical + c.carried.load  # the rest of the window: the watch's (core/load_trigger.py)
            observed = balancedness_of(observed_rank_loads(physical, b.topo))
            b.stats.balancedness_observed = observed
            b.stats.observed_history.append((c.window_end, observed))
            passes = pass_figures(v.per_pass.numpy())
            b.stats.balancedness_pass = passes.pass_balancedness
            b.stats.balancedness_sampled = passes.window_balancedness
            b.stats.straggler_share = passes.straggler_share
            log.info(
                "EPLB rank %d pass %d: window of %d passes (%d of them routed tokens here), %d expert-token loads, "
                "balancedness %.3f over the window, %.3f per pass (%d passes sampled, %.3f summed; stragglers cost "
                "%.1f%% of MoE time)",
                b.comm.rank, p, b.config.window_size, c.snapshot.routed if c.snapshot is not None else 0,
                int(physical.sum()), observed,
                passes.pass_balancedness, passes.passes, passes.window_balancedness, 100 * passes.straggler_share,
            )
            logical = physical_to_logical_load(physical, b.placement, b.topo.num_logical)
            c.window_load = logical
            b.stats.balancedness_initial = predicted_balancedness(self.initial_placement, logical, b.topo)
            restarts = b.planner.restarts
            try:
                b.planner.submit(logical, b.placement, b.config.window_size * b.layout.load_copies)
            finally:
                b.stats.planner_restarts += b.planner.restarts - restarts
        except PlannerDead as exc:
            b.faults.report(Fault.PLANNER_DEAD, exc)
        except Exception as exc:
            b.faults.report(fault_of(exc, Fault.PLANNER_ERROR), exc)

    def _nothing_recorded(self, p: int, routed: int) -> None:
        """This rank routed real tokens in `routed` passes of the window and no rank's MoE layers
        recorded any load: the model's MoE layers do not report their routed tokens to EPLB (a
        class vllm-eplb does not know how to wire), so every plan sees no load and nothing is
        ever balanced. Said once in the log, counted every window (vllm:eplb_unrecorded_windows)."""
        b = self.b
        b.stats.unrecorded_windows += 1
        if b.stats.unrecorded_windows == 1:
            log.warning(
                "vllm-eplb rank %d pass %d: %d passes of the last window routed tokens and no rank's MoE layers "
                "recorded any expert load: this model's MoE layers do not report their routed tokens to EPLB, "
                "so nothing can be balanced (the server keeps serving; please report the model's architecture)",
                b.comm.rank, p, routed,
            )

    # ---- planning_waiting

    def post_readiness(self, p: int) -> None:
        b = self.b
        c = b.cycle
        ready = False
        expired = False
        try:
            ready = b.planner.done()
            if ready and c.plan is None:
                c.plan = b.planner.result()
                b.stats.last_plan_seconds = c.plan.plan_seconds
                b.stats.plan_seconds.append(c.plan.plan_seconds)
                b.stats.plans_total += 1
            expired = not ready and b.planner.seconds_running() > b.config.planning_timeout_s
        except PlannerExited as exc:
            b.faults.report(Fault.PLANNER_DIED, exc)
        except Exception as exc:  # the policy's exception, re-raised by result()
            b.faults.report(Fault.PLANNER_ERROR, exc)
        b.votes.post_cycle(READINESS, p, ready=ready, expired=expired)

    def read_readiness(self, p: int, v) -> None:
        b = self.b
        if v.expired:
            b.planner.cancel()  # the plan still computing: stopped, a fresh planner for the next cycle
            return b.ends.abort(Fault.PLANNING_TIMEOUT)
        if not v.ready:
            b.cycle.post_at = p  # a rank is still planning: vote again now (no transition)
            return
        b.plan_agreed()
        b.cycle.post_at = p

    # ---- syncing

    def post_digest(self, p: int) -> None:
        b = self.b
        plan = b.cycle.plan
        d0, d1 = plan.digest if plan is not None else (0, 0)
        worth = plan is not None and plan.improvement >= b.config.improvement_threshold and plan.moved_slots > 0
        b.votes.post_cycle(DIGEST, p, digest_a=d0, digest_b=d1, worth=worth)

    def read_digest(self, p: int, v) -> None:
        b = self.b
        c = b.cycle
        if not (v.digest_a[1] and v.digest_b[1]):
            return b.ends.abort(Reason.PLAN_MISMATCH)
        plan = c.plan  # every rank voted ready with this digest: the plan is here
        b.stats.balancedness_current = plan.current_balancedness
        b.stats.balancedness_predicted = plan.predicted_balancedness
        b.stats.pass_seconds_current = plan.current_seconds
        b.stats.pass_seconds_predicted = plan.predicted_seconds
        b.stats.last_plan_moved_slots = plan.moved_slots
        log.info(
            "EPLB rank %d pass %d: plan (%s, %.1f ms) balancedness %.3f -> %.3f predicted, %d slots to move",
            b.comm.rank, p, b.planner.policy.name, plan.plan_seconds * 1e3,
            plan.current_balancedness, plan.predicted_balancedness, plan.moved_slots,
        )
        if not v.worth:
            skipped = Reason.INSUFFICIENT_IMPROVEMENT.label
            b.stats.cycles_skipped[skipped] += 1
            return b.skip(reason=skipped)
        b.pipeline.begin(c.number, plan.placement)
        b.start_transfer()
        b.pipeline.start(p)
