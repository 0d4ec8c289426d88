"""The load trigger: a cycle starts early when the placement in force balances the latest load
worse than the last plan promised.

Without it a cycle starts every `step_interval` passes whatever the traffic does, so a shift
in the traffic mix waits for the next scheduled cycle. With it, the balancer watches while
idle, after a cycle that decided (completed, or skipped as not worth moving): its promise is
the balancedness the plan predicted for the placement it left in force (the plan's when
completed, the placement kept when skipped). Watch windows of `watch_passes(config)` passes
(a quarter of window_size) follow one another; each verdict judges the last four (as many passes
as the plan's window) and the last one alone (sooner, with more noise); for each:

  w          the window opens: load buffer cleared, record gate on
  w+V        it closes (V passes recorded), its sum copied to host
  w+V+1      watch round posted: the window's (layers, slots) load, SUM over ranks
  w+V+1+L    read (the same reduced load on every rank): this rank's verdict, the placement in
             force predicted on that window's load, or on the last four's, as the plan predicted
             (tokens split evenly over an expert's replicas) falls short of the promise by more than
             trigger_margin plus the sampling noise of that load (`sampling_noise`: what a
             fresh window of unchanged traffic can lose by chance); the verdict vote posted
             (TRIGGER: start, any; alone, all: that window by itself fell short)
  w+V+1+2L   the vote read: some rank's verdict, and trigger_min_spacing passes since the last
             cycle started -> a cycle starts at this pass, on every rank; else the next watch
             window opens

Invariant 1: the cycle's start is decided from the vote, a value every rank reads at the same
pass; the verdicts themselves are rank-local news (floats computed on each rank) and only
travel in the vote. A watch window opens only if its vote is read before the scheduled cycle
start, so the schedule keeps its passes. Faults belong to cycles: the watch rounds carry none
(they stay for the next cycle's first round); they carry the pass and the clock offset like
every round, so a rank off the schedule or a drifted clock stops rebalancing as in a cycle. A
rank whose window failed locally (a device error clearing, recording or copying it) keeps the
schedule and marks its load spoiled in the round: no rank judges that window. A
watch round that fails (a rank lagged past agreement_timeout_s) fails on every rank at the
same pass: the watch stops until the next cycle, the agreement group is rebuilt for it.

A load-triggered cycle reuses the watch: its load window is the last watch windows that every
rank judged short on their own (the vote's `alone`, ALL: the placement in force balances each,
alone, worse than the promise allows, so each holds the shifted traffic), up to JUDGED - 1 of
them in a row, ending with the one whose vote started it; or, where the vote started it on the
last JUDGED windows' verdict alone (no window short by itself: a smaller shift, seen only with
the noise of four windows, so most of those windows hold it), the last JUDGED - 1 windows judged
in a row. Plus as many fresh passes as make up window_size (`Carried`): the cycle's plan still
sees window_size passes of load, and collects a quarter of them or more instead of all. Which
windows are carried is decided from rounds only (their reduced load, read at one pass; the
votes' `alone` bits), so every rank collects the same number of passes and plans on the same
load. A window spoiled, a vote that failed or showed maps that differ, or a heal ends both runs
of windows (a vote not all-`alone` ends the first); a cycle on the schedule carries none.

trigger_margin 0 turns the watch off (no rounds while idle); a margin of 1 watches without
ever triggering (the observed balancedness between cycles, for /metrics and benchmarks).
"""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from .agreement import TRIGGER, Agreement, AgreementError, Round, WatchLayout
from .config import BalancerConfig
from .load_window import HostSnapshot, LoadWindow
from .placement import Topology, balancedness_of, observed_rank_loads, physical_to_logical_load, predicted_balancedness
from .stats import BalancerStats

log = logging.getLogger("vllm.eplb")


JUDGED = 4  # watch windows summed for a verdict: four quarters, the planning window's length


