"""min-move's per-layer loops, compiled with numba: the replica-count fix (step 1 of `min_move`:
which slots give way, where the new replicas go), the shedding (step 2), the re-packing of
large replicas (step 3) and the renumbering of a fresh pack's ranks (step 4, `align_ranks`).

Shedding: per layer, the heaviest ranks above `target` each swap one slot with a lighter rank.
Each round, each of up to HEAVY heavy ranks still above the target looks at its slots against
those of its own LIGHT of the lightest ranks, and against the chain slots: slots moved already in
this plan on any rank below the target (a new replica of step 1, or what a light rank took in an
earlier swap), where a swap moves only the heavy rank's slot. It takes the swap that brings both
ranks within the target with the fewest moved slots (then the smallest transfer: what the light
ranks can still take is left to the others), else the one cutting the most load above the target
per moved slot. Moved slots count against `current`: a slot moved once already moves no more
when swapped again, so swaps chain: a light rank passes on what it took, and one light rank
absorbs several heavy ranks' excess for one moved slot each. Without the chain slots a light
rank that had taken a swap left the lightest few and its moved slot went unused (with them
DeepSeek-V3 moves 6-11% fewer slots: docs/benchmarks.md section 4, 2026-12-06, fifth pass). Swaps of one round are
made heaviest rank first; one whose ranks an earlier swap of the round touched waits for the
next round. A swap must cut more than `penalty` per slot it moves. Slot costs `w` travel with
their slots (counts stay). A layer whose slowest rank finds no swap is done: swaps elsewhere
would not lower its slowest rank, only move slots.

Why compiled: the shedding search is a small loop per (heavy rank, light rank) pair that numpy
could only vectorise by scoring every candidate of every pair at once (about 250 per pair) and
round-tripping the whole state each round; as a loop it stops at what it needs and touches a few
kilobytes (DeepSeek-V3: about 15 ms of numpy per plan, 2-3 ms here); the re-packing is a loop
over a layer's large replicas, one numpy round per replica before; the replica-count fix walks
a layer's slots in order and places replicas one at a time (numpy sorted and scattered whole
arrays for it: about 2 ms more of a DeepSeek-V3 plan). numba is a dependency vLLM itself has.
Candidates are scored in float32 in units of the layer's target, and sums are numpy's pairwise
sums (`_pairwise_sum`: the replica-count fix's loops keep the numpy version's bits). The first
call on a machine compiles (about 10 CPU-seconds; numba caches it on disk): the planner process
does it in its warm-up (`warm_up`), before its time counts, and `python -m
vllm_eplb.core.policies.min_move_jit` does it ahead (set-up, tests).
"""

from __future__ import annotations

import math

import numba
import numpy as np

