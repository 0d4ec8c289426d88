"""The balanced replica dispatch as a Triton kernel (GPU): the same ids as
`replica_dispatch.torch_balanced_map_and_record` (its docstring has the rule), mapped and
recorded in one kernel, in place of upstream's `_eplb_map_and_record_i32_kernel`.

CUDA graphs: no host sync, and the launch grid and the kernel variant depend only on
the batch's shape; the unpadded-token count and the record flag are read on the device.

Program p owns tile p (TILE consecutive (token, choice) elements). An element's rank
among its expert's elements is the same-expert elements earlier in its tile (a TILE x
TILE comparison) plus those in earlier tiles, and the rotation needs the batch's sum of
recorded ids: both read tile by tile while the batch is small (decode: a few tiles), or,
for big batches (prefill), from one histogram and one sum per tile written by a first
kernel (the tile-by-tile comparison would grow with the square of the batch).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_TILE = 128
# Above this many elements (tokens x top-k) earlier tiles are counted by a first kernel.
TWO_PASS_ABOVE = 2048


@triton.jit
def _recorded(unpadded_ptr, numel, top_k, HAS_UNPADDED: tl.constexpr):
    """Elements that count as load: those of the unpadded tokens."""
    if HAS_UNPADDED:
        return tl.minimum(tl.load(unpadded_ptr).to(tl.int32) * top_k, numel)
    return numel


@triton.jit
def _tile_counts_kernel(
    ids_ptr, counts_ptr, unpadded_ptr, numel, top_k, num_experts,
    HAS_UNPADDED: tl.constexpr, E_PAD: tl.constexpr, TILE: tl.constexpr,
):
    """Row p of counts (tiles, E_PAD): valid elements of each expert in tile p; then, after
    the rows, entry p: the sum of tile p's recorded ids."""
    pid = tl.program_id(0)
    offs = pid * TILE + tl.arange(0, TILE)
    e = tl.load(ids_ptr + offs, mask=offs < numel, other=-1)
    valid = (e >= 0) & (e < num_experts)
    tl.store(counts_ptr + pid * E_PAD + tl.arange(0, E_PAD), tl.histogram(tl.where(valid, e, E_PAD - 1), E_PAD))
    recorded = _recorded(unpadded_ptr, numel, top_k, HAS_UNPADDED)
    tl.store(counts_ptr + tl.num_programs(0) * E_PAD + pid, tl.sum(tl.where(valid & (offs < recorded), e, 0)))


@triton.jit
def _balanced_kernel(
    ids_ptr, replica_count_ptr, l2p_ptr, out_ptr, load_ptr, record_ptr, unpadded_ptr, counts_ptr,
    numel, top_k, num_experts, map_slots, load_size,
    HAS_UNPADDED: tl.constexpr, FROM_COUNTS: tl.constexpr, E_PAD: tl.constexpr, TILE: tl.constexpr,
    SUMS: tl.constexpr,
):
    pid = tl.program_id(0)
    tiles = tl.num_programs(0)
    lane = tl.arange(0, TILE)
    offs = pid * TILE + lane
    inside = offs < numel
    e = tl.load(ids_ptr + offs, mask=inside, other=-1)
    valid = inside & (e >= 0) & (e < num_experts)
    key = tl.where(valid, e, -1)
    recorded = _recorded(unpadded_ptr, numel, top_k, HAS_UNPADDED)
    rank = tl.sum(((key[:, None] == key[None, :]) & (lane[None, :] < lane[:, None])).to(tl.int32), axis=1)
    batch_sum = 0  # S: the recorded ids summed over the batch
    if FROM_COUNTS:
        bins = tl.arange(0, E_PAD)
        before = tl.zeros((E_PAD,), tl.int32)
        for q in range(0, pid):
            before += tl.load(counts_ptr + q * E_PAD + bins)
        rank += tl.gather(before, tl.where(valid, e, E_PAD - 1), 0)
        for start in range(0, tiles, SUMS):
            at = start + tl.arange(0, SUMS)
            batch_sum += tl.sum(tl.load(counts_ptr + tiles * E_PAD + at, mask=at < tiles, other=0))
    else:
        for q in range(0, tiles):
            at = q * TILE + lane
            other = tl.load(ids_ptr + at, mask=at < numel, other=-1)
            ok = (other >= 0) & (other < num_experts)
            batch_sum += tl.sum(tl.where(ok & (at < recorded), other, 0))
            if q < pid:  # earlier tiles are full
                rank += tl.sum((key[:, None] == other[None, :]).to(tl.int32), axis=1)
    count = tl.maximum(tl.load(replica_count_ptr + key, mask=valid, other=1).to(tl.int32), 1)
    replica = (rank + key + batch_sum) % count
    phys = tl.load(l2p_ptr + key.to(tl.int64) * map_slots + replica, mask=valid, other=-1)
    tl.store(out_ptr + offs, phys, mask=inside)
    if tl.load(record_ptr) != 0:  # outside a load window the pass records nothing
        ok = valid & (offs < recorded) & (phys >= 0) & (phys < load_size)
        tl.atomic_add(load_ptr + tl.where(ok, phys, 0), 1, mask=ok)


def triton_balanced_map_and_record(
    topk_ids: torch.Tensor,
    expert_load_view: torch.Tensor,
    logical_to_physical_map: torch.Tensor,
    logical_replica_count: torch.Tensor,
    record_enabled: torch.Tensor,
    num_unpadded_tokens: torch.Tensor | None = None,
    *,
    two_pass: bool | None = None,
) -> torch.Tensor:
    """Upstream's `eplb_map_to_physical_and_record` signature, the balanced dispatch.
    two_pass: the benchmark's knob (default: chosen by the batch size)."""
    ids = topk_ids.contiguous().to(dtype=torch.int32)
    numel = ids.numel()
    if numel == 0:
        return topk_ids
    assert expert_load_view.is_contiguous()
    num_experts = logical_replica_count.shape[0]
    tile = max(16, min(MAX_TILE, triton.next_power_of_2(numel)))
    grid = triton.cdiv(numel, tile)
    if two_pass is None:
        two_pass = numel > TWO_PASS_ABOVE
    out = torch.empty((numel,), device=topk_ids.device, dtype=topk_ids.dtype)
    has_unpadded = num_unpadded_tokens is not None
    unpadded = num_unpadded_tokens if has_unpadded else ids  # an unread placeholder pointer
    e_pad = triton.next_power_of_2(num_experts + 1)  # the last bin takes invalid ids
    counts = ids
    if two_pass:
        counts = torch.empty(grid * e_pad + grid, device=ids.device, dtype=torch.int32)
        _tile_counts_kernel[(grid,)](
            ids, counts, unpadded, numel, ids.shape[-1], num_experts, HAS_UNPADDED=has_unpadded, E_PAD=e_pad, TILE=tile
        )
    _balanced_kernel[(grid,)](
        ids, logical_replica_count.contiguous(), logical_to_physical_map.contiguous(), out, expert_load_view,
        record_enabled, unpadded, counts, numel, ids.shape[-1], num_experts, logical_to_physical_map.shape[1],
        expert_load_view.shape[0],
        HAS_UNPADDED=has_unpadded, FROM_COUNTS=two_pass, E_PAD=e_pad, TILE=tile, SUMS=1024,
    )
    return out.reshape(topk_ids.shape)
