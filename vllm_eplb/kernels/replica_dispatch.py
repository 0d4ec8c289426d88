"""Which replica of an expert each (token, choice) goes to, and the load it records.

The router calls `map_to_physical_and_record` once per MoE layer per forward pass, with
the top-k logical expert ids of the batch. Two dispatches:

- "hash" (upstream vLLM's): replica = Knuth hash of the token index mod the replica
  count. In decode a request keeps its batch slot for many passes, so its tokens keep
  going to the same replica: the split of a hot expert among its replicas follows which
  slots happen to be occupied, not the plan.
- "balanced": each expert's choices in a tile of the batch (TILE consecutive (token,
  choice) elements: the whole batch up to TILE) are dealt to its replicas in turn, so
  every replica of expert e gets floor(n / c_e) or ceil(n / c_e) of the tile's n choices
  of e: the even split the placement was planned for, exact per tile. The replica
  that gets a tile's first choice of e rotates with the expert id and with the tile's
  content (the sum of its recorded ids), so the remainders (+1s) do not pile up on the
  replicas with the lowest slots, nor, in decode, on the same replica pass after pass.
  Tiles keep the GPU kernel to one launch with no cross-tile step (a replica's share
  of a whole batch is off the exact split by at most one per tile holding its expert).

Both are deterministic functions of the batch's expert ids and the maps, so every rank
that routes the same batch (the TP ranks of an EP group) picks the same replicas.
Replicas hold identical weights: the dispatch changes where a choice is computed, never
what it computes.

The balanced rule, exactly (the Triton kernel computes the same ids; tests check it):
  flat element f = t * k + j, tile(f) = f // TILE; valid: 0 <= id_f < E;
  recorded: valid and t < num_unpadded_tokens
  rank_f = valid elements f' < f of the same tile with id_f' = id_f
  S_f = sum of id_f' over the recorded elements f' of f's tile;  c_e = max(replica_count[e], 1)
  replica_f = (rank_f + id_f + S_f) mod c_e;  physical_f = logical_to_physical[id_f, replica_f]
Padded tokens come after the unpadded ones, so they never shift a recorded element's
rank; they get some valid replica and record nothing.
"""

from __future__ import annotations

import torch

from vllm_eplb.core.pass_clock import advance_if_first_layer

from .tiles import tile_size

DISPATCHES = ("hash", "balanced")
DEFAULT = "hash"  # what the figures favour (docs/benchmarks.md, "Replica dispatch")
_mode = DEFAULT


def select(mode: str) -> None:
    """The dispatch of every later router call in this process (set once, before the
    model's first forward pass: CUDA graphs capture whichever is selected then)."""
    global _mode
    if mode not in DISPATCHES:
        raise ValueError(f"unknown replica dispatch {mode!r}; choose one of {', '.join(DISPATCHES)}")
    _mode = mode


def selected() -> str:
    return _mode


class _RouterConstants:
    """Tensors that depend only on the batch size, cached across calls: the Knuth hash of
    each token index (as upstream's Triton kernel computes it), a row of ones to add as
    load, and 0..n-1. One tensor each, grown to the largest batch seen."""

    hashed = torch.empty((0, 1), dtype=torch.int64)
    ones = torch.empty(0, dtype=torch.int32)
    arange = torch.empty(0, dtype=torch.int64)

    @classmethod
    def get(cls, tokens: int, width: int, device, dtype):
        if cls.hashed.shape[0] < tokens or cls.hashed.device != torch.device(device):
            size = max(tokens, 2 * cls.hashed.shape[0], 256)
            cls.hashed = ((torch.arange(size, dtype=torch.int64, device=device) * 2654435769) & 0xFFFFFFFF)[:, None]
        if cls.ones.numel() < tokens * width or cls.ones.dtype != dtype or cls.ones.device != torch.device(device):
            cls.ones = torch.ones(max(tokens * width, 2 * cls.ones.numel(), 1024), dtype=dtype, device=device)
        return cls.hashed[:tokens], cls.ones

    @classmethod
    def range(cls, n: int, device):
        if cls.arange.numel() < n or cls.arange.device != torch.device(device):
            cls.arange = torch.arange(max(n, 2 * cls.arange.numel(), 1024), dtype=torch.int64, device=device)
        return cls.arange[:n]


def _record(physical, expert_load_view, record_enabled, num_unpadded_tokens, ones) -> None:
    if record_enabled is None or bool(record_enabled):
        rows = physical if num_unpadded_tokens is None else physical[: int(num_unpadded_tokens)]
        flat = rows.reshape(-1)
        # Every id the maps hold for replica < count is a valid slot: no bounds filter
        # needed (upstream's kernel guards the -1 padding, which this never reaches).
        expert_load_view.index_add_(0, flat, ones[: flat.numel()])


