"""`min-move` (the default): balance like a packing from scratch, move only what pays for itself.

A plan from scratch (`greedy`, `deepseek`, vLLM's default) reshuffles most slots on every
rebalance, and every moved slot is an expert's weights crossing the interconnect. This policy
starts from the placement in force and changes it only where that buys pass time:

1. Replica counts: the counts `greedy` would give (each redundant slot to the expert whose
   replicas cost most per pass). An expert whose replicas would cost more than the largest
   replica of those counts gains replicas, in slots taken from experts with more replicas than
   they need (those on the ranks that end lightest first): one moved slot per replica. In a
   layer whose large replicas at those counts bound the slowest rank more than BOUND_GAP above
   the mean rank (strong skew), replicas of up to LARGE_CAP of a mean rank are left as they are:
   fewer, larger replicas that pack with the small ones (DeepSeek-V3 at Zipf 1.4: balance 0.97,
   where `greedy`'s counts reach 0.88).
2. Shedding: per layer, each rank above the target (`tolerance` of the token work above a lower
   bound on any packing's slowest rank, `pack_bound`) swaps one slot with one of the lightest
   ranks: the swap that brings both within the target with the fewest moved slots, else the one
   that cuts the most load above the target per moved slot. A slot moved already in this plan
   costs nothing more to move again, so swaps chain: a light rank passes on what it took, and
   one light rank takes the excess of several heavy ranks for one more moved slot each (the
   moved slots of every rank below the target are candidates, not only the lightest few). A swap
   must cut the load above the target by more than it costs (`CostModel.move_penalty` per moved
   slot: a moved slot's pass time over the passes the plan stays in force).
3. A layer still far above the target (a few large replicas that swaps cannot sort out)
   re-packs its large replicas heaviest first, each staying on its rank while the rank stays
   within the target, then sheds again; kept only where that pays for its moves.
4. A layer further still (the first plan after start-up, a large shift) is packed afresh as
   `greedy` packs and as `deepseek` packs, each with its ranks renumbered to keep what the
   ranks hold and its slots aligned with those in force, then shed; kept where it pays. In a
   small plan (SMALL_PLAN slots over all layers: a few ranks of few slots, Mixtral's 8 experts
   on 4-8 ranks) swaps move a large share of a rank and stop short, so every layer whose slowest
   rank is above the mean by more than the tolerance tries the packs, kept where they lower the
   slowest rank by more than the tolerance (Mixtral-8x7B at EP=8: 0.90-0.94 balance where the
   shedding alone gave 0.87-0.93 and vLLM's policy 0.89-0.95; docs/benchmarks.md section 4,
   2026-12-07).

Costs are the cost model's seconds per pass (token work plus one weight read per activated
replica) when the load's pass count is known, else tokens (a moved slot must then save
DEFAULT_MOVE_SHARE of the layer's mean rank load). The costs are numpy over all layers; the walks
(`greedy`'s replica counts, which slots give way and where new replicas go, the shedding, the
re-packing) are
numba loops (min_move_jit.py): a DeepSeek-V3 plan (58 layers x 288 slots on 32 ranks) takes
6.4-9.0 ms median in the planner process on this project's 2-core box, where vLLM's own policy
takes 46-60 ms in the same runs (docs/benchmarks.md section 4, 2026-12-06, fifth pass).
Packs globally, as `greedy` does (DeepSeek's EPLB advises global balancing for decode at large
expert parallelism); `deepseek` keeps expert groups within nodes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..cost_model import CostModel
from .base import PlanInput, Policy, keep_in_place, register_policy
from .deepseek import deepseek_placement
from .greedy import pack

DEFAULT_MOVE_SHARE = 5e-4  # token model: a moved slot must save this share of the mean rank load
BIG_SHARE = 0.1  # a replica is large above this share of the mean rank load (step 3)
FAR = 0.05  # step 3 runs on layers whose slowest rank is this far above the target
FRESH = 1.3  # step 4: layers whose slowest rank is this far above the target
LARGE_CAP = 0.85  # step 1, layers bound by large replicas: replicas up to this share of a mean rank may stay
BOUND_GAP = 0.02  # step 1: layers whose packing bound is this far above the mean rank
SMALL_PLAN = 4096  # step 4: plans of at most this many slots (all layers) try fresh packs on every uneven layer


def _jit():
    """min-move's compiled loops (min_move_jit), imported on first use: numba stays out of
    processes that never plan. vLLM's CPU platform walks the attributes of every loaded module
    when a worker starts, and numba's objects break that walk (`AttributeError:
    '_lib_fn_wrapper' object has no attribute 'get'`, the engine dies)."""
    from . import min_move_jit

    return min_move_jit


def _counts(placement: np.ndarray, num_logical: int) -> np.ndarray:
    layers = placement.shape[0]
    flat = (placement + num_logical * np.arange(layers)[:, None]).reshape(-1)
    return np.bincount(flat, minlength=layers * num_logical).reshape(layers, num_logical)


def pack_bound(w: np.ndarray, num_ranks: int, slots_per_rank: int) -> np.ndarray:
    """(layers,) a lower bound on the slowest rank of any packing of replicas of weights w
    (layers, slots) into ranks of slots_per_rank slots: the mean, and for k = 0.. the k + 1
    smallest of the k * ranks + 1 largest replicas (two of them share a rank) plus the
    slots_per_rank - k - 1 smallest replicas."""
    layers, slots = w.shape
    desc = -np.sort(-w, axis=1)
    cum = np.concatenate([np.zeros((layers, 1)), np.cumsum(desc, axis=1)], axis=1)
    smallest = np.concatenate([np.zeros((layers, 1)), np.cumsum(desc[:, ::-1], axis=1)], axis=1)
    k = np.arange(slots_per_rank)
    k = k[k * num_ranks + 1 <= slots]
    top = k * num_ranks + 1
    shared = cum[:, top] - cum[:, top - k - 1] + smallest[:, slots_per_rank - k - 1]  # (layers, k)
    return np.maximum(cum[:, -1] / num_ranks, shared.max(axis=1, initial=-np.inf))


def _fix_counts(load, current, num_ranks, need, cost):
    """Give every expert at least `need` replicas, changing one slot per replica gained. The
    slots come from experts with more than they need; those whose ranks end lightest first.
    New replicas go heaviest first to the freed slots of the lightest ranks (one at a time,
    never to a rank holding the expert, in a layer where that would double one). The per-slot
    walks are numba loops (min_move_jit.freed_slots, place_replicas); the costs are numpy's."""
    layers, slots = current.shape
    num_logical = load.shape[1]
    per_rank = slots // num_ranks
    c0 = _counts(current, num_logical)
    deficit = np.maximum(need - c0, 0)
    if not deficit.any():
        return current.copy()
    w0 = np.take_along_axis(cost(load, c0), current, axis=1)
    loads = w0.reshape(layers, num_ranks, per_rank).sum(axis=2)
    freed = _jit().freed_slots(current, c0, need, w0, loads)
    # slots each expert gave way (kept slots counted under the sentinel num_logical, dropped)
    given = _counts(np.where(freed, current, num_logical), num_logical + 1)[:, :num_logical]
    counts = c0 + deficit - given
    loads -= np.where(freed, w0, 0.0).reshape(layers, num_ranks, per_rank).sum(axis=2)
    return _jit().place_replicas(current, freed, deficit, cost(load, counts), loads)


def _replica_counts(load, num_physical, weigh, model):
    """(counts, cap): the replica counts `greedy` gives (each redundant slot to the expert whose
    replicas cost most at that moment), and the largest per-replica cost under them. Only the
    `redundant` most loaded experts can win a slot; the steps are a numba loop
    (min_move_jit.grow_counts) weighing as `weigh` does: `model` is (token_seconds,
    read_seconds, per_pass) of the cost model, per_pass 0 for tokens."""
    layers, num_logical = load.shape
    extra = num_physical - num_logical
    counts = np.ones((layers, num_logical), dtype=np.int64)
    if extra <= 0:
        return counts, weigh(load, counts).max(axis=1)
    rows = np.arange(layers)
    if extra < num_logical:
        cand = np.argpartition(-load, extra - 1, axis=1)[:, :extra]
    else:
        cand = np.tile(np.arange(num_logical), (layers, 1))
    cand_load = np.take_along_axis(load, cand, axis=1)
    counts[rows[:, None], cand] = _jit().grow_counts(cand_load, extra, *model)
    cap = np.maximum(weigh(load, counts).max(axis=1), 0.0)
    return counts, cap


def _needed(load, counts, cap, weigh):
    """The fewest replicas each expert needs for none to cost more than `cap` (at most `counts`)."""
    need = np.ones_like(counts)
    hot = counts > 1
    if not hot.any():
        return need
    li, ei = np.nonzero(hot)
    kmax = int(counts.max())
    k = np.arange(1, kmax + 1)
    v = weigh(load[li, ei][:, None], k[None, :])  # (hot, kmax)
    over = (v > cap[li][:, None] * (1 + 1e-12)) & (k[None, :] < counts[li, ei][:, None])
    need[li, ei] = 1 + over.sum(axis=1)
    return need


def _repack_large(placement, w, num_ranks, target, num_logical):
    """Large replicas (above BIG_SHARE of the mean rank load) re-packed heaviest first: each stays
    on its rank while that rank stays within `target`, else goes to the lightest rank with a
    large-replica slot free (not holding its expert). Small replicas stay; ranks keep their
    number of large slots."""
    per_rank = placement.shape[1] // num_ranks
    big = w > (BIG_SHARE * w.sum(axis=1) / num_ranks)[:, None]
    order, dest = _jit().repack_destinations(placement, w, big, target, num_ranks, num_logical)
    # movers into the large slots their destination ranks vacated: both sorted by (layer, rank)
    src = order
    movers = (dest >= 0) & (dest != src // per_rank)
    ml, mk = np.nonzero(movers)
    into = np.argsort(ml * num_ranks + dest[ml, mk], kind="stable")
    vacated = np.argsort(ml * num_ranks + src[ml, mk] // per_rank, kind="stable")
    out = placement.copy()
    out[ml[vacated], src[ml, mk][vacated]] = placement[ml[into], src[ml, mk][into]]
    return out


@dataclass
class Start:
    """Where min-move's shedding starts: the replica counts fixed (step 1) and what it aims at."""

    placement: np.ndarray  # (layers, slots) after the replica-count fix
    w: np.ndarray  # (layers, slots) each slot's cost per pass (or tokens) at those counts
    target: np.ndarray  # (layers,) the most a rank may cost
    slack: np.ndarray  # (layers,) what the tolerance adds to the lower bound in the target
    penalty: np.ndarray  # (layers,) what a moved slot must save
    weigh: Callable  # (load, counts) -> per-replica cost
    target_counts: np.ndarray  # (layers, logical) `greedy`'s replica counts


def start(
    load: np.ndarray, current: np.ndarray, num_ranks: int, tolerance: float = 0.01, cost: CostModel | None = None,
    passes: float = 0.0,
) -> Start:
    """Step 1 and the target of `min_move_placement` (benchmarks/policies.py reads it for the
    floor on slots moved)."""
    layers, slots = current.shape
    num_logical = load.shape[1]
    per_rank = slots // num_ranks
    load = np.asarray(load, dtype=np.float64)
    if cost is not None and passes > 0:
        per_pass = 1.0 / passes

        def weigh(x, c):
            return cost.replica_seconds(x * per_pass, c)

        model = (cost.token_seconds, cost.read_seconds, per_pass)
        penalty = np.full(layers, cost.move_penalty())
        fixed = per_rank * cost.read_seconds  # a rank's weight reads: the tolerance is on token work
    else:
        def weigh(x, c):
            return x / c  # counts are >= 1 wherever weighed

        model = (0.0, 0.0, 0.0)
        penalty = DEFAULT_MOVE_SHARE * load.sum(axis=1) / num_ranks
        fixed = 0.0
    target_counts, cap = _replica_counts(load, slots, weigh, model)
    # layers whose large replicas (at `greedy`'s counts) bound the slowest rank well above the
    # mean rank: experts whose replicas cost up to LARGE_CAP of a mean rank keep the replicas
    # they have (fewer, larger replicas, which pack with the small ones where greedy's do not)
    per_replica = weigh(load, target_counts)
    w_t = np.repeat(per_replica.reshape(-1), target_counts.reshape(-1)).reshape(layers, slots)
    mean_t = w_t.sum(axis=1) / num_ranks
    tight = pack_bound(w_t, num_ranks, per_rank) > mean_t * (1 + BOUND_GAP)
    cap = np.where(tight, np.maximum(cap, LARGE_CAP * mean_t), cap)
    need = _needed(load, target_counts, cap, weigh)
    out = _fix_counts(load, current, num_ranks, need, weigh)
    w = np.take_along_axis(weigh(load, _counts(out, num_logical)), out, axis=1)
    mean = w.sum(axis=1) / num_ranks
    bound = pack_bound(w, num_ranks, per_rank)
    slack = tolerance * np.maximum(mean - fixed, 0.0)
    return Start(out, w, np.maximum(bound, mean) + slack, slack, penalty, weigh, target_counts)


def min_move_placement(
    load: np.ndarray, current: np.ndarray, num_ranks: int, tolerance: float = 0.01, cost: CostModel | None = None,
    passes: float = 0.0,
) -> np.ndarray:
    """The placement (layers, slots) min-move plans from `current` for `load` (layers, logical)
    summed over `passes` forward passes (0: unknown, plan in tokens)."""
    num_logical = load.shape[1]
    per_rank = current.shape[1] // num_ranks
    load = np.asarray(load, dtype=np.float64)
    st = start(load, current, num_ranks, tolerance, cost, passes)
    out, w, target, penalty, weigh = st.placement, st.w, st.target, st.penalty, st.weigh
    out, w = _jit().shed(out, w, current, num_ranks, target, penalty)

    def peak_of(w_):
        return w_.reshape(len(w_), num_ranks, per_rank).sum(axis=2).max(axis=1)

    def try_instead(rows, candidate, need):
        """Swap `candidate` (for layers `rows`) down too; keep it where its slowest rank's drop
        exceeds `need` and pays for the slots it moves beyond the plan's."""
        cw = np.take_along_axis(weigh(load[rows], _counts(candidate, num_logical)), candidate, axis=1)
        candidate, cw = _jit().shed(candidate, cw, current[rows], num_ranks, target[rows], penalty[rows])
        extra = (candidate != current[rows]).sum(axis=1) - (out[rows] != current[rows]).sum(axis=1)
        drop = peak_of(w[rows]) - peak_of(cw)
        better = (drop > penalty[rows] * extra) & (drop > need)
        out[rows[better]], w[rows[better]] = candidate[better], cw[better]

    # 3. layers far above the target: re-pack their large replicas
    far = np.nonzero(peak_of(w) > target * (1 + FAR))[0]
    if len(far):
        try_instead(far, _repack_large(out[far], w[far], num_ranks, target[far], num_logical), 0.0)
    # 4. still much further (the first plan after start-up, a large shift): pack afresh, as
    # `greedy` packs (largest replica first onto the least loaded rank; pack() weighs a replica
    # as load / count: hand it cost x count) and as `deepseek` packs (its own replica counts, an
    # equal number of replicas per rank), each with its ranks renumbered to keep what the ranks
    # hold (align_ranks) and its slots aligned with those in force. A small plan (SMALL_PLAN: a
    # few ranks of few slots, where a swap moves a large share of a rank and the shedding stops
    # short; the packs cost little there) tries them on every layer whose slowest rank is above
    # the mean rank by more than the tolerance (not only above the target: with few slots, other
    # replica counts than step 1's can lower the bound the target rests on), kept where the
    # slowest rank drops by more than the tolerance's slack
    peak = peak_of(w)
    far_out = peak > target * FRESH
    if out.size <= SMALL_PLAN:
        near = (peak > w.sum(axis=1) / num_ranks + st.slack) & ~far_out
    else:
        near = np.zeros_like(far_out)
    fresh = np.nonzero(far_out | near)[0]
    if len(fresh):
        need = np.where(near[fresh], st.slack[fresh], 0.0)
        counts = st.target_counts[fresh]
        for packed in (
            pack(weigh(load[fresh], counts) * counts, counts, num_ranks, per_rank),
            deepseek_placement(load[fresh], current.shape[1], 1, 1, num_ranks),
        ):
            aligned = _jit().align_ranks(packed, current[fresh], num_ranks)
            try_instead(fresh, keep_in_place(aligned, current[fresh], per_rank), need)
    return out


@register_policy("min-move")
class MinMovePolicy(Policy):
    def __init__(self, tolerance: float = 0.01, cost: CostModel | None = None):
        self.tolerance = tolerance
        self.cost = cost

    def warm_up(self) -> None:
        _jit().warm_up()  # compile its loops (or load them from numba's cache)

    def place(self, inp: PlanInput) -> np.ndarray:
        return min_move_placement(
            inp.logical_load, inp.current, inp.topo.num_ranks, self.tolerance, self.cost, inp.passes
        )
