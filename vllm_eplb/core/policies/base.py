"""The interface placement policies implement, and a registry to pick one by name."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..placement import Topology


@dataclass(frozen=True)
class PlanInput:
    logical_load: np.ndarray  # (layers, logical) tokens per expert over the window, all ranks summed
    current: np.ndarray  # (layers, physical) placement in force now
    topo: Topology
    # forward passes logical_load was summed over (counting each token once): tokens per pass are
    # logical_load / passes, which a pass-time cost model needs; 0 when unknown
    passes: float = 0.0


class Policy(ABC):
    """Maps observed load to a new placement.

    A policy must be deterministic: every rank runs it on the same input and the
    ranks then check (by digest) that they got the same plan. It runs on the
    planner thread, so it should spend its time in numpy (which releases the GIL)
    rather than in Python loops."""

    name: str = ""

    @abstractmethod
    def place(self, inp: PlanInput) -> np.ndarray:
        """Return the new placement, (layers, physical) int64."""

    def warm_up(self) -> None:
        """Called once in a new planner process before it counts as ready (and before the
        first plan's planning_timeout_s starts): compile or load what `place` needs."""


_REGISTRY: dict[str, Callable[[], Policy]] = {}


def register_policy(name: str):
    def deco(cls):
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def policy_names() -> list[str]:
    return sorted(_REGISTRY)


def get_policy(name: str, **options) -> Policy:
    """A policy by name; options a policy does not take are ignored (e.g. tolerance)."""
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose one of {policy_names()}") from None
    import inspect

    accepted = inspect.signature(cls.__init__).parameters
    return cls(**{k: v for k, v in options.items() if k in accepted})


def keep_in_place(new: np.ndarray, current: np.ndarray, slots_per_rank: int) -> np.ndarray:
    """Reorder each rank's slots so an expert the rank already holds stays in its slot.

    A policy decides which experts a rank holds; which of the rank's slots each one
    takes does not change balance, only what must move. Vectorized over layers."""
    layers, num_physical = new.shape
    num_ranks = num_physical // slots_per_rank
    out = new.reshape(layers, num_ranks, slots_per_rank).copy()
    cur = current.reshape(layers, num_ranks, slots_per_rank)
    # for each new expert on a rank, is it already in some slot of that rank?
    match = out[..., :, None] == cur[..., None, :]  # (L, R, new slot, old slot)
    result = np.full_like(out, -1)
    taken_new = np.zeros(out.shape, dtype=bool)
    for old_slot in range(slots_per_rank):
        # first not-yet-placed new entry that equals the expert in old_slot
        cand = match[..., :, old_slot] & ~taken_new
        has = cand.any(axis=-1)
        idx = cand.argmax(axis=-1)
        l_idx, r_idx = np.nonzero(has)
        result[l_idx, r_idx, old_slot] = out[l_idx, r_idx, idx[l_idx, r_idx]]
        taken_new[l_idx, r_idx, idx[l_idx, r_idx]] = True
    # the rest fill the remaining slots in order: k-th free slot <- k-th unplaced entry
    flat_res = result.reshape(-1, slots_per_rank)
    flat_out = out.reshape(-1, slots_per_rank)
    free = flat_res == -1
    rest = ~taken_new.reshape(-1, slots_per_rank)
    free_pos = np.argsort(~free, axis=1, kind="stable")  # free slots first, ascending
    rest_pos = np.argsort(~rest, axis=1, kind="stable")
    k = np.arange(slots_per_rank)[None, :] < free.sum(axis=1, keepdims=True)
    rows = np.broadcast_to(np.arange(flat_res.shape[0])[:, None], k.shape)
    flat_res[rows[k], free_pos[k]] = flat_out[rows[k], rest_pos[k]]
    return result.reshape(layers, num_physical)