HEAVY = 4  # heavy ranks per layer that swap in one round
LIGHT = 1  # each with its own LIGHT of the lightest ranks (3 before the chain slots: as few moves, slower)
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
    c0, need = np.ones((1, 8), dtype=np.int64), np.ones((1, 8), dtype=np.int64)
    need[0, 0], c0[0, 7] = 2, 2
    freed = freed_slots(p, c0, need, w, w.reshape(1, 4, 2).sum(axis=2))
    place_replicas(p, freed, need - 1, w, np.zeros((1, 4)))
    grow_counts(w, 3, 1e-9, 1e-5, 1e-3)
    align_ranks(p[:, ::-1], p, 4)


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
    chain = np.empty(slots, dtype=np.int64)  # moved slots on ranks below the target
    touched = np.zeros(num_ranks, dtype=np.uint8)
    for _ in range(iters):
        if not loads.max() > t:
            return
        order = np.argsort(-loads, kind="mergesort")  # heaviest first (stable)
        n_chain = 0
        for s in range(slots):
            if moved[s] > np.float32(0.0) and loads[s // per_rank] < t:
                chain[n_chain] = s
                n_chain += 1
        for i in range(heavy_n):
            pick_a[i] = -1
            ra = order[i]
            if not loads[ra] > t:
                continue
            # its light ranks: the (i + j * heavy_n)-th lightest, ties to the higher rank first
            pick_a[i], pick_b[i] = _best_swap(p, wn, moved, holds, loads, t, inv, pen32, ra, order,
                                              i, heavy_n, light_per, per_rank, chain, n_chain)
        if pick_a[0] < 0:
            return  # the slowest rank finds no swap
        touched[:] = 0
        for i in range(heavy_n):  # heaviest first; a rank another swap of this round touched waits
            if pick_a[i] >= 0:
                ra, rb = pick_a[i] // per_rank, pick_b[i] // per_rank
                if touched[ra] or touched[rb]:
                    continue
                touched[ra], touched[rb] = 1, 1
                _swap(p, w, wn, moved, c, loads, holds, pick_a[i], pick_b[i], per_rank)


@numba.njit(cache=True, nogil=True)
def _best_swap(p, wn, moved, holds, loads, t, inv, pen32, ra, order, i, heavy_n, light_per, per_rank, chain,
               n_chain):
    """(slot a, slot b) of heavy rank ra's best swap, or (-1, -1): with a slot of its light ranks,
    or with one of the `chain` slots (moved already, on a rank below the target: the swap moves
    only the heavy rank's slot, so a light rank passes on what it took)."""
    num_ranks = loads.shape[0]
    zero, full_one_move = np.float32(0.0), np.float32(8.5)  # _swap_score: a full swap moving <= 1 slot
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
                score = _swap_score(wa, fa, wb, moved[sb], x, y, pen32)
                if score > best:
                    best, best_a, best_b = score, sa, sb
    if best >= full_one_move:
        return best_a, best_b  # a full swap that moves one slot or none: a chain does no better
    top = zero  # the heavy rank's costliest slot
    for a in range(per_rank):
        if wn[ra * per_rank + a] > top:
            top = wn[ra * per_rank + a]
    for k in range(n_chain):
        sb = chain[k]
        rb = sb // per_rank
        wb = wn[sb]
        if not wb < top or rb == ra or holds[ra, p[sb]]:
            continue
        y = np.float32((t - loads[rb]) * inv)
        if best > np.float32(5.0) and y < x:
            continue  # a full swap is in hand (score 8 to 10): only another full one can beat it
        for a in range(per_rank):
            sa = ra * per_rank + a
            if wb >= wn[sa] or holds[rb, p[sa]]:
                continue
            score = _swap_score(wn[sa], moved[sa], wb, moved[sb], x, y, pen32)
            if score > best:
                best, best_a, best_b = score, sa, sb
    return best_a, best_b


@numba.njit(cache=True, nogil=True)
def _swap_score(wa, fa, wb, fb, x, y, pen32):
    """How good a swap is (0: not worth its moves): slot costs wa on the heavy rank, wb < wa on
    the lighter one, fa/fb 1 where the slot moved already in this plan, x the heavy rank's excess
    and y the lighter rank's room, all in units of the target (float32). Full swaps (both ranks end
    within the target): fewest moved slots, then the smallest transfer (about 8 to 10); others: the
    load above the target removed per moved slot (1 / max(moved, 0.5))."""
    zero, one, two, ten = np.float32(0.0), np.float32(1.0), np.float32(2.0), np.float32(10.0)
    d = wa - wb  # load the swap moves from the heavy rank to the light one
    over = d - y
    if not over >= zero:
        over = zero  # what it puts on the light rank above the target
    gain = (x if x <= d else d) - over  # the load above the target the swap removes
    dm = (two - fa) - fb  # slots moved beyond those moved already
    if not gain > dm * pen32:
        return zero  # cuts no more than the moves cost
    if d >= x and over <= zero:
        return (ten - dm) - d * np.float32(1e-3)
    return gain * (np.float32(0.5) * (two if fa > zero else one) * (two if fb > zero else one))


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


def grow_counts(cand_load, extra, token_seconds, read_seconds, per_pass):
    """(layers, candidates) replica counts: per layer, each of `extra` redundant slots to the
    candidate whose replicas cost most at that moment (the first on ties, as numpy's argmax).
    Costs as core/cost_model.py's `replica_seconds` (per_pass > 0) or tokens per replica."""
    out = np.ones(cand_load.shape, dtype=np.int64)
    _grow_layers(np.ascontiguousarray(cand_load, dtype=np.float64), int(extra), float(token_seconds),
                 float(read_seconds), float(per_pass), out)
    return out


@numba.njit(cache=True, nogil=True)
def _replica_cost(x, c, token_seconds, read_seconds, per_pass):
    if per_pass == 0.0:
        return x / c
    t = x * per_pass / c  # CostModel.replica_seconds, one expert at a time
    return token_seconds * t - read_seconds * math.expm1(-t)


@numba.njit(cache=True, nogil=True)
def _grow_layers(cand_load, extra, token_seconds, read_seconds, per_pass, out):
    layers, n = cand_load.shape
    value = np.empty(n, dtype=np.float64)
    for layer in range(layers):
        for j in range(n):
            value[j] = _replica_cost(cand_load[layer, j], 1.0, token_seconds, read_seconds, per_pass)
        for _ in range(extra):
            best = 0
            for j in range(1, n):
                if value[j] > value[best]:
                    best = j
            out[layer, best] += 1
            value[best] = _replica_cost(cand_load[layer, best], float(out[layer, best]), token_seconds,
                                        read_seconds, per_pass)


def freed_slots(current, c0, need, w0, loads):
    """(layers, slots) bool: the slots `min_move._fix_counts` frees. Per layer, the experts
    with more replicas than they `need` (`c0` now) give up their surplus, slots ordered by
    the load their rank keeps without them (`loads` per rank less the slot's cost `w0`),
    until the layer's deficit is covered."""
    freed = np.zeros(current.shape, dtype=np.bool_)
    _freed_layers(np.ascontiguousarray(current, dtype=np.int64), np.ascontiguousarray(c0, dtype=np.int64),
                  np.ascontiguousarray(need, dtype=np.int64), np.ascontiguousarray(w0, dtype=np.float64),
                  np.ascontiguousarray(loads, dtype=np.float64), freed)
    return freed


@numba.njit(cache=True, nogil=True)
def _freed_layers(current, c0, need, w0, loads, freed):
    layers, slots = current.shape
    num_logical = c0.shape[1]
    per_rank = slots // loads.shape[1]
    key = np.empty(slots, dtype=np.float64)
    seen = np.zeros(num_logical, dtype=np.int64)
    for layer in range(layers):
        wanted = 0
        for e in range(num_logical):
            if need[layer, e] > c0[layer, e]:
                wanted += need[layer, e] - c0[layer, e]
        if wanted == 0:
            continue
        for s in range(slots):
            e = current[layer, s]
            key[s] = loads[layer, s // per_rank] - w0[layer, s] if c0[layer, e] > need[layer, e] else np.inf
        order = np.argsort(key, kind="mergesort")  # stable, as numpy's
        seen[:] = 0
        taken = 0
        for s in order:
            if taken == wanted:
                break
            e = current[layer, s]
            if c0[layer, e] - need[layer, e] > seen[e]:  # a donor, within its surplus
                freed[layer, s] = True
                taken += 1
            seen[e] += 1


def place_replicas(current, freed, deficit, w_new, loads):
    """`current` with the replicas `deficit` (layers, experts) asks for in its `freed` slots
    (`min_move._fix_counts`): per layer, heaviest first (costs `w_new`) into the freed slots
    ordered by their rank's load (`loads`, without the freed slots; a rank's k-th freed slot
    as if k mean new replicas had filled the ones before); where that puts an expert twice on
    a rank, one at a time instead: each onto the lightest rank with a freed slot left that
    does not hold it (any with one left where all do), in that rank's first freed slot left."""
    out = np.array(current, dtype=np.int64, order="C")
    deficit = np.ascontiguousarray(deficit, dtype=np.int64)
    width = int(deficit.sum(axis=1).max(initial=0))
    _place_layers(np.ascontiguousarray(current, dtype=np.int64), np.ascontiguousarray(freed), deficit,
                  np.ascontiguousarray(w_new, dtype=np.float64), np.ascontiguousarray(loads, dtype=np.float64),
                  width, out)
    return out


@numba.njit(cache=True, nogil=True)
def _pairwise_sum(a, lo, n):
    """numpy's float64 sum of a[lo:lo + n]: its pairwise summation, so the same bits. Blocks
    above 128 split in two as numpy splits them, walked with a stack of frames (numba cannot
    load a cached recursive function: it crashes)."""
    if n <= 128:
        return _pairwise_block(a, lo, n)
    frame_lo = np.empty(64, dtype=np.int64)
    frame_n = np.empty(64, dtype=np.int64)
    frame_stage = np.zeros(64, dtype=np.int64)  # 0: left half next, 1: right half next, 2: add them
    frame_left = np.empty(64, dtype=np.float64)
    depth, ret = 0, 0.0
    frame_lo[0], frame_n[0] = lo, n
    while depth >= 0:
        m = frame_n[depth]
        if m <= 128:
            ret = _pairwise_block(a, frame_lo[depth], m)
            depth -= 1
            continue
        half = m // 2
        half -= half % 8
        stage = frame_stage[depth]
        frame_stage[depth] = stage + 1
        if stage == 2:
            ret = frame_left[depth] + ret
            depth -= 1
            continue
        if stage == 1:
            frame_left[depth] = ret
        depth += 1
        frame_lo[depth] = frame_lo[depth - 1] + (half if stage == 1 else 0)
        frame_n[depth] = m - half if stage == 1 else half
        frame_stage[depth] = 0
    return ret


@numba.njit(cache=True, nogil=True)
def _pairwise_block(a, lo, n):
    if n < 8:
        res = 0.0
        for i in range(lo, lo + n):
            res += a[i]
        return res
    r0, r1, r2, r3 = a[lo], a[lo + 1], a[lo + 2], a[lo + 3]
    r4, r5, r6, r7 = a[lo + 4], a[lo + 5], a[lo + 6], a[lo + 7]
    i = 8
    while i < n - n % 8:
        r0 += a[lo + i]
        r1 += a[lo + i + 1]
        r2 += a[lo + i + 2]
        r3 += a[lo + i + 3]
        r4 += a[lo + i + 4]
        r5 += a[lo + i + 5]
        r6 += a[lo + i + 6]
        r7 += a[lo + i + 7]
        i += 8
    res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    while i < n:
        res += a[lo + i]
        i += 1
    return res


@numba.njit(cache=True, nogil=True)
def _doubles(row, per_rank):
    """Slots of `row` holding an expert their rank holds in an earlier slot."""
    n = 0
    for s in range(row.shape[0]):
        first = s - s % per_rank
        for u in range(first, s):
            if row[u] == row[s]:
                n += 1
                break
    return n


@numba.njit(cache=True, nogil=True)
def _place_layers(current, freed, deficit, w_new, loads, width, out):
    layers, slots = current.shape
    num_ranks = loads.shape[1]
    per_rank = slots // num_ranks
    num_logical = deficit.shape[1]
    ekey = np.empty(num_logical, dtype=np.float64)
    skey = np.empty(slots, dtype=np.float64)
    todo = np.empty(max(width, 1), dtype=np.int64)
    w_add = np.zeros(max(width, 1), dtype=np.float64)  # the padded row numpy summed: its bits
    nth = np.zeros(num_ranks, dtype=np.int64)
    for layer in range(layers):
        wanted = 0
        for e in range(num_logical):
            d = deficit[layer, e]
            wanted += d
            ekey[e] = -w_new[layer, e] if d > 0 else np.inf
        if wanted == 0:
            continue
        k = 0
        for e in np.argsort(ekey, kind="mergesort"):  # heaviest first, stable
            for _ in range(deficit[layer, e]):
                todo[k] = e
                w_add[k] = w_new[layer, e]
                k += 1
        w_add[wanted:] = 0.0
        mean_new = _pairwise_sum(w_add, 0, width) / wanted
        nth[:] = 0
        for s in range(slots):
            r = s // per_rank
            if freed[layer, s]:
                skey[s] = loads[layer, r] + nth[r] * mean_new
                nth[r] += 1
            else:
                skey[s] = np.inf
        into = np.argsort(skey, kind="mergesort")
        for j in range(wanted):
            out[layer, into[j]] = todo[j]
        if _doubles(out[layer], per_rank) > _doubles(current[layer], per_rank):
            for s in range(slots):  # (a loop: numba takes seconds to compile a slice copy)
                out[layer, s] = current[layer, s]
            _one_at_a_time(out[layer], freed[layer].copy(), loads[layer].copy(), todo, w_add, wanted,
                           num_ranks, num_logical)


@numba.njit(cache=True, nogil=True)
def _one_at_a_time(out, freed, loads, todo, w_add, wanted, num_ranks, num_logical):
    per_rank = out.shape[0] // num_ranks
    holds = np.zeros((num_ranks, num_logical), dtype=np.uint8)
    left = np.zeros(num_ranks, dtype=np.int64)  # freed slots left per rank
    for s in range(out.shape[0]):
        if freed[s]:
            left[s // per_rank] += 1
        else:
            holds[s // per_rank, out[s]] = 1
    open_load = np.empty(num_ranks, dtype=np.float64)  # the rank's load while it has a freed slot left
    for r in range(num_ranks):
        open_load[r] = loads[r] if left[r] > 0 else np.inf
    for j in range(wanted):
        e = todo[j]
        best, best_fit = 0, np.inf
        for r in range(num_ranks):
            fit = np.inf if holds[r, e] else open_load[r]
            if fit < best_fit:
                best, best_fit = r, fit
        if best_fit == np.inf:  # every rank with a freed slot left holds e
            best = np.argmin(open_load)
        for s in range(best * per_rank, (best + 1) * per_rank):  # the rank's first freed slot left
            if freed[s]:
                out[s] = e
                freed[s] = False
                break
        left[best] -= 1
        loads[best] += w_add[j]
        open_load[best] = loads[best] if left[best] > 0 else np.inf
        holds[best, e] = 1


def align_ranks(new, current, num_ranks):
    """`new` (layers, slots) with each layer's ranks renumbered to keep most of what the ranks of
    `current` hold: a packing from scratch numbers its ranks arbitrarily, and every rank is the
    same to it, so rank i's contents go to the rank of `current` sharing the most replicas with
    them (pairs matched largest overlap first, ties to the lower ranks). `keep_in_place` then
    chooses the slots within each rank."""
    new = np.ascontiguousarray(new, dtype=np.int64)
    current = np.ascontiguousarray(current, dtype=np.int64)
    num_logical = int(max(new.max(initial=0), current.max(initial=0))) + 1
    out = np.empty_like(new)
    _align_layers(new, current, num_ranks, num_logical, out)
    return out


@numba.njit(cache=True, nogil=True)
def _align_layers(new, current, num_ranks, num_logical, out):
    layers, slots = new.shape
    per_rank = slots // num_ranks
    held = np.zeros((num_ranks, num_logical), dtype=np.int64)  # replicas each rank of current holds
    mine = np.zeros(num_logical, dtype=np.int64)  # replicas new rank i holds
    distinct = np.empty(per_rank, dtype=np.int64)  # the experts new rank i holds
    overlap = np.empty(num_ranks * num_ranks, dtype=np.int64)
    taken = np.empty(num_ranks, dtype=np.int64)  # the rank of current that new rank i becomes
    used = np.empty(num_ranks, dtype=np.uint8)
    for layer in range(layers):
        held[:, :] = 0
        for s in range(slots):
            held[s // per_rank, current[layer, s]] += 1
        for i in range(num_ranks):
            nd = 0
            for s in range(i * per_rank, (i + 1) * per_rank):
                e = new[layer, s]
                if mine[e] == 0:
                    distinct[nd] = e
                    nd += 1
                mine[e] += 1
            for j in range(num_ranks):
                n = 0
                for d in range(nd):
                    n += min(mine[distinct[d]], held[j, distinct[d]])
                overlap[i * num_ranks + j] = n
            for d in range(nd):
                mine[distinct[d]] = 0
        taken[:] = -1
        used[:] = 0
        for k in np.argsort(-overlap, kind="mergesort"):  # largest overlap first, stable
            i, j = k // num_ranks, k % num_ranks
            if taken[i] < 0 and not used[j]:
                taken[i] = j
                used[j] = 1
        for i in range(num_ranks):
            for a in range(per_rank):
                out[layer, taken[i] * per_rank + a] = new[layer, i * per_rank + a]


if __name__ == "__main__":
    # through the package's module, not this __main__ copy of it: numba caches per module
    from vllm_eplb.core.policies import min_move_jit

    min_move_jit.warm_up()
