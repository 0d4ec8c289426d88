"""`min-move` (the default): balance like a packing from scratch, move only what pays for itself.

A plan from scratch (`greedy`, `deepseek`, vLLM's default) reshuffles most slots on every
rebalance, and every moved slot is an expert's weights crossing the interconnect. This policy
starts from the placement in force and changes it only where that buys pass time:

1. Replica counts: the counts `greedy` would give (each redundant slot to the expert whose
   replicas cost most per pass). An expert whose replicas would cost more than the largest
   replica of those counts gains replicas, in slots taken from experts with more replicas than
   they need (those on the ranks that end lightest first): one moved slot per replica.
2. Swaps: per layer, the heaviest ranks each swap one slot with one of the lightest ranks (the
   pair whose loads end closest), for as many ranks as the layer's slowest rank drops by more
   than the swaps cost (`CostModel.move_penalty` per moved slot), until the slowest rank is within
   `tolerance` of a lower bound on any packing's (`pack_bound`).
3. A layer still far above the bound (a few large replicas that pairwise swaps cannot sort out)
   re-packs its large replicas heaviest first, each staying on its rank while the rank stays
   within the target, then swaps again; kept only where that pays for its moves.
4. A layer further still (the first plan after start-up, a large shift) is packed afresh as
   `greedy` packs, aligned with the slots in force, then swapped; kept where it pays.

Costs are the cost model's seconds per pass (token work plus one weight read per activated
replica) when the load's pass count is known, else tokens (a moved slot must then save
DEFAULT_MOVE_SHARE of the layer's mean rank load). Every step is vectorised over layers: a
DeepSeek-V3 plan (58 layers x 288 slots on 32 ranks) takes a few milliseconds.
Packs globally, as `greedy` does (DeepSeek's EPLB advises global balancing for decode at large
expert parallelism); `deepseek` keeps expert groups within nodes.
"""

from __future__ import annotations

import numpy as np

from ..cost_model import CostModel
from .base import PlanInput, Policy, keep_in_place, register_policy
from .greedy import pack

DEFAULT_MOVE_SHARE = 5e-4  # token model: a moved slot must save this share of the mean rank load
BIG_SHARE = 0.1  # a replica is large above this share of the mean rank load (step 3)
FAR = 0.02  # step 3 runs on layers whose slowest rank is this far above the target
SWAP_ROUNDS = 24
FRESH = 1.1  # step 4: layers whose slowest rank is this far above the target
PAIRS = 8  # rank pairs swapped per layer and round


def _counts(placement: np.ndarray, num_logical: int) -> np.ndarray:
    layers = placement.shape[0]
    flat = (placement + num_logical * np.arange(layers)[:, None]).reshape(-1)
    return np.bincount(flat, minlength=layers * num_logical).reshape(layers, num_logical)


def replicate(load: np.ndarray, num_physical: int, cost) -> np.ndarray:
    """(layers, logical) replica counts: each redundant slot to the expert whose replicas cost
    most at that moment (as `greedy` does). Only the `redundant` most loaded experts can win one:
    an expert wins only while it costs more than every expert loaded above it costs alone."""
    layers, num_logical = load.shape
    extra = num_physical - num_logical
    counts = np.ones((layers, num_logical), dtype=np.int64)
    if extra <= 0:
        return counts
    rows = np.arange(layers)
    cand = np.argpartition(-load, extra - 1, axis=1)[:, :extra] if extra < num_logical else np.tile(np.arange(num_logical), (layers, 1))
    cand_load = np.take_along_axis(load, cand, axis=1)
    cand_counts = np.ones_like(cand)
    for _ in range(extra):
        cand_counts[rows, np.argmax(cost(cand_load, cand_counts), axis=1)] += 1
    counts[rows[:, None], cand] = cand_counts
    return counts


