"""`greedy`: replicate the hottest experts, then pack replicas onto ranks largest first.

1. Replication: each redundant slot goes to the expert whose per-replica load is
   highest at that moment.
2. Packing: replicas, heaviest first, each to the least-loaded rank that still
   has a free slot and does not hold that expert yet (longest-processing-time).
3. Slots within a rank are chosen to keep experts where they already are.

Every step is vectorized across layers, so the planner thread spends its time in
numpy with the GIL released.
"""

from __future__ import annotations

import numpy as np

from .base import PlanInput, Policy, keep_in_place, register_policy
from .primitives import replicate


def pack(load: np.ndarray, counts: np.ndarray, num_ranks: int, slots_per_rank: int) -> np.ndarray:
    """(layers, physical) placement putting replicas largest-first on the least loaded rank."""
    layers, num_logical = load.shape
    num_physical = num_ranks * slots_per_rank
    # one entry per replica: its expert and its share of the load
    experts = np.stack([np.repeat(np.arange(num_logical), c) for c in counts])  # (L, P)
    weight = np.take_along_axis(load / counts, experts, axis=1)
    order = np.argsort(-weight, axis=1, kind="stable")
    experts = np.take_along_axis(experts, order, axis=1)
    weight = np.take_along_axis(weight, order, axis=1)

    rows = np.arange(layers)
    rank_load = np.zeros((layers, num_ranks))
    rank_fill = np.zeros((layers, num_ranks), dtype=np.int64)
    holds = np.zeros((layers, num_ranks, num_logical), dtype=bool)
    placement = np.empty((layers, num_physical), dtype=np.int64)
    for j in range(num_physical):
        e = experts[:, j]
        free = rank_fill < slots_per_rank
        ok = free & ~holds[rows, :, e]
        # an expert with more replicas than ranks must double up somewhere
        ok = np.where(ok.any(axis=1, keepdims=True), ok, free)
        rank = np.argmin(np.where(ok, rank_load, np.inf), axis=1)
        placement[rows, rank * slots_per_rank + rank_fill[rows, rank]] = e
        rank_load[rows, rank] += weight[:, j]
        rank_fill[rows, rank] += 1
        holds[rows, rank, e] = True
    return placement


@register_policy("greedy")
class GreedyPolicy(Policy):
    def place(self, inp: PlanInput) -> np.ndarray:
        topo = inp.topo
        load = inp.logical_load.astype(np.float64)
        counts = replicate(load, topo.num_physical)
        new = pack(load, counts, topo.num_ranks, topo.slots_per_rank)
        return keep_in_place(new, inp.current, topo.slots_per_rank)
