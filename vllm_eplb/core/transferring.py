"""The transferring phase's pass: the transfer pipeline's schedule (core/pipeline.py) and the
transitions its commit votes decide.

Every pass: read every commit vote due (one per pass; two after a pass whose tick failed)
and commit every step all ranks voted ready (next_layer, or finish after the last); start a
step while fewer than min(agreement_lag + 1, MAX_IN_FLIGHT) are in flight; poll every step in
flight; post one commit vote naming the steps this rank has ready. Decisions come from votes
and the pass clock only; local failures go into this rank's vote. A commit that failed
part-way leaves this rank's layer in an unknown state: rebalancing is disabled here.
"""

from __future__ import annotations

import logging

from .faults import Reason
from .pipeline import CommitFailed

log = logging.getLogger("vllm.eplb")


class Transferring:
    def __init__(self, b):
        self.b = b

    def tick(self, p: int) -> None:
        """The phase's pass (`PHASE_WORK`)."""
        self.work(p)

    def work(self, p: int, vote: bool = True) -> None:
        """The pass's commits, step start and polls; its commit vote unless `vote` is False (a
        muted rank: core/ends.py)."""
        b = self.b
        pipe = b.pipeline
        # every vote due: one per pass, or two after a pass whose tick failed (its commits are
        # made now, one pass late, not one pass later each)
        while (r := pipe.due(p)) is not None:
            v = b.votes.read(r, p)
            if v is None:
                return
            try:
                committed = pipe.commit_voted(r, v, current=not b.cycle.weights_changed)
            except CommitFailed as exc:
                # this rank's layer is in an unknown state: say so as loudly as we can
                log.critical("EPLB rank %d pass %d: commit failed part-way: %s", b.comm.rank, p, exc.__cause__)
                return b.ends.disable(Reason.COMMIT_FAILED, detail=str(exc))
            if committed:
                if pipe.finished:
                    b.stats.cycles_completed += 1
                    b.stats.cycle_passes.append(p - b.cycle.window_end)
                    return b.finish()
                b.next_layer()
        if pipe.can_start():
            pipe.start(p)
        if pipe.steps:
            pipe.poll()
            if vote:
                pipe.vote(p)