def torch_hash_map_and_record(
    topk_ids, expert_load_view, logical_to_physical_map, logical_replica_count, record_enabled, num_unpadded_tokens=None
):
    """What upstream's Triton kernel `_eplb_map_and_record_i32_kernel` computes, in torch:
    logical -> physical expert ids, the replica picked by a hash of the token index, and
    one count per (token, expert) into expert_load_view for unpadded tokens.
    Few ops on purpose: on CPU each costs a microsecond or more, per MoE layer, per pass."""
    tokens, k = topk_ids.shape
    hashed, ones = _RouterConstants.get(tokens, k, topk_ids.device, expert_load_view.dtype)
    ids = topk_ids.long()
    replica = hashed % torch.take(logical_replica_count, ids)
    physical = logical_to_physical_map[ids, replica]
    _record(physical, expert_load_view, record_enabled, num_unpadded_tokens, ones)
    return physical.to(topk_ids.dtype)


def balanced_replicas(ids: torch.Tensor, replica_count: torch.Tensor, recorded: int) -> torch.Tensor:
    """replica_f of the module's rule for flat expert ids (all valid, 0 <= id < E), the
    first `recorded` of them recorded."""
    n = ids.numel()
    num_experts = replica_count.shape[0]
    tile = tile_size(n)
    index = _RouterConstants.range(n, ids.device)
    tiles = index // tile
    # rank among the tile's choices of the same expert: position in the stable sort by
    # (tile, expert), minus where that run starts
    key = tiles * num_experts + ids
    order = torch.argsort(key, stable=True)
    num_tiles = -(-n // tile)
    runs = torch.zeros(num_tiles * num_experts, dtype=torch.int64, device=ids.device)
    runs.index_add_(0, key, index.new_ones(()).expand(n))
    starts = torch.cumsum(runs, 0) - runs
    rank = torch.empty_like(ids)
    rank[order] = index - starts[key[order]]
    sums = torch.zeros(num_tiles, dtype=torch.int64, device=ids.device)
    sums.index_add_(0, tiles[:recorded], ids[:recorded])
    return (rank + ids + sums[tiles]) % replica_count.clamp(min=1)[ids]


def torch_balanced_map_and_record(
    topk_ids, expert_load_view, logical_to_physical_map, logical_replica_count, record_enabled, num_unpadded_tokens=None
):
    """The balanced dispatch (module docstring), in torch: the CPU router's, and the
    reference the Triton kernel is checked against."""
    tokens, k = topk_ids.shape
    _, ones = _RouterConstants.get(tokens, k, topk_ids.device, expert_load_view.dtype)
    ids = topk_ids.reshape(-1).long()
    recorded = tokens * k if num_unpadded_tokens is None else min(tokens, int(num_unpadded_tokens)) * k
    replica = balanced_replicas(ids, logical_replica_count, recorded)
    physical = logical_to_physical_map[ids, replica].view(tokens, k)
    _record(physical, expert_load_view, record_enabled, num_unpadded_tokens, ones)
    return physical.to(topk_ids.dtype)


_TORCH = {"hash": torch_hash_map_and_record, "balanced": torch_balanced_map_and_record}


def torch_map_to_physical_and_record(
    topk_ids: torch.Tensor,
    expert_load_view: torch.Tensor,
    logical_to_physical_map: torch.Tensor,
    logical_replica_count: torch.Tensor,
    record_enabled: torch.Tensor | None,
    num_unpadded_tokens: torch.Tensor | None = None,
) -> torch.Tensor:
    """The router's map-and-record where vLLM has no Triton kernel (CPU), with the
    selected dispatch; it also advances the pass clock's count of MoE-layer passes."""
    advance_if_first_layer(expert_load_view)
    return _TORCH[_mode](
        topk_ids, expert_load_view, logical_to_physical_map, logical_replica_count, record_enabled, num_unpadded_tokens
    )


def gpu_router(upstream):
    """The router's map-and-record on a GPU: upstream's kernel (`upstream`) for "hash", the
    Triton kernel of replica_dispatch_triton for "balanced". Read per call, one Python
    branch: CUDA graphs capture whichever was selected when they were captured. It also
    advances the pass clock's count of MoE-layer passes (one `add_` on the device for the
    first balanced layer): recorded into CUDA graphs with the kernel, so a replayed pass
    counts too, where no Python runs."""

    def eplb_map_to_physical_and_record(
        topk_ids, expert_load_view, logical_to_physical_map, logical_replica_count, record_enabled,
        num_unpadded_tokens=None,
    ):
        advance_if_first_layer(expert_load_view)
        if _mode == "balanced":
            from .replica_dispatch_triton import triton_balanced_map_and_record

            return triton_balanced_map_and_record(
                topk_ids, expert_load_view, logical_to_physical_map, logical_replica_count, record_enabled,
                num_unpadded_tokens,
            )
        return upstream(
            topk_ids=topk_ids, expert_load_view=expert_load_view, logical_to_physical_map=logical_to_physical_map,
            logical_replica_count=logical_replica_count, record_enabled=record_enabled,
            num_unpadded_tokens=num_unpadded_tokens,
        )

    eplb_map_to_physical_and_record.upstream = upstream
    return eplb_map_to_physical_and_record
