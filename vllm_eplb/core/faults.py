"""Why a cycle ends early or rebalancing stops, and how a rank's fault travels to its peers.

Two kinds of reasons:

- `Fault`: a failure on one rank (planner, transfer, allocation, a bug). It never makes the
  rank stop posting rounds: `LocalFaults` keeps the worst one since the rank's last vote, and
  the next vote carries it as `encode(code, rank)`, reduced across ranks by max, so every rank
  reads the same worst code and the rank it came from, at the same pass (invariant 4, docs/architecture.md). A
  fault whose `suspends` is true pauses rebalancing on every rank (the `suspended` state: a
  back-off, then a vote to resume); the others end the cycle. No fault disables for good:
  `disabled` is for what cannot recover (the ranks run different protocols or clocks).
- `Reason`: what a round every rank read alike shows (the plans differ, the round failed, the
  ranks disagree about the protocol itself), or a rank-local end with no vote behind it (a
  commit copy that failed, a group that could not be rebuilt). The call site that reads it
  decides what it ends; nothing acts on a reason's text.

Both give the label /metrics and the logs show (`label`). Codes and their order are part of
the protocol: the vote layouts' digest covers them (agreement.PROTOCOL), so ranks that number
faults differently never balance together.
"""

from __future__ import annotations

import enum
import logging
from collections import Counter
from typing import Callable

import torch

log = logging.getLogger("vllm.eplb")


class Fault(enum.IntEnum):
    """Local failures, in the order a vote reduces them (the largest wins). The last
    ones suspend rebalancing on every rank (transient: a vote resumes it after a back-off);
    the others end the cycle only."""

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
    def label(self) -> str:
        return self.name.lower()

    @property
    def suspends(self) -> bool:
        return self >= Fault.PLANNER_DEAD


class Reason(enum.Enum):
    """Ends that are not a rank's fault (module docstring); the value is the label."""

    INSUFFICIENT_IMPROVEMENT = "insufficient_improvement"  # skip: the plan gains too little
    PLAN_MISMATCH = "plan_mismatch"  # the digest round: the ranks planned differently
    AGREEMENT_TIMEOUT = "agreement_timeout"  # a round failed on every rank (a rank lagged, a peer is gone)
    PASS_MISMATCH = "pass_mismatch"  # a round posted at different passes
    CLOCK_MISMATCH = "clock_mismatch"  # a rank's pass count drifted
    STEP_MISMATCH = "step_mismatch"  # a step holds different layers on different ranks
    WEIGHT_UPDATE_SKEW = "weight_update_skew"  # ranks applied weight updates at different passes (suspends)
    MAPS_DIVERGED = "maps_diverged"  # a round's maps digests differ: healed to the last agreed placement
    AGREEMENT_REPEATED = "agreement_timeout_repeated"  # agreement_timeout aborts in a row (suspends)
    CONFIG_MISMATCH = "config_mismatch"  # the start-up check: the ranks run different protocols
    COMMIT_FAILED = "commit_failed"  # a commit's copies failed part-way on this rank

    @property
    def label(self) -> str:
        return self.value


FAULT_RANKS = 1 << 16  # a vote's fault field: code * FAULT_RANKS + rank


def encode(code: Fault, rank: int) -> int:
    return int(code) * FAULT_RANKS + rank


def decode(value: int) -> tuple[Fault, int]:
    """(code, rank) of a vote's fault field (0: no fault)."""
    return Fault(value // FAULT_RANKS), value % FAULT_RANKS


def fault_of(exc: BaseException, default: Fault) -> Fault:
    """The fault an exception raised in some step of the work means: running out of memory
    is its own fault wherever it happens."""
    return Fault.OUT_OF_MEMORY if isinstance(exc, (torch.OutOfMemoryError, MemoryError)) else default


def describe(exc: BaseException | None) -> str:
    return f"{type(exc).__name__}: {exc}" if exc is not None else ""


class LocalFaults:
    """The one interface through which anything on this rank reports a failure: the worst
    fault since the last vote, which the next vote carries (`take`).

    Outside a cycle there is no vote to carry it: it is logged and counted only. A standing
    condition (the transfer group broken) is reported again before every vote, without a
    log line each time (`standing`)."""

    def __init__(self, rank: int, counts: Counter, where: Callable[[], str], in_cycle: Callable[[], bool]):
        self.rank = rank
        self.counts = counts  # label -> faults raised on this rank (BalancerStats.local_faults)
        self._where = where  # "EPLB rank r pass p" for log lines
        self._in_cycle = in_cycle
        self.value = 0  # encode(worst code, this rank) since the last take, 0 for none
        self.detail = ""  # of that fault, for the line that ends the cycle on this rank

    def report(self, code: Fault, exc: BaseException | None) -> None:
        """A failure here: it travels in this rank's next vote."""
        self._keep(code, exc, quiet=False)

    def standing(self, code: Fault) -> None:
        """A condition that holds until rebalancing stops: in every vote, logged once where it arose."""
        self._keep(code, None, quiet=True)

    def _keep(self, code: Fault, exc: BaseException | None, quiet: bool) -> None:
        self.counts[code.label] += 1
        detail = describe(exc)
        if not self._in_cycle():
            log.warning("%s: %s while idle%s", self._where(), code.label, f": {detail}" if detail else "")
            return
        mine = encode(code, self.rank)
        if mine > self.value:
            self.value, self.detail = mine, detail
        if not quiet:
            log.warning("%s: %s%s; voting to end the cycle", self._where(), code.label, f": {detail}" if detail else "")

    def take(self) -> int:
        """This rank's fault for the vote being posted (and forget it: it is on its way)."""
        value, self.value = self.value, 0
        return value

    def clear(self) -> None:
        """A new cycle: nothing of the last one travels in its votes."""
        self.value, self.detail = 0, ""


class ProtocolMismatch(RuntimeError):
    """A round every rank read shows the ranks disagree about the protocol itself: posted at
    different passes, pass clocks that drifted apart, a step holding different layers. Read
    alike everywhere: every rank stops rebalancing at that round."""

    def __init__(self, reason: Reason, message: str):
        super().__init__(message)
        self.reason = reason
