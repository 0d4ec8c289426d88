"""verify_slots' check (core/slot_check.py): a slot is the bytes of every tensor the model gives
per expert, weights and scales alike; a slot holding another expert's bytes, or its weights
without its scales, is named; references gathered across ranks over gloo."""

from __future__ import annotations

import numpy as np
import torch

from vllm_eplb.core.placement import Topology, default_placement
from vllm_eplb.core.slot_check import SlotVerifier, fingerprints
from vllm_eplb.harness.launcher import launch


def _layer(slots: int, seed: int, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn((slots, 8, 16), generator=g).to(dtype)
    scale = torch.rand((slots, 1), generator=g) + 0.5  # per-expert scale, float32
    return [w, scale]


def test_fingerprint_is_exact_and_covers_every_dtype():
    tensors = [torch.randn(4, 6).to(torch.float8_e4m3fn), torch.randn(4, 3, dtype=torch.float16), torch.rand(4, 5)]
    fp = fingerprints(tensors)
    assert fp.shape == (4, 6) and fp.dtype == torch.int64
    assert torch.equal(fp, fingerprints([t.clone() for t in tensors]))
    for i, t in enumerate(tensors):  # one changed byte in one slot of one tensor shows in that slot only
        changed = [x.clone() for x in tensors]
        changed[i].view(torch.uint8).view(changed[i].shape[0], -1)[2, 0] ^= 1
        diff = (fingerprints(changed) != fp).any(dim=1)
        assert diff.tolist() == [False, False, True, False]


def test_a_slot_with_weights_but_not_scales_is_named():
    topo = Topology(1, 3, 4)  # slot 3 is a replica of expert 0
    placement = default_placement(topo, 1)
    w, scale = _layer(4, 0)
    w[3], scale[3] = w[0], scale[0]
    v = SlotVerifier(lambda layer: [w, scale], 1, placement, topo, 0)
    assert v.replicas_disagreeing == [] and v.check(0, placement[0]) == []
    row = placement[0].copy()
    row[1], row[2] = 2, 1  # the map now puts expert 2 in slot 1 and expert 1 in slot 2
    assert v.check(0, row) == [(0, 1, 2), (0, 2, 1)]  # nothing moved yet
    w[[1, 2]] = w[[2, 1]].clone()
    assert v.check(0, row) == [(0, 1, 2), (0, 2, 1)]  # weights moved, scales left behind
    scale[[1, 2]] = scale[[2, 1]].clone()
    assert v.check(0, row) == []
    assert v.checked == 16 and len(v.mismatches) == 4


def _two_ranks(rank: int, world: int) -> tuple:
    topo = Topology(world, 6, 8)  # slots 6, 7 (rank 1) replicate experts 0, 1 (rank 0)
    placement = default_placement(topo, 2)
    layers = [_layer(8, seed) for seed in (1, 2)]  # every rank draws the same global layer
    for layer in layers:
        for t in layer:
            t[6], t[7] = t[0], t[1]
    mine = [[t[rank * 4 : (rank + 1) * 4].clone() for t in layer] for layer in layers]
    v = SlotVerifier(lambda layer: mine[layer], 2, placement, topo, rank)
    ok = v.check(1, placement[1])
    # rank 1 copies expert 2 (held by rank 0) into slot 6, as a commit would, and the map says so
    row = placement[1].copy()
    row[6] = 2
    if rank == 1:
        for t_mine, t_all in zip(mine[1], layers[1]):
            t_mine[2] = t_all[2]
    moved = v.check(1, row)
    return v.replicas_disagreeing, ok, moved


def test_references_are_gathered_across_ranks():
    (d0, ok0, moved0), (d1, ok1, moved1) = launch(_two_ranks, 2, timeout_s=120)
    assert d0 == d1 == [] and ok0 == ok1 == [] and moved0 == moved1 == []


def _corrupt_replica(rank: int, world: int) -> list:
    topo = Topology(world, 3, 4)  # slot 3 (rank 1) replicates expert 0 (rank 0)
    placement = default_placement(topo, 1)
    layer = _layer(4, 3)
    mine = [t[rank * 2 : (rank + 1) * 2].clone() for t in layer]
    if rank == 1:
        mine[1][1] += 1  # the replica's scale differs from its original
    return SlotVerifier(lambda _: mine, 1, placement, topo, rank).replicas_disagreeing


def test_replicas_that_differ_at_start_up_are_reported():
    assert launch(_corrupt_replica, 2, timeout_s=120) == [[(0, 0)], [(0, 0)]]
    assert np.array_equal(default_placement(Topology(2, 3, 4), 1)[0], [0, 1, 2, 0])


def _update(rank: int, world: int, miss_replica: bool) -> tuple:
    """A weight update under a moved placement: every slot gets its expert's new bytes (or
    rank 1's replica of expert 0 keeps the old ones), then `refresh` takes the reference again."""
    topo = Topology(world, 3, 4)
    placement = default_placement(topo, 1)
    old, new = _layer(3, 4), _layer(3, 5)  # one row per logical expert
    row = np.array([1, 0, 2, 0])  # moved: expert 1 in slot 0, expert 0 in slots 1 and 3
    mine = [t[row[rank * 2 : (rank + 1) * 2]].clone() for t in old]
    v = SlotVerifier(lambda _: mine, 1, row[None], topo, rank)
    for i, slot in enumerate(topo.rank_slots(rank)):
        if not (miss_replica and slot == 3):
            for t_mine, t_new in zip(mine, new):
                t_mine[i] = t_new[row[slot]]
    stale = v.check(0, row)  # against the start-up reference: every slot written is another's bytes
    before = len(v.mismatches)
    refreshed = v.refresh(row[None])
    counted = v.mismatches[before:]  # what refresh named counts as mismatches
    return stale, refreshed, v.check(0, row), counted


def test_refresh_takes_the_new_weights_as_reference():
    (stale0, ref0, after0, _), (stale1, ref1, after1, _) = launch(_update, 2, (False,), timeout_s=120)
    assert stale0 == [(0, 0, 1), (0, 1, 0)] and stale1 == [(0, 2, 2), (0, 3, 0)]
    assert ref0 == ref1 == [] and after0 == after1 == []


def test_refresh_names_a_replica_the_update_missed():
    (stale0, ref0, after0, _), (stale1, ref1, after1, counted1) = launch(_update, 2, (True,), timeout_s=120)
    assert stale0 == [(0, 0, 1), (0, 1, 0)] and stale1 == [(0, 2, 2)]  # slot 3 still matches the old reference
    assert ref0 == [] and after0 == []
    # slot 3 kept expert 0's old bytes; the reference is its first replica's (slot 1, new bytes)
    assert ref1 == [(0, 3, 0)] and counted1 == [(0, 3, 0)] and after1 == [(0, 3, 0)]
