"""min-move's per-layer loops, compiled with numba: the shedding (step 2 of `min_move`) and
the re-packing of large replicas (step 3).

Shedding: per layer, the heaviest ranks above `target` each swap one slot with one of the lightest
ranks. Each round, each of up to HEAVY heavy ranks still above the target looks at its slots
and those of its own LIGHT of the lightest ranks, and takes the swap that brings both ranks
within the target with the fewest moved slots (then the smallest transfer: what the light ranks
can still take is left to the others), else the one cutting the most load above the target per
moved slot. Moved slots count against `current`: a slot moved once already moves no more when
swapped again, so swaps chain (a light rank passes on what it took, and one light rank absorbs
several heavy ranks' excess for one moved slot each). A swap must cut more than `penalty` per
slot it moves. Slot costs `w` travel with their slots (counts stay). A layer whose slowest rank
finds no swap is done: swaps elsewhere would not lower its slowest rank, only move slots.

Why compiled: the shedding search is a small loop per (heavy rank, light rank) pair that numpy
could only vectorise by scoring every candidate of every pair at once (about 250 per pair) and
round-tripping the whole state each round; as a loop it stops at what it needs and touches a few
kilobytes (DeepSeek-V3: about 15 ms of numpy per plan, 2-3 ms here); the re-packing is a loop
over a layer's large replicas, one numpy round per replica before. numba is a dependency vLLM
itself has. Candidates are scored in float32 in units of the layer's target, in the order and
with the operations of the vectorised version this replaced, so plans are the same bits. The
first call on a machine compiles (about 5 CPU-seconds; numba caches it on disk): the planner
process does it in its warm-up (`warm_up`), before its time counts, and
`python -m vllm_eplb.core.policies.min_move_jit` does it ahead (set-up, tests).
"""

from __future__ import annotations

import numba
import numpy as np

HEAVY = 4  # heavy ranks per layer that swap in one round
LIGHT = 3  # each with its own LIGHT of the lightest ranks
SHED_ITERS = 24  # rounds at most
HUGE = 1e30  # a slot cost (in units of the target) that strikes a swap off: finite, so no NaN


