"""How a cycle ends early, and rebalancing stops: abort, disable, a fault read in a round, a
round that failed, a pass whose work raised.

No rank ends anything alone. A failure on one rank (planner, transfer, allocation, a bug) is
reported to its `LocalFaults` (core/faults.py), travels as the `fault` field of its next vote,
and every rank ends the cycle when it reads that round, at the same pass, with the same reason
(`on_fault`: abort, or suspend for a code that `suspends`, core/suspension.py). A round that
fails (a rank lagged past agreement_timeout_s, or stopped voting) fails on every rank at its
read: the cycle ends there and the agreement group is rebuilt (`lost_agreement`;
TIMEOUTS_TO_SUSPEND such ends in a row suspend). A round showing the ranks disagree about the
protocol (pass, clock, a step's layers) disables rebalancing on every rank; a commit that
failed part-way disables it on that rank alone (no vote can follow). A pass whose work raised
is retried once in a scheduled phase; a retry that fails too mutes the rank (`pass_failed`),
so its peers' next round fails on every rank at its read.
"""

from __future__ import annotations

import logging

import torch

from .agreement import AgreementError, Round
from .faults import Fault, ProtocolMismatch, Reason, decode, describe
from .state_machine import ACTIVE, PHASE_WORK
from .suspension import TIMEOUTS_TO_SUSPEND

log = logging.getLogger("vllm.eplb")


class Ends:
    def __init__(self, b):
        self.b = b

    def abort(self, reason: Fault | Reason, rank: int | None = None, detail: str = "") -> None:
        """End the cycle in flight (the table's `abort`); none while idle or suspended."""
        b = self.b
        if b.state not in ACTIVE:
            return  # no cycle to end (a round read while idle or suspended)
        label = reason.label
        b.stats.cycles_aborted[label] += 1
        where = f"rank {rank}, " if rank is not None else ""
        b.stats.last_abort = f"{label} ({where}pass {b.pass_no})" + (f": {detail}" if detail else "")
        log.warning("EPLB rank %d pass %d: cycle aborted: %s", b.comm.rank, b.pass_no, b.stats.last_abort)
        b.abort(reason=label)

    def disable(self, reason: Fault | Reason, exc: BaseException | None = None, rank: int | None = None, detail: str = "") -> None:
        """Stop rebalancing (the table's `disable`): the cycle in flight ends first."""
        b = self.b
        if not b.enabled:
            return
        if exc is not None:
            detail = describe(exc)
        b.disabled_reason = reason.label + (f": {detail}" if detail else "")
        if b.state in ACTIVE:
            self.abort(reason, rank, detail)
        b.trigger.disarm()  # a watch in progress: recording stops with it
        b.disable(reason=reason.label)
        log.warning(
            "EPLB rank %d pass %d: rebalancing disabled (%s); serving continues on the placement in force",
            b.comm.rank, b.pass_no, b.disabled_reason,
        )

    def on_fault(self, value: int) -> None:
        """A round read carrying a fault (the worst code, and the rank it came from)."""
        b = self.b
        code, rank = decode(value)
        detail = b.faults.detail if rank == b.comm.rank else ""
        if code.suspends:
            return b.suspension.suspend(code, rank=rank, detail=detail)
        self.abort(code, rank=rank, detail=detail)

    def lost_agreement(self, exc: Exception) -> None:
        b = self.b
        if isinstance(exc, ProtocolMismatch):
            # Read identically by every rank: they disagree about the protocol itself.
            return self.disable(exc.reason, detail=str(exc))
        # The round failed, and so it did on every rank (see agreement.py), read at this
        # same pass: end the cycle here; its group's connections are gone, so build a new
        # one, ready long before the next cycle's first round.
        b.agreement.rebuild()
        suspension = b.suspension
        if b.phase == "suspended":
            return suspension.back_off(b.pass_no, f"the resume round failed: {describe(exc)}")
        if b.state in ACTIVE:
            suspension.timeouts_in_row += 1
        self.abort(Reason.AGREEMENT_TIMEOUT, detail=describe(exc))
        if suspension.timeouts_in_row >= TIMEOUTS_TO_SUSPEND:
            suspension.suspend(Reason.AGREEMENT_REPEATED,
                               detail=f"{suspension.timeouts_in_row} cycles in a row ended by agreement_timeout")

    def pass_failed(self, p: int, exc: Exception, posts: int, muted: str) -> None:
        """Pass p's work raised `exc` (a bug: handlers catch their fallible local work into
        this rank's fault): reported, it travels in this rank's next vote. In a scheduled phase
        a pass that failed before posting anything is retried once, so this rank keeps its
        peers' schedule; a retry that fails too leaves the rank unable to vote (whether this
        pass owed a round is lost with the pass): it stops posting (`Agreement.mute`), so its
        peers' next round fails on every rank at its read, at the same pass, and the cycle ends
        everywhere there (the timeout path). `posts`, `muted`: the agreement's before the pass."""
        b = self.b
        b.faults.report(Fault.INTERNAL_ERROR, exc)
        work = PHASE_WORK[b.phase]
        if not work.scheduled or b.agreement.posts != posts:
            return  # its round went out: the fault travels in the next one
        try:
            b.phase_method(work.tick)(p)
        except (AgreementError, ProtocolMismatch) as again:
            self.lost_agreement(again)
        except Exception as again:
            if b.agreement.posts != posts:
                return
            if muted:
                # failing on every pass: it cannot read the rounds that would end its cycle
                # either; end it here (its peers end theirs at the read of its first missing round)
                return self.lost_agreement(AgreementError(muted))
            why = f"rank {b.comm.rank} stopped voting at pass {p}: its tick failed twice ({describe(again)})"
            log.error("EPLB %s; the cycle ends on every rank when its next round is read", why)
            b.agreement.mute(why)
            self._unposted(p, why)

    def _unposted(self, p: int, why: str) -> None:
        """The round this rank's schedule owed at pass p (its peers posted it) stands in its
        place as failed: read `agreement_lag` passes later, at the pass its peers' fails."""
        b = self.b
        if b.phase == "transferring":
            # the pass's commits and step start are schedule, not votes: done as its peers did
            # them (a step they started and this rank did not would leave their messages pending)
            try:
                b.transferring.work(p, vote=False)
            except (AgreementError, ProtocolMismatch) as exc:
                return self.lost_agreement(exc)
            except Exception as exc:
                log.error("EPLB rank %d pass %d: %s", b.comm.rank, p, describe(exc))
        c, phase = b.cycle, b.phase
        failed = Round(torch.zeros(0), None, p, p + b.agreement.lag, b.agreement, error=AgreementError(why))
        if phase == "transferring" and b.pipeline.steps:
            b.pipeline.votes.append(failed)  # a commit vote every pass while steps are in flight
        elif phase == "suspended" and b.suspension.round is None and p >= b.suspension.resume_at:
            b.suspension.round = failed
        elif PHASE_WORK[phase].post and c is not None and c.round is None and p >= c.post_at:
            c.round = failed
