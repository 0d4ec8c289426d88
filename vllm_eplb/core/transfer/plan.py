"""Which expert weights must move for one layer, and from where.

Every rank computes the same global plan from the old and new placement of the
layer (both known everywhere), then executes its own part. For each rank and
each slot whose expert changes:

- if the rank already holds that expert in some old slot, it copies locally;
- otherwise it receives the expert once (even if it needs it in several slots)
  from one rank that holds it in the old placement, chosen so that sends are
  spread: fewest sends so far in this layer, same node first, then nearest rank.

Messages between one pair of ranks are batched: one buffer per weight tensor
carrying that pair's experts in ascending expert order.

Order of a rank's transfers: rotated by rank distance. Rank r receives first from
r+1, then r+2, ... (mod N) and sends first to r-1, then r-2, ...: in the k-th position
every receiver pulls from a different source, so no rank's links serve every receiver
at once while others idle (a plan sorted by (src, dst) starts every receiver on rank
0). This is upstream vLLM 0.32's idea in `migration_scheduler.py` (batches in which
each rank talks to at most one peer), kept directional: a link carries both directions
at full speed, so a pair exchanging experts both ways stays in one round instead of
two, and nothing waits between rounds: the order alone spreads the load.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from ..placement import Topology


@dataclass(frozen=True)
class Transfer:
    """Experts `experts` (ascending) go from src to dst in one batched message."""

    src: int
    dst: int
    experts: tuple[int, ...]
    src_slots: tuple[int, ...]  # sender-local slot of each expert in the OLD placement


@dataclass
class RankPart:
    """One rank's share of a layer's plan, all slot indices local to the rank."""

    sends: list[Transfer] = field(default_factory=list)
    recvs: list[Transfer] = field(default_factory=list)
    # (expert, old local slot) snapshots taken before commit, for local copies
    local_sources: dict[int, int] = field(default_factory=dict)
    # new local slot -> expert to write there at commit (only slots that change)
    writes: dict[int, int] = field(default_factory=dict)

    @property
    def idle(self) -> bool:
        return not (self.sends or self.recvs or self.writes)


@dataclass
class LayerPlan:
    layer: int
    transfers: list[Transfer]
    parts: list[RankPart]

    def part(self, rank: int) -> RankPart:
        return self.parts[rank]

    @property
    def experts_moved(self) -> int:
        """Experts that cross between ranks in this layer."""
        return sum(len(t.experts) for t in self.transfers)


def plan_layer(layer: int, old: np.ndarray, new: np.ndarray, topo: Topology) -> LayerPlan:
    n = topo.slots_per_rank
    holders: dict[int, list[int]] = defaultdict(list)  # expert -> ranks holding it (old)
    old_slot: list[dict[int, int]] = [dict() for _ in range(topo.num_ranks)]  # rank -> expert -> local slot
    for s, e in enumerate(old.tolist()):
        r = s // n
        if e not in old_slot[r]:
            old_slot[r][e] = s - r * n
            holders[e].append(r)

    parts = [RankPart() for _ in range(topo.num_ranks)]
    needs: list[tuple[int, int]] = []  # (dst rank, expert) to receive
    for r in range(topo.num_ranks):
        part = parts[r]
        for local in range(n):
            s = r * n + local
            e_new, e_old = int(new[s]), int(old[s])
            if e_new == e_old:
                continue
            part.writes[local] = e_new
            if e_new in old_slot[r]:
                part.local_sources[e_new] = old_slot[r][e_new]
            elif (r, e_new) not in needs:
                needs.append((r, e_new))

    sends_so_far = [0] * topo.num_ranks
    batches: dict[tuple[int, int], list[int]] = defaultdict(list)
    # deterministic order: by expert, then destination
    for dst, e in sorted(needs, key=lambda x: (x[1], x[0])):
        src = min(
            holders[e],
            key=lambda h: (
                sends_so_far[h],
                topo.node_of(h) != topo.node_of(dst),
                (h - dst) % topo.num_ranks,
            ),
        )
        sends_so_far[src] += 1
        batches[(src, dst)].append(e)

    transfers = []
    for (src, dst), experts in sorted(batches.items()):
        experts = sorted(experts)
        t = Transfer(src, dst, tuple(experts), tuple(old_slot[src][e] for e in experts))
        transfers.append(t)
        parts[src].sends.append(t)
        parts[dst].recvs.append(t)
    world = topo.num_ranks
    for part in parts:
        # round k: dst pulls from dst + k, src serves src - k (see the module's notes)
        part.recvs.sort(key=lambda t: (t.src - t.dst) % world)
        part.sends.sort(key=lambda t: (t.src - t.dst) % world)
    return LayerPlan(layer, transfers, parts)


def rounds(plan: LayerPlan, world: int) -> list[list[Transfer]]:
    """The plan's transfers grouped by rank distance (src - dst) mod N: in each round every
    rank sends to at most one peer and receives from at most one (a directed matching)."""
    by_k: dict[int, list[Transfer]] = defaultdict(list)
    for t in plan.transfers:
        by_k[(t.src - t.dst) % world].append(t)
    return [by_k[k] for k in sorted(by_k)]