def pack_bound(w: np.ndarray, num_ranks: int, slots_per_rank: int) -> np.ndarray:
    """(layers,) a lower bound on the slowest rank of any packing of replicas of weights w
    (layers, slots) into ranks of slots_per_rank slots: the mean, and for k = 0.. the k + 1
    smallest of the k * ranks + 1 largest replicas (two of them share a rank) plus the
    slots_per_rank - k - 1 smallest replicas."""
    layers, slots = w.shape
    desc = -np.sort(-w, axis=1)
    cum = np.concatenate([np.zeros((layers, 1)), np.cumsum(desc, axis=1)], axis=1)
    smallest = np.concatenate([np.zeros((layers, 1)), np.cumsum(desc[:, ::-1], axis=1)], axis=1)
    bound = cum[:, -1] / num_ranks
    for k in range(slots_per_rank):
        top = k * num_ranks + 1
        if top > slots:
            break
        bound = np.maximum(bound, cum[:, top] - cum[:, top - k - 1] + smallest[:, slots_per_rank - k - 1])
    return bound


def _fix_counts(load, current, num_ranks, need, cost):
    """Give every expert at least `need` replicas, changing one slot per replica gained. The
    slots come from experts with more than they need; those whose ranks end lightest first.
    New replicas go heaviest first to the freed slots of the lightest ranks (one at a time,
    never to a rank holding the expert, in a layer where that would double one)."""
    layers, slots = current.shape
    num_logical = load.shape[1]
    per_rank = slots // num_ranks
    rows = np.arange(layers)
    c0 = _counts(current, num_logical)
    deficit = np.maximum(need - c0, 0)
    wanted = deficit.sum(axis=1)
    if not wanted.any():
        return current.copy()
    surplus = np.maximum(c0 - need, 0)
    w0 = np.take_along_axis(cost(load, c0), current, axis=1)
    loads = w0.reshape(layers, num_ranks, per_rank).sum(axis=2)
    slot_rank = np.arange(slots) // per_rank
    # donor slots, ordered by the load their rank keeps without them; at most `surplus` per expert
    donor = np.take_along_axis(surplus, current, axis=1) > 0
    order = np.argsort(np.where(donor, loads[:, slot_rank] - w0, np.inf), axis=1, kind="stable")
    experts = np.take_along_axis(current, order, axis=1)
    by_expert = np.argsort(experts, axis=1, kind="stable")
    sorted_e = np.take_along_axis(experts, by_expert, axis=1)
    starts = np.ones(sorted_e.shape, dtype=bool)
    starts[:, 1:] = sorted_e[:, 1:] != sorted_e[:, :-1]
    first = np.maximum.accumulate(np.where(starts, np.arange(slots), 0), axis=1)
    nth = np.empty_like(first)
    np.put_along_axis(nth, by_expert, np.arange(slots) - first, axis=1)
    usable = np.take_along_axis(donor, order, axis=1) & (nth < np.take_along_axis(surplus, experts, axis=1))
    taken = usable & (np.cumsum(usable, axis=1) <= wanted[:, None])
    freed = np.zeros((layers, slots), dtype=bool)
    np.put_along_axis(freed, order, taken, axis=1)

    counts = c0 + deficit
    np.subtract.at(counts, (np.nonzero(freed)[0], current[freed]), 1)
    w_new = cost(load, counts)
    loads -= np.where(freed, w0, 0.0).reshape(layers, num_ranks, per_rank).sum(axis=2)
    # the replicas to add, per layer heaviest first, padded with -1
    by_weight = np.argsort(np.where(deficit > 0, -w_new, np.inf), axis=1, kind="stable")
    reps = np.repeat(by_weight.reshape(-1), np.take_along_axis(deficit, by_weight, axis=1).reshape(-1))
    todo = np.full((layers, int(wanted.max())), -1, dtype=np.int64)
    todo[np.repeat(rows, wanted), np.arange(len(reps)) - np.repeat(np.cumsum(wanted) - wanted, wanted)] = reps
    # the k-th heaviest into the k-th freed slot, freed slots ordered by their rank's load (a
    # rank's second freed slot as if the mean new replica had filled its first)
    nth = (np.cumsum(freed.reshape(layers, num_ranks, per_rank), axis=2) - 1).reshape(layers, slots)
    mean_new = np.where(todo >= 0, np.take_along_axis(w_new, np.maximum(todo, 0), axis=1), 0).sum(axis=1) / wanted.clip(1)
    key = np.where(freed, loads[:, slot_rank] + nth * mean_new[:, None], np.inf)
    into = np.argsort(key, axis=1, kind="stable")[:, : todo.shape[1]]
    out = current.copy()
    valid = todo >= 0
    out[np.nonzero(valid)[0], into[valid]] = todo[valid]
    # where that put an expert twice on a rank, place those layers' replicas one at a time
    twice = _doubles(out, num_ranks) > _doubles(current, num_ranks)
    again = np.nonzero(twice)[0]
    if len(again):
        out[again] = current[again]
        freed_a, loads_a = freed[again], loads[again]
        holds = np.zeros((len(again), num_ranks, num_logical), dtype=bool)
        kept_l, kept_s = np.nonzero(~freed_a)
        holds[kept_l, slot_rank[kept_s], current[again][kept_l, kept_s]] = True
        free_count = freed_a.reshape(len(again), num_ranks, per_rank).sum(axis=2)
        for j in range(todo.shape[1]):
            act = np.nonzero(todo[again, j] >= 0)[0]
            e = todo[again[act], j]
            ok = (free_count[act] > 0) & ~holds[act, :, e]
            ok = np.where(ok.any(axis=1, keepdims=True), ok, free_count[act] > 0)
            r = np.argmin(np.where(ok, loads_a[act], np.inf), axis=1)
            s = r * per_rank + freed_a[act].reshape(-1, num_ranks, per_rank)[np.arange(len(act)), r].argmax(axis=1)
            out[again[act], s] = e
            freed_a[act, s] = False
            free_count[act, r] -= 1
            holds[act, r, e] = True
            loads_a[act, r] += w_new[again[act], e]
    return out


