"""Placement of experts into physical slots, and the figures derived from it.

A placement is `phy2log`: an int64 array (layers, physical slots) naming the
logical expert each physical slot holds. Slot `s` lives on rank
`s // slots_per_rank`. Everything else (the logical->physical map, replica
counts, per-rank load, balancedness) is derived from it.

The placement of record is `RoutingMaps.placement` (routing_maps.py, the device side).
This module is numpy only: the planner process imports it without PyTorch.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Topology:
    """Shape of the expert-parallel group."""

    num_ranks: int
    num_logical: int
    num_physical: int
    ranks_per_node: int = 0  # 0: all ranks on one node
    num_groups: int = 1  # expert groups of the model (group-limited routing), for hierarchical policies

    def __post_init__(self) -> None:
        if self.num_physical % self.num_ranks:
            raise ValueError(
                f"{self.num_physical} physical expert slots do not divide over {self.num_ranks} ranks"
            )
        if self.num_physical < self.num_logical:
            raise ValueError("fewer physical slots than logical experts")

    @property
    def slots_per_rank(self) -> int:
        return self.num_physical // self.num_ranks

    @property
    def num_redundant(self) -> int:
        return self.num_physical - self.num_logical

    @property
    def max_replicas(self) -> int:
        return self.num_redundant + 1

    @property
    def num_nodes(self) -> int:
        if self.ranks_per_node <= 0:
            return 1
        return -(-self.num_ranks // self.ranks_per_node)

    def node_of(self, rank: int) -> int:
        return 0 if self.ranks_per_node <= 0 else rank // self.ranks_per_node

    def rank_slots(self, rank: int) -> range:
        n = self.slots_per_rank
        return range(rank * n, (rank + 1) * n)


def default_placement(topo: Topology, num_layers: int) -> np.ndarray:
    """vLLM's initial layout: logical experts in order, redundant slots take experts 0, 1, ..."""
    row = np.arange(topo.num_physical, dtype=np.int64) % topo.num_logical
    return np.tile(row, (num_layers, 1))


def replica_counts(phy2log: np.ndarray, num_logical: int) -> np.ndarray:
    """(layers, logical) number of physical replicas of each logical expert."""
    layers = phy2log.shape[0]
    counts = np.zeros((layers, num_logical), dtype=np.int64)
    rows = np.repeat(np.arange(layers), phy2log.shape[1])
    np.add.at(counts, (rows, phy2log.reshape(-1)), 1)
    return counts


def logical_to_physical(phy2log: np.ndarray, num_logical: int, max_replicas: int) -> np.ndarray:
    """(layers, logical, max_replicas) physical slots of each expert, ascending, padded with -1."""
    layers, num_physical = phy2log.shape
    out = np.full((layers, num_logical, max_replicas), -1, dtype=np.int64)
    # Stable sort by expert keeps the slots of one expert in ascending order.
    order = np.argsort(phy2log, axis=1, kind="stable")
    sorted_experts = np.take_along_axis(phy2log, order, axis=1)
    for layer in range(layers):
        experts = sorted_experts[layer]
        starts = np.searchsorted(experts, experts, side="left")
        replica_idx = np.arange(num_physical) - starts
        if replica_idx.max(initial=0) >= max_replicas:
            raise ValueError(
                f"layer {layer}: an expert has {replica_idx.max() + 1} replicas, more than "
                f"the {max_replicas} the routing map can hold"
            )
        out[layer, experts, replica_idx] = order[layer]
    return out


def validate_placement(phy2log: np.ndarray, topo: Topology) -> None:
    """Raise ValueError unless every logical expert has at least one slot in every layer."""
    if phy2log.ndim != 2 or phy2log.shape[1] != topo.num_physical:
        raise ValueError(f"placement shape {phy2log.shape} does not match {topo.num_physical} slots")
    if phy2log.min(initial=0) < 0 or phy2log.max(initial=0) >= topo.num_logical:
        raise ValueError("placement names an expert id out of range")
    counts = replica_counts(phy2log, topo.num_logical)
    missing = np.argwhere(counts == 0)
    if len(missing):
        layer, expert = missing[0]
        raise ValueError(f"layer {layer}: logical expert {expert} has no physical slot")
    if counts.max() > topo.max_replicas:
        raise ValueError("an expert has more replicas than the routing map can hold")


def rank_loads(phy2log: np.ndarray, logical_load: np.ndarray, topo: Topology) -> np.ndarray:
    """(layers, ranks) predicted load per rank: an expert's load splits evenly over its replicas,
    as vLLM's router spreads tokens over replicas by token index."""
    counts = replica_counts(phy2log, topo.num_logical)
    per_replica = logical_load / np.maximum(counts, 1)
    slot_load = np.take_along_axis(per_replica, phy2log, axis=1)
    return slot_load.reshape(phy2log.shape[0], topo.num_ranks, topo.slots_per_rank).sum(axis=2)


def load_stats(loads: np.ndarray) -> tuple[float, float]:
    """(sum over layers of the mean per-rank load, sum over layers of the max).

    Each layer waits for its most loaded rank, so the second is the time spent and the
    first the time a perfect balance would take."""
    loads = np.asarray(loads, dtype=np.float64)
    return float(loads.mean(axis=-1).sum()), float(loads.max(axis=-1).sum())


def balancedness_of(loads: np.ndarray) -> float:
    """mean/max per-rank load aggregated over layers: sum(mean)/sum(max), the fraction
    of expert compute that is useful. 1.0 is perfect; no load counts as 1.0."""
    mean, top = load_stats(loads)
    return mean / top if top > 0 else 1.0


def predicted_balancedness(phy2log: np.ndarray, logical_load: np.ndarray, topo: Topology) -> float:
    return balancedness_of(rank_loads(phy2log, logical_load, topo))


def observed_rank_loads(physical_load: np.ndarray, topo: Topology) -> np.ndarray:
    """(layers, ranks) measured tokens per rank from per-slot counts."""
    layers = physical_load.shape[0]
    return physical_load.reshape(layers, topo.num_ranks, topo.slots_per_rank).sum(axis=2)


def physical_to_logical_load(physical_load: np.ndarray, phy2log: np.ndarray, num_logical: int) -> np.ndarray:
    """(layers, logical) load summed over each expert's replicas."""
    layers = phy2log.shape[0]
    out = np.zeros((layers, num_logical), dtype=np.float64)
    rows = np.repeat(np.arange(layers), phy2log.shape[1])
    np.add.at(out, (rows, phy2log.reshape(-1)), physical_load.reshape(-1))
    return out


def moved_slots(old: np.ndarray, new: np.ndarray) -> int:
    return int((old != new).sum())


def placement_digest(phy2log: np.ndarray) -> tuple[int, int]:
    """Two non-negative 31-bit integers identifying a placement; they travel in an int64
    all-reduce (negated for a max), so each half must stay far from int64's limits."""
    h = hashlib.sha256(np.ascontiguousarray(phy2log, dtype=np.int64).tobytes()).digest()
    a = int.from_bytes(h[:4], "little") & 0x7FFFFFFF
    b = int.from_bytes(h[4:8], "little") & 0x7FFFFFFF
    return a, b


def maps_digest(phy2log: np.ndarray) -> int:
    """One non-negative 62-bit integer identifying a placement: it travels in every round as an
    `equal` field (x and -x in an int64 MIN all-reduce), so it stays clear of int64's limits."""
    h = hashlib.blake2b(np.ascontiguousarray(phy2log, dtype=np.int64).tobytes(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 2
