"""Healing maps that differ across ranks: one placement every rank routes with again.

Every round carries a digest of the maps each rank routes with (core/agreement.py, `maps`).
Maps can come to differ however the protocol is kept (a weight update applied at different
passes, an exception past a commit pass, a bug, memory written by someone else): a round
whose digests differ is read at the same pass on every rank, and there, before the next
forward pass, every rank converges on the last placement the ranks agreed on (the newest
one whose digests matched in a round read).

What a slot holds is known only to its own rank: its maps and weights change together
(a commit, atomic on each rank), so rank r's own rows of its maps say what r's slots hold.
The ranks exchange their placements (one blocking all-gather: divergence is rare, and the
next forward pass must not route with maps that differ), each builds the same composite
(every rank's own slots, as that rank holds them) and the same target, and moves weights
from composite to target like a transfer step, blocking; then writes the target's maps.

The target, per layer, is the agreed placement's row if every expert it names is still held
somewhere (in a slot, or received by some rank in a step that was never committed: that
rank's staging is the source then); else the first rank's own row (in rank order) for which that holds (a commit made
on some ranks only can overwrite the last copy of an expert the agreed row needs, while the
committed row is whole); else the agreed row with each slot whose expert is held nowhere
keeping what it holds. An expert held by no slot at all cannot be fetched back: the maps name
it at its agreed slot (they stay valid and equal), whose weights are another expert's, and
the heal reports it lost until the next weight update writes it.

`Healing` does it on the balancer's behalf: it keeps the last agreed placement (a round read
with equal digests: core/votes.py), reads an ended cycle's commit votes still in flight for
their digest only (`drain`), and heals at the pass a round shows the maps differ.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.distributed as dist

from .agreement import AgreementError, Round
from .faults import Reason, describe
from .placement import Topology
from .state_machine import ACTIVE

log = logging.getLogger("vllm.eplb")


def composite(placements: list[np.ndarray], topo: Topology) -> np.ndarray:
    """What every slot holds: each rank's own slots, from that rank's placement."""
    out = np.empty_like(placements[0])
    for rank, placement in enumerate(placements):
        slots = topo.rank_slots(rank)
        out[:, slots.start:slots.stop] = placement[:, slots.start:slots.stop]
    return out


def heal_target(agreed: np.ndarray, held: np.ndarray, views: list[np.ndarray], topo: Topology,
                staged: set | None = None):
    """(the maps every rank heals to, what every slot is to hold, [(layer, expert) held by no
    slot]). `agreed`: the last agreed placement; `held`: the composite; `views`: every rank's
    placement, in rank order; `staged`: (layer, expert) some rank received in a step never
    committed (a source too)."""
    maps, weights, lost = agreed.copy(), agreed.copy(), []
    staged = staged or set()
    for layer in range(agreed.shape[0]):
        present = set(held[layer].tolist()) | {e for (lay, e) in staged if lay == layer}
        whole = next((c[layer] for c in [agreed, *views] if set(c[layer].tolist()) <= present), None)
        if whole is not None:
            maps[layer] = weights[layer] = whole
            continue
        row = weights[layer]
        for s in np.nonzero(row != held[layer])[0]:
            if int(row[s]) not in present:
                row[s] = held[layer, s]  # nothing to fetch: the slot keeps its expert
        maps[layer] = row
        for e in sorted(set(range(topo.num_logical)) - set(row.tolist())):
            lost.append((layer, e))
            maps[layer, int(np.nonzero(agreed[layer] == e)[0][0])] = e
    return maps, weights, lost


class Healing:
    def __init__(self, b):
        self.b = b
        self.agreed = b.placement.copy()  # the last placement a round read showed equal on every rank
        self.draining: list[Round] = []  # an ended cycle's commit votes still in flight: read for their maps digest

    def heal(self, p: int) -> None:
        """A round read at pass p shows maps that differ across ranks (whatever made them
        differ), on every rank alike: the cycle ends, and before the next forward pass every
        rank routes with the last agreed placement again, its slots holding what it names.
        Blocking: one all-gather of the placements and one transfer step per layer that
        moves, on this rare path only. A heal that fails fails like a round (the group is
        rebuilt); the maps still differ, so the next round heals again."""
        b = self.b
        if b.state in ACTIVE:
            b.ends.abort(Reason.MAPS_DIVERGED, detail=f"maps digests differ across ranks in the round read at pass {p}")
        n, group = b.comm.world_size, b.agreement.group
        try:
            mine = torch.from_numpy(b.placement.copy())
            everyone = [torch.empty_like(mine) for _ in range(n)]
            dist.all_gather(everyone, mine, group=group)
            views = [t.numpy() for t in everyone]
            held = composite(views, b.topo)
            staged: list = [None] * n  # what each rank received in steps never committed
            dist.all_gather_object(staged, set(b.pipeline.staged_experts()), group=group)
            target, weights, lost = heal_target(self.agreed, held, views, b.topo, set().union(*staged))
            moved = b.pipeline.heal(target, weights, held, staged, group, n)
        except Exception as exc:
            raise AgreementError(f"healing the maps failed: {describe(exc)}") from exc
        self.agreed = target.copy()
        # the ended cycle's votes in flight were posted before the heal: what they show is healed
        self.draining = [r for r in self.draining if r.posted_at > p]
        b.stats.maps_healed += 1
        b.stats.heals.append((p, moved, len(lost)))
        log.warning("EPLB rank %d pass %d: routing maps differed across ranks; healed to the last agreed placement "
                    "(%d layers' weights moved)", b.comm.rank, p, moved)
        if lost:
            log.critical("EPLB rank %d pass %d: experts (layer, expert) held by no slot any more, mapped to slots "
                         "holding other weights until the next weight update: %s", b.comm.rank, p, lost[:8])

    def drain(self, p: int) -> None:
        """Read an ended cycle's commit votes when due, for their maps digest only: a commit
        made on some ranks only in its last passes (a weight update applied at different
        passes) shows there, and is healed at the same pass on every rank."""
        b = self.b
        if b.phase == "disabled":
            self.draining = []
            return
        while self.draining and p >= self.draining[0].due_at:
            r = self.draining.pop(0)
            try:
                v = r.votes()
            except AgreementError:
                continue  # failed on every rank: the cycle already ended on that path
            if v.maps[1]:
                self.agreed = r.sent.get("placement", self.agreed)
            else:
                try:
                    self.heal(p)
                except AgreementError as exc:
                    log.warning("EPLB rank %d pass %d: %s; the next round checks the maps again", b.comm.rank, p, exc)
                self.draining = []