def shed(placement, w, current, num_ranks, target, penalty, iters=SHED_ITERS):
    """(placement, w) after shedding: copies of `placement` (layers, slots) and its slot costs
    `w` with the swaps made. `target` and `penalty` (>= 0: a move never pays for itself, which
    lets the search skip swaps that move no load): per layer, or one for all."""
    layers, slots = placement.shape
    heavy_n = max(1, min(HEAVY, num_ranks // 4))
    light_per = max(1, min(LIGHT, (num_ranks - heavy_n) // heavy_n))
    p = np.array(placement, dtype=np.int64, order="C")
    w = np.array(w, dtype=np.float64, order="C")
    loads = w.reshape(layers, num_ranks, slots // num_ranks).sum(axis=2)  # numpy's sums, as before
    target = np.ascontiguousarray(np.broadcast_to(target, (layers,)), dtype=np.float64)
    penalty = np.ascontiguousarray(np.broadcast_to(penalty, (layers,)), dtype=np.float64)
    if (penalty < 0).any():
        raise ValueError(f"min-move: a negative move penalty ({penalty.min()}): a move must cost >= 0")
    num_logical = int(placement.max(initial=0)) + 1
    _shed_layers(p, w, np.ascontiguousarray(current, dtype=np.int64), loads, target, penalty,
                 heavy_n, light_per, iters, num_logical)
    return p.astype(placement.dtype, copy=False), w


def warm_up() -> None:
    """Compile (or load from the cache) now, on a tiny layer."""
    p = np.arange(8, dtype=np.int64).reshape(1, 8)
    w = np.arange(8, dtype=np.float64).reshape(1, 8)
    shed(p, w, p, 4, np.array([1.0]), np.array([0.0]))
    repack_destinations(p, w, w > 3, np.array([1.0]), 4, 8)


@numba.njit(cache=True, nogil=True)
def _shed_layers(p, w, current, loads, target, penalty, heavy_n, light_per, iters, num_logical):
    num_ranks = loads.shape[1]
    for layer in range(p.shape[0]):
        _shed_layer(p[layer], w[layer], current[layer], loads[layer], target[layer], penalty[layer],
                    num_ranks, heavy_n, light_per, iters, num_logical)


@numba.njit(cache=True, nogil=True)
def _shed_layer(p, w, c, loads, t, pen, num_ranks, heavy_n, light_per, iters, num_logical):
    slots = p.shape[0]
    per_rank = slots // num_ranks
    inv = 1.0 / max(t, 1e-300)
    wn = np.empty(slots, dtype=np.float32)  # slot costs in units of the target
    moved = np.empty(slots, dtype=np.float32)  # 1: the slot moved already in this plan
    holds = np.zeros((num_ranks, num_logical), dtype=np.uint8)  # whether a rank holds an expert
    for s in range(slots):
        wn[s] = np.float32(w[s] * inv)
        moved[s] = np.float32(1.0) if p[s] != c[s] else np.float32(0.0)
        holds[s // per_rank, p[s]] = 1
    pen32 = np.float32(pen * inv)
    pick_a = np.empty(heavy_n, dtype=np.int64)
    pick_b = np.empty(heavy_n, dtype=np.int64)
    for _ in range(iters):
        if not loads.max() > t:
            return
        order = np.argsort(-loads, kind="mergesort")  # heaviest first (stable)
        for i in range(heavy_n):
            pick_a[i] = -1
            ra = order[i]
            if not loads[ra] > t:
                continue
            # its light ranks: the (i + j * heavy_n)-th lightest, ties to the higher rank first
            pick_a[i], pick_b[i] = _best_swap(p, wn, moved, holds, loads, t, inv, pen32, ra, order,
                                              i, heavy_n, light_per, per_rank)
        if pick_a[0] < 0:
            return  # the slowest rank finds no swap
        for i in range(heavy_n):  # disjoint ranks: in any order
            if pick_a[i] >= 0:
                _swap(p, w, wn, moved, c, loads, holds, pick_a[i], pick_b[i], per_rank)


@numba.njit(cache=True, nogil=True)
def _best_swap(p, wn, moved, holds, loads, t, inv, pen32, ra, order, i, heavy_n, light_per, per_rank):
    """(slot a, slot b) of heavy rank ra's best swap, or (-1, -1)."""
    num_ranks = loads.shape[0]
    zero, one, two, ten = np.float32(0.0), np.float32(1.0), np.float32(2.0), np.float32(10.0)
    milli, huge = np.float32(1e-3), np.float32(HUGE)
    x = np.float32((loads[ra] - t) * inv)  # excess of the heavy rank (> 0)
    best, best_a, best_b = zero, -1, -1
    for a in range(per_rank):
        sa = ra * per_rank + a
        wa, fa, ea = wn[sa], moved[sa], p[sa]
        for j in range(light_per):
            rb = order[num_ranks - 1 - (i + j * heavy_n)]
            # no rank may end up holding an expert twice: where light rank rb holds slot a's
            # expert, slot a finds no room there
            if holds[rb, ea]:
                continue  # y = -HUGE: every swap with rb cuts nothing
            y = np.float32((t - loads[rb]) * inv)  # room on rb
            for b in range(per_rank):
                sb = rb * per_rank + b
                wb = wn[sb]
                if wb >= wa or holds[ra, p[sb]]:
                    continue  # moves no load off the heavy rank (or, held there: adds load)
                fb = moved[sb]
                d = wa - wb  # load the swap moves from the heavy rank to the light one
                over = d - y
                if not over >= zero:
                    over = zero  # what it puts on the light rank above the target
                gain = (x if x <= d else d) - over  # the load above the target the swap removes
                full = d >= x and over <= zero  # both ranks end within the target
                dm = (two - fa) - fb  # slots moved beyond those moved already
                if not gain > dm * pen32:
                    continue  # cuts no more than the moves cost
                # full swaps: fewest moved slots, then the smallest transfer (about 8 to 10);
                # others: gain per moved slot (1 / max(dm, 0.5))
                if full:
                    score = (ten - dm) - d * milli
                else:
                    score = gain * (np.float32(0.5) * (two if fa > zero else one) * (two if fb > zero else one))
                if score > best:
                    best, best_a, best_b = score, sa, sb
    return best_a, best_b


@numba.njit(cache=True, nogil=True)
def _swap(p, w, wn, moved, c, loads, holds, sa, sb, per_rank):
    ea, eb = p[sa], p[sb]
    ra, rb = sa // per_rank, sb // per_rank
    p[sa], p[sb] = eb, ea
    w[sa], w[sb] = w[sb], w[sa]
    wn[sa], wn[sb] = wn[sb], wn[sa]
    moved[sa] = np.float32(1.0) if p[sa] != c[sa] else np.float32(0.0)
    moved[sb] = np.float32(1.0) if p[sb] != c[sb] else np.float32(0.0)
    loads[ra] += w[sa] - w[sb]
    loads[rb] += w[sb] - w[sa]
    # a rank still holds what it gave away if another of its slots holds it too
    holds[ra, ea] = 0
    holds[rb, eb] = 0
    for s in range(per_rank):
        if p[ra * per_rank + s] == ea:
            holds[ra, ea] = 1
        if p[rb * per_rank + s] == eb:
            holds[rb, eb] = 1
    holds[ra, eb] = 1
    holds[rb, ea] = 1


def repack_destinations(placement, w, big, target, num_ranks, num_logical):
    """(order, dest): per layer, the large slots (`big`) heaviest first, and the rank each
    replica goes to (-1 past a layer's large slots): it stays on its rank while that rank stays
    within `target`, else goes to the lightest rank with a large-replica slot free that does not
    hold its expert (any with one free where all do). Small replicas stay; ranks keep their
    number of large slots."""
    layers, slots = placement.shape
    per_rank = slots // num_ranks
    loads = np.where(big, 0.0, w).reshape(layers, num_ranks, per_rank).sum(axis=2)
    room = big.reshape(layers, num_ranks, per_rank).sum(axis=2)
    order = np.argsort(np.where(big, -w, np.inf), axis=1, kind="stable")
    dest = np.full(order.shape, -1, dtype=np.int64)
    _repack_layers(np.ascontiguousarray(placement, dtype=np.int64), np.ascontiguousarray(w, dtype=np.float64),
                   big.sum(axis=1), loads, room, order, np.ascontiguousarray(target, dtype=np.float64),
                   num_logical, dest)
    return order, dest


@numba.njit(cache=True, nogil=True)
def _repack_layers(placement, w, nbig, loads, room, order, target, num_logical, dest):
    num_ranks = loads.shape[1]
    per_rank = placement.shape[1] // num_ranks
    holds = np.zeros((num_ranks, num_logical), dtype=np.uint8)
    for layer in range(placement.shape[0]):
        holds[:] = 0
        for k in range(nbig[layer]):
            s = order[layer, k]
            e, wk, home = placement[layer, s], w[layer, s], s // per_rank
            clear = False  # some rank with a large slot free does not hold e
            for r in range(num_ranks):
                if room[layer, r] > 0 and not holds[r, e]:
                    clear = True
            best, best_load = -1, np.inf
            for r in range(num_ranks):
                if room[layer, r] > 0 and (not clear or not holds[r, e]) and loads[layer, r] < best_load:
                    best, best_load = r, loads[layer, r]
            home_free = room[layer, home] > 0 and (not clear or not holds[home, e])
            r = home if home_free and loads[layer, home] + wk <= target[layer] else best
            loads[layer, r] += wk
            room[layer, r] -= 1
            holds[r, e] = 1
            dest[layer, k] = r


if __name__ == "__main__":
    # through the package's module, not this __main__ copy of it: numba caches per module
    from vllm_eplb.core.policies import min_move_jit

    min_move_jit.warm_up()
