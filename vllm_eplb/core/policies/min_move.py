"""`min-move`: balance as well as `deepseek` (within a tolerance), moving as little as possible.

Every moved slot is expert weights crossing the interconnect. Upstream's policy plans
from scratch each time, so a small drift in load reshuffles most slots. This policy
starts from the placement in force and changes it only where that buys balance:

1. Target: run `deepseek` on the load. Its replica count per expert and its maximum
   per-rank load per layer are what this policy aims for.
2. Replica counts: experts with more replicas than the target give up their slots on
   the busiest ranks; experts with fewer take those freed slots, heaviest replica
   first onto the least loaded rank that does not hold it yet. Every other expert
   stays in its slot.
3. Swaps: while a layer's busiest rank is above the target (+ tolerance), swap the
   slot pair between it and another rank that lowers the layer's maximum most.
4. A layer that still misses the target takes `deepseek`'s layout for that layer
   (aligned to keep experts in their slots), so the plan's balancedness is within
   the tolerance of `deepseek`'s on every layer, hence overall.
"""

from __future__ import annotations

import numpy as np

from .base import PlanInput, Policy, keep_in_place, register_policy
from .deepseek import deepseek_placement

_EPS = 1e-12


def _fix_replica_counts(load: np.ndarray, current: np.ndarray, target_counts: np.ndarray, num_ranks: int) -> np.ndarray:
    """One layer: change only as many slots as the replica counts require."""
    slots = current.shape[0]
    per_rank = slots // num_ranks
    counts = np.bincount(current, minlength=load.shape[0])
    surplus = counts - target_counts
    placement = current.copy()
    if not surplus.any():
        return placement
    weight = load / np.maximum(target_counts, 1)  # per-replica load once counts are right
    slot_w = weight[placement]
    loads = slot_w.reshape(num_ranks, per_rank).sum(axis=1)
    # free surplus replicas, those on the busiest ranks first
    cand = np.nonzero(surplus[placement] > 0)[0]
    cand = cand[np.argsort(-loads[cand // per_rank], kind="stable")]
    experts = placement[cand]
    by_expert = np.argsort(experts, kind="stable")
    sorted_e = experts[by_expert]
    nth = np.empty_like(by_expert)
    nth[by_expert] = np.arange(len(cand)) - np.searchsorted(sorted_e, sorted_e, side="left")
    freed = cand[nth < surplus[experts]]
    loads -= np.bincount(freed // per_rank, weights=slot_w[freed], minlength=num_ranks)
    free_count = np.bincount(freed // per_rank, minlength=num_ranks)
    free_slots = {r: sorted(freed[freed // per_rank == r].tolist()) for r in np.unique(freed // per_rank).tolist()}
    holds = np.zeros((num_ranks, load.shape[0]), dtype=bool)
    kept = np.ones(slots, dtype=bool)
    kept[freed] = False
    holds[np.nonzero(kept)[0] // per_rank, placement[kept]] = True
    # missing replicas, heaviest first, onto the least loaded rank with a free slot
    needed = np.repeat(np.nonzero(surplus < 0)[0], -surplus[surplus < 0])
    for e in needed[np.argsort(-weight[needed], kind="stable")].tolist():
        ok = (free_count > 0) & ~holds[:, e]
        if not ok.any():
            ok = free_count > 0
        r = int(np.argmin(np.where(ok, loads, np.inf)))
        s = free_slots[r].pop(0)
        placement[s] = e
        free_count[r] -= 1
        holds[r, e] = True
        loads[r] += weight[e]
    return placement


def _swap_down(
    load: np.ndarray, placement: np.ndarray, num_ranks: int, limits: np.ndarray, budget: np.ndarray, partners: int = 4
) -> np.ndarray:
    """All layers at once: each round, every layer whose busiest rank is above its limit
    swaps the slot pair (busiest rank <-> one of the `partners` least loaded ranks) that
    lowers its maximum most. A layer stops when within its limit, when no swap helps, or
    when its swap budget is spent."""
    layers, slots = placement.shape
    if num_ranks < 2:
        return placement
    per_rank = slots // num_ranks
    k = min(partners, num_ranks - 1)
    placement = placement.copy()
    rows = np.arange(layers)
    counts = np.zeros((layers, load.shape[1]), dtype=np.int64)
    np.add.at(counts, (np.repeat(rows, slots), placement.reshape(-1)), 1)  # swaps keep counts
    per_replica = load / np.maximum(counts, 1)
    budget = budget.copy()
    local = np.arange(per_rank)
    for _ in range(int(budget.max(initial=0))):
        w = np.take_along_axis(per_replica, placement, axis=1)  # (L, P)
        loads = w.reshape(layers, num_ranks, per_rank).sum(axis=2)  # (L, R)
        order = np.argsort(-loads, axis=1)
        peak = loads[rows, order[:, 0]]
        idx = np.nonzero((peak > limits) & (budget > 0))[0]
        if not len(idx):
            break
        n = np.arange(len(idx))
        ld, od = loads[idx], order[idx]
        top = od[:, 0]
        low = od[:, -k:]  # (A, k) the least loaded ranks
        a = top[:, None] * per_rank + local[None, :]  # (A, S) slots of the busiest rank
        b = (low[:, :, None] * per_rank + local[None, None, :]).reshape(len(idx), -1)  # (A, k*S)
        wa = np.take_along_axis(w[idx], a, axis=1)[:, :, None]
        wb = np.take_along_axis(w[idx], b, axis=1)[:, None, :]
        partner = b // per_rank
        # highest load among the ranks other than the busiest and the partner
        rest = np.where(od[:, 1][:, None] == partner, ld[n, od[:, 2]][:, None] if num_ranks > 2 else -np.inf, ld[n, od[:, 1]][:, None])
        new_max = np.maximum(
            np.maximum(peak[idx][:, None, None] - wa + wb, np.take_along_axis(ld, partner, axis=1)[:, None, :] + wa - wb),
            rest[:, None, :],
        )
        # no rank may end up holding two replicas of one expert
        ea = np.take_along_axis(placement[idx], a, axis=1)  # (A, S)
        eb = np.take_along_axis(placement[idx], b, axis=1)  # (A, k*S)
        rank_holds = np.zeros((len(idx), num_ranks, load.shape[1]), dtype=bool)
        rank_holds[n[:, None], (np.arange(slots) // per_rank)[None, :], placement[idx]] = True
        top_has_b = rank_holds[n[:, None], top[:, None], eb][:, None, :]  # (A, 1, kS)
        partner_has_a = rank_holds[n[:, None, None], partner[:, None, :], ea[:, :, None]]  # (A, S, kS)
        new_max = np.where(top_has_b | partner_has_a, np.inf, new_max).reshape(len(idx), -1)
        best = new_max.argmin(axis=1)
        gain = new_max[n, best] < peak[idx] - _EPS
        budget[idx[~gain]] = 0
        li = idx[gain]
        i, j = np.divmod(best[gain], b.shape[1])
        sa, sb = a[gain, i], b[gain, j]
        ea_g = placement[li, sa].copy()
        placement[li, sa] = placement[li, sb]
        placement[li, sb] = ea_g
        budget[li] -= 1
    return placement


def min_move_placement(
    load: np.ndarray,
    current: np.ndarray,
    num_groups: int,
    num_nodes: int,
    num_ranks: int,
    tolerance: float = 0.01,
    max_swaps: int = 32,
) -> np.ndarray:
    layers, num_logical = load.shape
    num_physical = current.shape[1]
    target = deepseek_placement(load, num_physical, num_groups, num_nodes, num_ranks)
    target_counts = np.stack([np.bincount(row, minlength=num_logical) for row in target])
    target_max = (
        (load / np.maximum(target_counts, 1))[np.arange(layers)[:, None], target].reshape(layers, num_ranks, -1).sum(axis=2).max(axis=1)
    )
    limits = target_max * (1 + tolerance)
    aligned = keep_in_place(target, current, num_physical // num_ranks)  # the fallback, per layer
    out = np.stack([_fix_replica_counts(load[l], current[l], target_counts[l], num_ranks) for l in range(layers)])
    # a layer may swap only while it still moves fewer slots than the fallback would
    budget = np.minimum(((aligned != current).sum(axis=1) - (out != current).sum(axis=1)) // 2, max_swaps)
    out = _swap_down(load, out, num_ranks, limits, np.maximum(budget, 0))
    per_replica = load / np.maximum(target_counts, 1)
    peak = np.take_along_axis(per_replica, out, axis=1).reshape(layers, num_ranks, -1).sum(axis=2).max(axis=1)
    fallback = np.nonzero(peak > limits * (1 + 1e-9))[0]
    if len(fallback):
        out[fallback] = aligned[fallback]
    return out


@register_policy("min-move")
class MinMovePolicy(Policy):
    def __init__(self, tolerance: float = 0.01):
        self.tolerance = tolerance

    def place(self, inp: PlanInput) -> np.ndarray:
        t = inp.topo
        return min_move_placement(inp.logical_load, inp.current, t.num_groups, t.num_nodes, t.num_ranks, self.tolerance)
