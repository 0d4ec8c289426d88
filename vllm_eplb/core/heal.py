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
