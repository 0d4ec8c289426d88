"""Building blocks shared by the policies, each vectorized across layers."""

from __future__ import annotations

import numpy as np


def replicate(load: np.ndarray, num_physical: int) -> np.ndarray:
    """(layers, logical) replica counts summing to num_physical per layer: each extra slot
    goes to the expert whose per-replica load is highest at that moment."""
    layers, num_logical = load.shape
    counts = np.ones((layers, num_logical), dtype=np.int64)
    rows = np.arange(layers)
    for _ in range(num_physical - num_logical):
        counts[rows, np.argmax(load / counts, axis=1)] += 1
    return counts


def replicate_with_order(load: np.ndarray, num_physical: int) -> tuple[np.ndarray, np.ndarray]:
    """Like `replicate`, also returning (layers, physical) logical ids: 0..n-1, then the
    expert of each extra replica in the order it was added."""
    layers, num_logical = load.shape
    counts = np.ones((layers, num_logical), dtype=np.int64)
    phy = np.tile(np.arange(num_physical, dtype=np.int64), (layers, 1))
    rows = np.arange(layers)
    for i in range(num_logical, num_physical):
        e = np.argmax(load / counts, axis=1)
        phy[:, i] = e
        counts[rows, e] += 1
    return phy, counts


def balanced_packing(weight: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """Pack n weighted items into num_packs packs of n/num_packs items each: items heaviest
    first, each to the lightest pack that is not full. Returns (pack index, rank within the
    pack) per item, both (layers, n)."""
    layers, n = weight.shape
    per_pack = n // num_packs
    if n % num_packs:
        raise ValueError(f"{n} items do not divide into {num_packs} packs")
    if per_pack == 1:
        return np.tile(np.arange(n, dtype=np.int64), (layers, 1)), np.zeros((layers, n), dtype=np.int64)
    order = np.argsort(-weight, axis=-1)
    rows = np.arange(layers)
    pack_weight = np.zeros((layers, num_packs), dtype=np.float64)
    pack_items = np.zeros((layers, num_packs), dtype=np.int64)
    pack_index = np.empty((layers, n), dtype=np.int64)
    rank_in_pack = np.empty((layers, n), dtype=np.int64)
    for j in range(n):
        item = order[:, j]
        pack = np.argmin(pack_weight, axis=1)  # full packs hold inf
        pack_index[rows, item] = pack
        rank_in_pack[rows, item] = pack_items[rows, pack]
        pack_weight[rows, pack] += weight[rows, item]
        pack_items[rows, pack] += 1
        full = pack_items[rows, pack] == per_pack
        pack_weight[rows[full], pack[full]] = np.inf
    return pack_index, rank_in_pack


def inverse(perm: np.ndarray) -> np.ndarray:
    """Row-wise inverse of a batch of permutations."""
    inv = np.empty_like(perm)
    np.put_along_axis(inv, perm, np.arange(perm.shape[1], dtype=perm.dtype)[None].repeat(perm.shape[0], 0), axis=1)
    return inv