def watch_passes(config: BalancerConfig) -> int:
    """Passes per watch window: a quarter of the planning window. A verdict judges the last four
    (as many passes as a plan's window, so as little sampling noise), one every quarter."""
    return max(1, config.window_size // JUDGED)


def sampling_noise(physical: np.ndarray, num_ranks: int, load_copies: int = 1) -> float:
    """How far balancedness can fall on a fresh window of the same traffic by chance alone: the
    expected excess of the most loaded of R ranks over the mean, sqrt(2 ln R / n) for Poisson
    token counts of n per rank and layer: a verdict allows it on top of trigger_margin (measured
    on the rig, a placement's balancedness on a fresh window of unchanged traffic fell below its
    promise by about half of it)."""
    layers = physical.shape[0]
    n = physical.sum() / (load_copies * num_ranks * layers)
    return math.sqrt(2 * math.log(max(num_ranks, 2)) / n) if n > 0 else math.inf


@dataclass(frozen=True)
class Carried:
    """What a load-triggered cycle takes from the watch (module docstring): the watch windows'
    reduced (layers, slots) load, summed, and how many passes they recorded; the cycle collects
    window_size - passes fresh passes and plans on both."""

    load: np.ndarray
    windows: int
    passes: int


class LoadTrigger:
    """The watch while idle (module docstring). `due(p)` runs once per idle pass and says
    whether a cycle starts at p because of the load."""

    def __init__(
        self, config: BalancerConfig, topo: Topology, agreement: Agreement, window: LoadWindow, rank: int, world_size: int,
        stats: BalancerStats, common: Callable[[], dict], read_round: Callable[[Round, int], object],
        load_copies: int = 1,
    ):
        self.config, self.topo, self.agreement, self.window = config, topo, agreement, window
        self.rank, self.stats = rank, stats
        self.common, self.read_round = common, read_round  # common: clock, weights, maps (every round's fields)
        self.layout = WatchLayout(tuple(window.pass_load.shape), world_size)
        self.passes = watch_passes(config)
        self.promise: float | None = None  # None: not watching
        self.last_start = 0  # pass the last cycle started
        self.open_at = 0  # the next watch window opens at or after this pass
        self.opened = -1  # pass the current watch window opened, -1: none open
        self.filled = 0  # passes of it recorded
        self.spoiled = False  # a local failure: this rank's load for the window is not the window's
        self.snapshot: HostSnapshot | None = None
        self.recent: deque = deque(maxlen=JUDGED)  # the last watch windows' reduced loads (every rank alike)
        self.load_copies = load_copies  # ranks recording each token (MoELayout.load_copies)
        self.load_round: Round | None = None
        self.vote: Round | None = None
        # the watch windows a triggered cycle may carry (module docstring): the load of the window
        # whose vote is in flight, then the run of windows every rank judged short alone, and the
        # run of windows judged
        self.pending: np.ndarray | None = None
        carry_at_most = max(0, min(JUDGED - 1, (config.window_size - 1) // self.passes))
        self.chain: deque = deque(maxlen=carry_at_most)
        self.judged: deque = deque(maxlen=carry_at_most)
        self.heals = stats.maps_healed  # a heal since a window was read: its slots' load is of other maps
        self.carried: Carried | None = None  # set when the vote starts a cycle; taken by the balancer

    @property
    def enabled(self) -> bool:
        return self.config.trigger_margin > 0

    def arm(self, promise: float, cycle_start: int, now: int) -> None:
        """A cycle decided at `now`, leaving in force a placement predicted at `promise`."""
        self.disarm()
        if self.enabled and promise == promise:  # not NaN
            self.promise, self.last_start, self.open_at = promise, cycle_start, now + 1

    def disarm(self) -> None:
        """A cycle starts, or one ended without a decision: no promise to hold the load to."""
        if self.opened >= 0:
            self.window.gate.set_window(False)
        self.promise, self.opened, self.snapshot, self.load_round, self.vote = None, -1, None, None, None
        self.recent.clear()
        self.chain.clear()
        self.judged.clear()
        self.pending = None

    def take_carried(self) -> Carried | None:
        """The watch windows the cycle the vote just started carries (None: it collects a whole
        window); read once, by the balancer, as that cycle starts."""
        carried, self.carried = self.carried, None
        return carried

    def due(self, p: int, placement: np.ndarray, next_cycle_at: int) -> bool:
        """Idle pass p: advance the watch; True when the vote read now starts a cycle."""
        if self.promise is None:
            return False
        try:
            return self._advance(p, placement, next_cycle_at)
        except AgreementError as exc:
            # failed on every rank at this pass (agreement.py): stop watching until the next
            # cycle, whose first round waits for the rebuilt group
            log.warning("EPLB rank %d pass %d: load trigger round failed (%s); watching again after the next cycle",
                        self.rank, p, exc)
            self.disarm()
            self.agreement.rebuild()
            return False

    def _advance(self, p: int, placement: np.ndarray, next_cycle_at: int) -> bool:
        lag = self.agreement.lag
        start = False
        if self.vote is not None and p >= self.vote.due_at:
            r, self.vote = self.vote, None
            v = self.read_round(r, p)
            self._extend_chain(v)
            start = bool(v is not None and v.start) and p - self.last_start >= self.config.trigger_spacing
            if start:
                self.stats.load_triggers += 1
                self.carried = self._carry()
                log.info("EPLB rank %d pass %d: load trigger: the placement in force fell short of the plan's "
                         "promise (%.3f) by more than %.3f; a cycle starts, carrying %d watch windows (%d passes)",
                         self.rank, p, self.promise, self.config.trigger_margin,
                         self.carried.windows if self.carried else 0, self.carried.passes if self.carried else 0)
                return True
        if self.load_round is not None and p >= self.load_round.due_at:
            r, self.load_round = self.load_round, None
            v = self.read_round(r, p)
            if v is not None and v.spoiled:
                self.recent.clear()  # a window some rank could not record: no verdict on it or with it
            judged = v is not None and not v.spoiled
            # the round's load, read alike on every rank: carried if the vote shows it short alone everywhere
            self.pending = v.load.numpy().astype(np.float64) if judged else None
            short, alone = self._verdict(v, placement) if judged else (False, False)
            self.vote = self.agreement.vote(TRIGGER, dict(start=short, alone=alone, fault=0, skew=False,
                                                          **self.common()), p)
        # the schedule below is pass arithmetic only; local work that fails (the device) costs this
        # rank its load in the round, never its place in the schedule
        if self.opened >= 0:
            if self.filled >= self.passes:  # a pass after the window closed: its copy is long done
                self._post_load(p)
            else:
                self.filled += 1
                self._local(self.window.record_pass)
                if self.filled >= self.passes:
                    self.snapshot = self._local(self.window.snapshot_to_host)
        elif self.vote is None and self.load_round is None and p >= self.open_at \
                and p + self.passes + 1 + 2 * lag < next_cycle_at:
            self.opened, self.filled, self.spoiled = p, 0, False
            self._local(self.window.reset_watch)
        return False

    def _extend_chain(self, v) -> None:
        """The vote on the pending window was read (every rank alike): the window joins the runs of
        windows judged (and judged short alone), or the runs end."""
        pending, self.pending = self.pending, None
        if self.stats.maps_healed != self.heals:
            self.heals = self.stats.maps_healed
            self.chain.clear()
            self.judged.clear()
        judged = v is not None and pending is not None and pending.sum() > 0
        for run, joins in ((self.judged, judged), (self.chain, judged and v.alone)):
            if not joins:
                run.clear()
            elif run.maxlen:
                run.append(pending)

    def _carry(self) -> Carried | None:
        """The run of windows judged short alone; where the vote started the cycle on the last
        JUDGED windows' verdict (the last window not short by itself), the run of windows judged."""
        run = self.chain or self.judged
        if not run:
            return None
        return Carried(np.sum(run, axis=0), len(run), len(run) * self.passes)

    def _local(self, work):
        """Local work on the window; a failure spoils this window (every rank skips its verdict)."""
        try:
            return work()
        except Exception:
            self.spoiled = True
            log.warning("EPLB rank %d: load trigger: %s failed", self.rank, getattr(work, "__name__", work), exc_info=True)
            return None

    def _post_load(self, p: int) -> None:
        load = None
        try:
            if self.snapshot is not None and not self.spoiled:
                load, _ = self.snapshot.wait()
        except Exception:  # this rank contributes no load; the round still pairs on every rank
            log.warning("EPLB rank %d pass %d: load trigger: window copy failed", self.rank, p, exc_info=True)
        if load is None:
            load, self.spoiled = torch.zeros(self.layout.load_shape, dtype=torch.int64), True
        common = self.common()
        sent = self.layout.encode(load, self.rank, p, common["clock"], self.spoiled, common["maps"])
        self.load_round = self.agreement.post(sent, p, op=dist.ReduceOp.SUM, layout=self.layout)
        self.load_round.sent = common
        self.snapshot, self.opened, self.open_at = None, -1, p + 1

    def _verdict(self, v, placement: np.ndarray) -> tuple[bool, bool]:
        """This rank's verdict (rank-local: it only travels in the vote), (short, alone): short when the placement
        in force, predicted on the last watch window's load, or on the last JUDGED windows' (a
        plan window's worth: less noise, later), falls below the promise by more than
        trigger_margin plus the sampling noise of that much load; alone: the last window by itself
        fell that short (the vote's `alone`: a window a triggered cycle may carry)."""
        try:
            quarter = v.load.numpy().astype(np.float64)
            if quarter.sum() <= 0:
                return False, False  # no traffic: nothing to judge
            observed = balancedness_of(observed_rank_loads(quarter, self.topo))
            self.stats.balancedness_observed = observed
            self.stats.observed_history.append((v.pass_no[0], observed))
            self.recent.append(quarter)
            verdicts = []
            for physical in (quarter, np.sum(self.recent, axis=0)) if len(self.recent) == JUDGED else (quarter,):
                logical = physical_to_logical_load(physical, placement, self.topo.num_logical)
                in_force = predicted_balancedness(placement, logical, self.topo)
                noise = sampling_noise(physical, self.topo.num_ranks, self.load_copies)
                verdicts.append(self.promise - in_force > self.config.trigger_margin + noise)
            self.stats.balancedness_watch = in_force
            return any(verdicts), verdicts[0]
        except Exception:  # a verdict that cannot be formed is no verdict; the vote still goes out
            log.warning("EPLB rank %d: load trigger verdict failed", self.rank, exc_info=True)
            return False, False
