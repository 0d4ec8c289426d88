"""The balanced replica dispatch as a Triton kernel (GPU): the same ids as
`replica_dispatch.torch_balanced_map_and_record` (its docstring has the rule), mapped and
recorded in one launch, in place of upstream's `_eplb_map_and_record_i32_kernel`.

Program p owns tile p: a TILE x TILE comparison ranks each element among the tile's
choices of its expert, a sum over the tile gives the rotation; nothing crosses tiles.
CUDA graphs: no host sync; the grid and TILE depend only on the batch's shape, the
unpadded-token count and the record flag are read on the device.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .tiles import tile_size


@triton.jit
def _balanced_kernel(
    ids_ptr, replica_count_ptr, l2p_ptr, out_ptr, load_ptr, record_ptr, unpadded_ptr,
    numel, top_k, num_experts, map_slots, load_size,
    HAS_UNPADDED: tl.constexpr, TILE: tl.constexpr,
):
    lane = tl.arange(0, TILE)
    offs = tl.program_id(0) * TILE + lane
    inside = offs < numel
    e = tl.load(ids_ptr + offs, mask=inside, other=-1)
    valid = inside & (e >= 0) & (e < num_experts)
    key = tl.where(valid, e, -1)
    recorded = numel
    if HAS_UNPADDED:
        recorded = tl.minimum(tl.load(unpadded_ptr).to(tl.int32) * top_k, numel)
    rank = tl.sum(((key[:, None] == key[None, :]) & (lane[None, :] < lane[:, None])).to(tl.int32), axis=1)
    tile_sum = tl.sum(tl.where(valid & (offs < recorded), e, 0))
    count = tl.maximum(tl.load(replica_count_ptr + key, mask=valid, other=1).to(tl.int32), 1)
    replica = (rank + key + tile_sum) % count
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
    num_warps: int = 4,
) -> torch.Tensor:
    """Upstream's `eplb_map_to_physical_and_record` signature, the balanced dispatch."""
    ids = topk_ids.contiguous().to(dtype=torch.int32)
    numel = ids.numel()
    if numel == 0:
        return topk_ids
    assert expert_load_view.is_contiguous()
    tile = tile_size(numel)
    out = torch.empty((numel,), device=topk_ids.device, dtype=topk_ids.dtype)
    has_unpadded = num_unpadded_tokens is not None
    _balanced_kernel[(triton.cdiv(numel, tile),)](
        ids, logical_replica_count.contiguous(), logical_to_physical_map.contiguous(), out, expert_load_view,
        record_enabled, num_unpadded_tokens if has_unpadded else ids, numel, ids.shape[-1],
        logical_replica_count.shape[0], logical_to_physical_map.shape[1], expert_load_view.shape[0],
        HAS_UNPADDED=has_unpadded, TILE=tile, num_warps=num_warps,
    )
    return out.reshape(topk_ids.shape)
