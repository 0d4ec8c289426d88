"""What every round this rank posts carries, and the checks every round read gets.

Posted (`post`, `common`): besides its layout's fields, this rank's fault since its last vote
(the transfer group's health first: core/pipeline.py, then core/faults.py), whether a tick
came out of step with the forward passes since (`skew`), the pass clock's offset between its
two counts (`clock`), the weight updates applied since the last weight_update_skew
(`weights`) and the digest of the routing maps it routes with (`maps`). Read (`read`): posted
at one pass everywhere and clocks that agree, else the ranks disagree about the protocol
(ProtocolMismatch: disabled, core/ends.py); skew logged; digests that differ healed at that
pass (core/heal.py), equal ones make the placement this rank sent the last agreed; weight
updates applied at different passes suspend (core/suspension.py); a fault ends the cycle.
"""

from __future__ import annotations

import logging

import numpy as np

from .agreement import Round, VoteLayout
from .faults import ProtocolMismatch, Reason
from .placement import maps_digest

log = logging.getLogger("vllm.eplb")


class Votes:
    def __init__(self, b):
        self.b = b
        self.skewed = False  # a tick anomaly not yet reported in a vote
        self.weights_base = 0  # weight updates counted before the last weight_update_skew (votes carry the rest)
        # the maps' digest, computed when they change (version), with the placement it is of: a
        # round read with every rank's digest equal makes that placement the last agreed one
        self._digest: tuple[int, int, np.ndarray] = (-1, 0, b.placement)

    def post_cycle(self, layout: VoteLayout, p: int, **values) -> None:
        """Post the cycle's round of this phase (read when due by the balancer's `_tick_round`)."""
        self.b.cycle.round = self.post(layout, p, **values)

    def post(self, layout: VoteLayout, p: int, **values) -> Round:
        values.update(fault=self.take_fault(), skew=self.skewed, **self.common())
        self.skewed = False
        return self.b.agreement.vote(layout, values, p)

    def common(self) -> dict:
        """What every round carries besides pass and fault: the clock's offset, the weight
        updates applied (since the last weight_update_skew), the maps' digest (and, for this
        rank only, the placement it is of: the last agreed one once a round shows it equal)."""
        b = self.b
        maps = b.layout.maps
        if self._digest[0] != maps.version:
            placement = maps.placement.copy()
            self._digest = (maps.version, maps_digest(placement), placement)
        return dict(clock=b.clock.offset(), weights=b.stats.weight_updates - self.weights_base,
                    maps=self._digest[1], placement=self._digest[2])

    def take_fault(self) -> int:
        """This rank's fault for the round being posted, after the transfer group's health
        (a standing fault once broken)."""
        self.b.pipeline.check_health()
        return self.b.faults.take()

    def read(self, r: Round, p: int):
        """A round's fields, after the checks every round gets: posted at one pass
        everywhere, pass clocks that agree, tick skew reported, a fault ends the cycle
        (then None)."""
        b = self.b
        v = r.votes()
        if not v.pass_no[1]:
            raise ProtocolMismatch(Reason.PASS_MISMATCH, r.layout.pass_mismatch(v, r.posted_at))
        if not v.clock[1]:
            detail = (
                f"a rank's pass count drifted: in the round posted at pass {r.posted_at}, runner passes - MoE-layer "
                f"passes {r.layout.clock_spread(v)}, {r.sent['clock']} on this rank (clock: {b.clock.source})"
            )
            raise ProtocolMismatch(Reason.CLOCK_MISMATCH, detail)
        if v.skew:
            self._report_skew(p)
        if v.maps[1]:
            b.healing.agreed = r.sent.get("placement", b.healing.agreed)
        else:
            b.healing.heal(p)
        if not v.weights[1]:
            b.suspension.suspend(
                Reason.WEIGHT_UPDATE_SKEW,
                detail=f"ranks applied weight updates at different forward passes ({v.weights[0]} to {v.weights[2]} "
                f"updates across ranks, {b.stats.weight_updates - self.weights_base} here); pause generation on "
                "every engine around a weight update",
            )
            return None
        if not v.maps[1]:
            return None
        if v.fault:
            b.ends.on_fault(v.fault)
            return None
        return v

    def _report_skew(self, p: int) -> None:
        b = self.b
        b.stats.skew_rounds += 1
        log.warning(
            "EPLB rank %d pass %d: a rank's driver ticked out of step with its forward passes "
            "(absorbed by the pass clock: extra ticks %d, missed %d here)",
            b.comm.rank, p, b.stats.extra_ticks, b.stats.missed_ticks,
        )