def _doubles(placement: np.ndarray, num_ranks: int) -> np.ndarray:
    """(layers,) slots holding an expert their rank already holds in another slot."""
    by_rank = np.sort(placement.reshape(placement.shape[0], num_ranks, -1), axis=2)
    return (by_rank[:, :, 1:] == by_rank[:, :, :-1]).sum(axis=(1, 2))


def _swap_down(placement, w, num_ranks, penalty, floor, rounds=SWAP_ROUNDS, pairs=PAIRS):
    """Each round, per layer: the k heaviest ranks swap one slot each with the k lightest (the
    i-th heaviest with the i-th lightest; per pair the slot pair whose loads end closest, no rank
    holding an expert twice), k chosen to maximise the drop of the layer's slowest rank minus
    `penalty` per moved slot. A layer stops at `floor` or when no k pays. w: per-slot costs,
    unchanged by swaps (counts stay)."""
    layers, slots = placement.shape
    per_rank = slots // num_ranks
    m = min(pairs, num_ranks // 2)
    if m < 1:
        return placement, w
    placement, w = placement.copy(), w.copy()
    by_rank_p = placement.reshape(layers, num_ranks, per_rank)  # views: swaps write through
    by_rank_w = w.reshape(layers, num_ranks, per_rank)
    moves_cost = 2 * np.arange(1, m + 1)[None, :] * np.broadcast_to(penalty, (layers,))[:, None]
    floor = np.broadcast_to(floor, (layers,))
    live = np.arange(layers)
    for _ in range(rounds):
        loads = by_rank_w[live].sum(axis=2)
        order = np.argsort(-loads, axis=1, kind="stable")
        ranked = np.take_along_axis(loads, order, axis=1)
        keep = ranked[:, 0] > floor[live]
        live, order, ranked = live[keep], order[keep], ranked[keep]
        if not len(live):
            break
        n = np.arange(len(live))[:, None]
        heavy, light = order[:, :m], order[:, : -m - 1 : -1]
        wa, wb = by_rank_w[live[:, None], heavy], by_rank_w[live[:, None], light]  # (n, m, slots per rank)
        ea, eb = by_rank_p[live[:, None], heavy], by_rank_p[live[:, None], light]
        delta = wa[..., :, None] - wb[..., None, :]
        half = ((ranked[:, :m] - ranked[:, : -m - 1 : -1]) / 2)[..., None, None]
        score = np.abs(delta - half)  # >= half: the pair would not both end below the heavier's load
        same = ea[..., :, None] == eb[..., None, :]
        score[same.any(axis=3)[..., :, None] | same.any(axis=2)[..., None, :] | (score >= half)] = np.inf
        score = score.reshape(len(live), m, -1)
        best = score.argmin(axis=2)
        ok = np.isfinite(score[n, np.arange(m), best])
        d = np.where(ok, delta.reshape(len(live), m, -1)[n, np.arange(m), best], 0.0)
        # the layer's slowest rank once the k heaviest swapped: their new loads, their partners',
        # and the (k+1)-th heaviest rank's
        after = np.maximum(np.maximum.accumulate(ranked[:, :m] - d, axis=1),
                           np.maximum.accumulate(ranked[:, : -m - 1 : -1] + d, axis=1))
        after = np.maximum(after, ranked[:, 1 : m + 1])
        gain = np.where(np.logical_and.accumulate(ok, axis=1), ranked[:, :1] - after - moves_cost[live], -np.inf)
        k = gain.argmax(axis=1)
        take = gain[n[:, 0], k] > 0
        li, pi = np.nonzero((np.arange(m)[None, :] <= k[:, None]) & take[:, None])
        if not len(li):
            break
        i, j = np.divmod(best[li, pi], per_rank)
        lay, ra, rb = live[li], heavy[li, pi], light[li, pi]
        ea_, eb_ = by_rank_p[lay, ra, i], by_rank_p[lay, rb, j]
        by_rank_p[lay, ra, i], by_rank_p[lay, rb, j] = eb_, ea_
        wa_, wb_ = by_rank_w[lay, ra, i], by_rank_w[lay, rb, j]
        by_rank_w[lay, ra, i], by_rank_w[lay, rb, j] = wb_, wa_
        live = live[take]
    return placement, w


def _repack_large(placement, w, num_ranks, target, num_logical):
    """Large replicas (above BIG_SHARE of the mean rank load) re-packed heaviest first: each stays
    on its rank while that rank stays within `target`, else goes to the lightest rank with a
    large-replica slot free (not holding its expert). Small replicas stay; ranks keep their
    number of large slots."""
    layers, slots = placement.shape
    per_rank = slots // num_ranks
    rows = np.arange(layers)
    big = w > (BIG_SHARE * w.sum(axis=1) / num_ranks)[:, None]
    nbig = big.sum(axis=1)
    loads = np.where(big, 0.0, w).reshape(layers, num_ranks, per_rank).sum(axis=2)
    room = big.reshape(layers, num_ranks, per_rank).sum(axis=2)
    order = np.argsort(np.where(big, -w, np.inf), axis=1, kind="stable")
    holds = np.zeros((layers, num_ranks, num_logical), dtype=bool)
    dest = np.full(order.shape, -1)
    for k in range(int(nbig.max(initial=0))):
        act = np.nonzero(k < nbig)[0]
        s = order[act, k]
        e, wk, home = placement[act, s], w[act, s], s // per_rank
        free = (room[act] > 0) & ~holds[act, :, e]
        free = np.where(free.any(axis=1, keepdims=True), free, room[act] > 0)
        n = np.arange(len(act))
        stay = free[n, home] & (loads[act, home] + wk <= target[act])
        r = np.where(stay, home, np.argmin(np.where(free, loads[act], np.inf), axis=1))
        loads[act, r] += wk
        room[act, r] -= 1
        holds[act, r, e] = True
        dest[act, k] = r
    # movers into the large slots their destination ranks vacated: both sorted by (layer, rank)
    src = order
    movers = (dest >= 0) & (dest != src // per_rank)
    ml, mk = np.nonzero(movers)
    into = np.argsort(ml * num_ranks + dest[ml, mk], kind="stable")
    vacated = np.argsort(ml * num_ranks + src[ml, mk] // per_rank, kind="stable")
    out = placement.copy()
    out[ml[vacated], src[ml, mk][vacated]] = placement[ml[into], src[ml, mk][into]]
    return out


def min_move_placement(
    load: np.ndarray, current: np.ndarray, num_ranks: int, tolerance: float = 0.01, cost: CostModel | None = None,
    passes: float = 0.0,
) -> np.ndarray:
    """The placement (layers, slots) min-move plans from `current` for `load` (layers, logical)
    summed over `passes` forward passes (0: unknown, plan in tokens)."""
    layers, slots = current.shape
    num_logical = load.shape[1]
    per_rank = slots // num_ranks
    load = np.asarray(load, dtype=np.float64)
    if cost is not None and passes > 0:
        per_pass = 1.0 / passes

        def weigh(x, c):
            return cost.replica_seconds(x * per_pass, c)

        penalty = np.full(layers, cost.move_penalty())
    else:
        def weigh(x, c):
            return x / c  # counts are >= 1 wherever weighed

        penalty = DEFAULT_MOVE_SHARE * load.sum(axis=1) / num_ranks
    target_counts = replicate(load, slots, weigh)
    cap = weigh(load, target_counts).max(axis=1)
    # the fewest replicas each expert needs to cost at most `cap`
    if cost is None or passes <= 0:
        need = np.maximum(np.ceil(load / cap[:, None] * (1 - 1e-12)), 1).astype(np.int64)
    else:
        need = np.ones_like(target_counts)
        while True:  # counts are small
            over = weigh(load, need) > cap[:, None] * (1 + 1e-12)
            if not over.any():
                break
            need += over
    out = _fix_counts(load, current, num_ranks, need, weigh)
    w = np.take_along_axis(weigh(load, _counts(out, num_logical)), out, axis=1)
    target = np.maximum(pack_bound(w, num_ranks, per_rank), w.sum(axis=1) / num_ranks) * (1 + tolerance)
    out, w = _swap_down(out, w, num_ranks, penalty, target, SWAP_ROUNDS, PAIRS)

    def peak_of(w_):
        return w_.reshape(len(w_), num_ranks, per_rank).sum(axis=2).max(axis=1)

    def try_instead(rows, candidate):
        """Swap `candidate` (for layers `rows`) down too; keep it where its slowest rank's drop
        pays for the slots it moves beyond the plan's."""
        cw = np.take_along_axis(weigh(load[rows], _counts(candidate, num_logical)), candidate, axis=1)
        candidate, cw = _swap_down(candidate, cw, num_ranks, penalty[rows], target[rows], SWAP_ROUNDS, PAIRS)
        extra = (candidate != current[rows]).sum(axis=1) - (out[rows] != current[rows]).sum(axis=1)
        better = peak_of(w[rows]) - peak_of(cw) > penalty[rows] * extra
        out[rows[better]], w[rows[better]] = candidate[better], cw[better]

    # 3. layers far above the target: re-pack their large replicas
    far = np.nonzero(peak_of(w) > target * (1 + FAR))[0]
    if len(far):
        try_instead(far, _repack_large(out[far], w[far], num_ranks, target[far], num_logical))
    # 4. still much further (the first plan after start-up, a large shift): pack afresh, largest
    # replica first onto the least loaded rank (pack() weighs a replica as load / count: hand it
    # cost x count), aligned with the slots in force
    fresh = np.nonzero(peak_of(w) > target * FRESH)[0]
    if len(fresh):
        counts = target_counts[fresh]
        packed = pack(weigh(load[fresh], counts) * counts, counts, num_ranks, per_rank)
        try_instead(fresh, keep_in_place(packed, current[fresh], per_rank))
    return out


@register_policy("min-move")
class MinMovePolicy(Policy):
    def __init__(self, tolerance: float = 0.01, cost: CostModel | None = None):
        self.tolerance = tolerance
        self.cost = cost

    def place(self, inp: PlanInput) -> np.ndarray:
        return min_move_placement(
            inp.logical_load, inp.current, inp.topo.num_ranks, self.tolerance, self.cost, inp.passes
        )
