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

The target is the agreed placement, except where an expert it puts in a slot is held by no
slot at all any more (a commit on some ranks only can overwrite the last copy): that slot
keeps what it holds, so the maps name what the weights are. An expert held nowhere cannot be
fetched back: the target keeps it where the agreed placement had it (the maps stay valid
and equal) and the heal reports it lost (its slots hold other weights until the next weight
update writes it).
"""

from __future__ import annotations

import numpy as np

from .placement import Topology


def composite(placements: list[np.ndarray], topo: Topology) -> np.ndarray:
    """What every slot holds: each rank's own slots, from that rank's placement."""
    out = np.empty_like(placements[0])
    for rank, placement in enumerate(placements):
        slots = topo.rank_slots(rank)
        out[:, slots.start:slots.stop] = placement[:, slots.start:slots.stop]
    return out


def heal_target(agreed: np.ndarray, held: np.ndarray, topo: Topology) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """(the placement every rank heals to, [(layer, expert) held by no slot]). `agreed`: the
    last agreed placement; `held`: the composite."""
    target = agreed.copy()
    lost = []
    for layer in range(agreed.shape[0]):
        present = set(held[layer].tolist())
        for s in np.nonzero(target[layer] != held[layer])[0]:
            if int(target[layer, s]) not in present:
                target[layer, s] = held[layer, s]  # nothing to fetch: the slot keeps its expert
        for e in sorted(set(range(topo.num_logical)) - set(target[layer].tolist())):
            lost.append((layer, e))
            s = int(np.nonzero(agreed[layer] == e)[0][0])
            target[layer, s] = e  # valid, equal maps; the slot's weights are another expert's
    return target, lost
