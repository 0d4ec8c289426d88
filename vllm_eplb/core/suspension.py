"""Suspension: rebalancing paused on every rank for a transient cause, then resumed by vote.

A cause that suspends (a fault whose code `suspends`: the planner dead, the transfer group
broken; weight updates applied at different passes; `TIMEOUTS_TO_SUSPEND` cycles in a row
ended by agreement_timeout) is read from a round every rank reads alike, so every rank
suspends at the same pass: the cycle in flight ends first, serving goes on on the placement
in force. After a back-off (step_interval passes, doubling with every suspension in a row, at
most 2^MAX_BACKOFF_DOUBLINGS times) every rank posts a resume vote (`RESUME`): its planner
alive, its transfer group healthy, its agreement group built. Read `agreement_lag` passes
later: every rank ready -> idle, a cycle starts next pass; else back off again, twice as long.
A decided cycle (finish, skip) clears the counts in a row.
"""

from __future__ import annotations

import logging

from .agreement import RESUME, AgreementError, Round
from .faults import Fault, Reason, describe
from .state_machine import ACTIVE

log = logging.getLogger("vllm.eplb")

# agreement_timeout aborts in a row that suspend rebalancing (the group keeps failing: back off)
TIMEOUTS_TO_SUSPEND = 3
MAX_BACKOFF_DOUBLINGS = 6  # a suspension's back-off: step_interval passes x 2^(suspensions in a row - 1), capped


class Suspension:
    def __init__(self, b):
        self.b = b
        self.reason = ""  # "reason: detail" while suspended
        self.resume_at = 0  # while suspended: the pass the resume vote is posted at
        self.round: Round | None = None  # the resume vote in flight
        self.in_row = 0  # suspensions in a row (the back-off's exponent); a decided cycle resets it
        self.timeouts_in_row = 0  # cycles ended by agreement_timeout in a row

    def suspend(self, reason: Fault | Reason, rank: int | None = None, detail: str = "") -> None:
        """Pause rebalancing (the table's `suspend`), decided from a round every rank read
        alike: the cycle in flight ends first; after a back-off the ranks vote to resume."""
        b = self.b
        if b.phase in ("suspended", "disabled"):
            return
        if b.state in ACTIVE:
            b.ends.abort(reason, rank, detail)
        b.trigger.disarm()
        b.faults.clear()  # the ended cycle's: the resume vote carries none
        if reason is Reason.WEIGHT_UPDATE_SKEW:
            b.votes.weights_base = b.stats.weight_updates  # counted afresh from this pass, on every rank
        self.in_row += 1
        b.stats.suspensions[reason.label] += 1
        self.reason = reason.label + (f": {detail}" if detail else "")
        self.round = None
        self.resume_at = b.pass_no + self.backoff()
        b.suspend(reason=reason.label)
        log.warning(
            "EPLB rank %d pass %d: rebalancing suspended (%s); serving continues on the placement in force; "
            "the ranks vote to resume at pass %d", b.comm.rank, b.pass_no, self.reason, self.resume_at,
        )

    def decided(self) -> None:
        """A decided cycle: the transient troubles behind any back-off are over."""
        self.timeouts_in_row = self.in_row = 0

    def tick(self, p: int) -> None:
        """The suspended phase's pass: at `resume_at` (the back-off over) post whether this rank
        is ready again; read `agreement_lag` passes later: every rank ready -> idle (a cycle
        starts next pass), else back off twice as long."""
        b = self.b
        r = self.round
        if r is not None:
            if p < r.due_at:
                return
            self.round = None
            v = b.votes.read(r, p)
            if v is None or not v.ready:
                return self.back_off(p, "not every rank is ready" if v is not None else "the resume round ended early")
            b.stats.reenabled += 1
            log.warning("EPLB rank %d pass %d: rebalancing resumed (was suspended: %s)", b.comm.rank, p, self.reason)
            self.reason = ""
            b.cycles.next_at = p + 1
            return b.resume(reason="every rank ready")
        if p < self.resume_at:
            return
        try:
            b.agreement.wait_rebuilt()
        except AgreementError as exc:  # its post fails: the round fails on every rank, the rebuild is retried
            log.warning("EPLB rank %d pass %d: %s", b.comm.rank, p, exc)
        self.round = b.votes.post(RESUME, p, ready=self.ready())

    def ready(self) -> bool:
        """This rank's part of the resume vote: its planner alive (a fresh restart budget
        after planner_dead), its transfer group healthy (no dropped step pending), its
        agreement group built."""
        b = self.b
        parts = {"agreement group": b.comm.world_size == 1 or b.agreement.group is not None}
        try:
            parts["planner"] = b.planner.alive() or b.planner.revive()
        except Exception as exc:
            log.warning("EPLB rank %d: planner not revived: %s", b.comm.rank, describe(exc))
            parts["planner"] = False
        parts["transfer group"] = b.pipeline.recover()
        if not all(parts.values()):
            log.warning("EPLB rank %d pass %d: not ready to resume: %s", b.comm.rank, b.pass_no,
                        ", ".join(k for k, ok in parts.items() if not ok))
        return all(parts.values())

    def back_off(self, p: int, why: str) -> None:
        self.in_row += 1
        self.resume_at = p + self.backoff()
        log.warning("EPLB rank %d pass %d: still suspended (%s); next resume vote at pass %d", self.b.comm.rank, p, why,
                    self.resume_at)

    def backoff(self) -> int:
        return self.b.config.step_interval * 2 ** min(max(0, self.in_row - 1), MAX_BACKOFF_DOUBLINGS)
