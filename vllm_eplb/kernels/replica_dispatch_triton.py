"""The balanced replica dispatch as a Triton kernel (GPU): the same ids as
`replica_dispatch.torch_balanced_map_and_record` (its docstring has the rule), mapped and
recorded in the kernels below, in place of upstream's `_eplb_map_and_record_i32_kernel`.

CUDA graphs: no host sync, and the launch grid depends only on the batch's shape; the
unpadded-token count and the record flag are read on the device.

How the rule maps onto programs: the flat (token, choice) elements are cut into
sub-blocks of SUB; program p owns `subs` consecutive sub-blocks. An element's rank among
its expert's elements is (elements of that expert before the program's first sub-block)
+ (before its sub-block inside the program, a running histogram) + (earlier in its
sub-block: a SUB x SUB comparison). The counts before the program's range and the
batch's per-expert totals come either from scanning the ids (one launch: every program
reads the batch, cheap while it is small: decode) or from a first kernel that writes
one histogram per program (two launches: prefill, where a scan per program would read
the batch hundreds of times).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

SUB = 128  # elements ranked together by one SUB x SUB comparison
CHUNK = 1024  # elements per histogram while scanning the batch
MAX_PROGRAMS = 128
# Above this many elements (tokens x top-k) the counts come from a first kernel.
TWO_PASS_ABOVE = 8192


@triton.jit
def _count_kernel(
    ids_ptr, counts_ptr, unpadded_ptr, numel, top_k, num_experts, subs,
    HAS_UNPADDED: tl.constexpr, E_PAD: tl.constexpr, SUB_: tl.constexpr,
):
    """Program p: histograms of its own range, all valid elements (row p) and the recorded
    ones (row G + p), into counts (2G, E_PAD)."""
    pid = tl.program_id(0)
    grid = tl.num_programs(0)
    first = pid * subs * SUB_
    recorded = numel
    if HAS_UNPADDED:
        recorded = tl.minimum(tl.load(unpadded_ptr).to(tl.int32) * top_k, numel)
    every = tl.zeros((E_PAD,), tl.int32)
    rec = tl.zeros((E_PAD,), tl.int32)
    for s in range(0, subs):
        offs = first + s * SUB_ + tl.arange(0, SUB_)
        e = tl.load(ids_ptr + offs, mask=offs < numel, other=-1)
        valid = (offs < numel) & (e >= 0) & (e < num_experts)
        every += tl.histogram(tl.where(valid, e, E_PAD - 1), E_PAD)
        rec += tl.histogram(tl.where(valid & (offs < recorded), e, E_PAD - 1), E_PAD)
    bins = tl.arange(0, E_PAD)
    tl.store(counts_ptr + pid * E_PAD + bins, every)
    tl.store(counts_ptr + (grid + pid) * E_PAD + bins, rec)


@triton.jit
def _balanced_kernel(
    ids_ptr, replica_count_ptr, l2p_ptr, out_ptr, load_ptr, record_ptr, unpadded_ptr, counts_ptr,
    numel, top_k, num_experts, map_slots, load_size, subs,
    HAS_UNPADDED: tl.constexpr, FROM_COUNTS: tl.constexpr, E_PAD: tl.constexpr, SUB_: tl.constexpr,
    CHUNK_: tl.constexpr,
):
    pid = tl.program_id(0)
    grid = tl.num_programs(0)
    first = pid * subs * SUB_
    recorded = numel
    if HAS_UNPADDED:
        recorded = tl.minimum(tl.load(unpadded_ptr).to(tl.int32) * top_k, numel)
    bins = tl.arange(0, E_PAD)
    before = tl.zeros((E_PAD,), tl.int32)  # valid elements of each expert before this program's range
    n = tl.zeros((E_PAD,), tl.int32)  # recorded elements of each expert in the batch
    if FROM_COUNTS:
        for q in range(0, grid):
            if q < pid:
                before += tl.load(counts_ptr + q * E_PAD + bins)
            n += tl.load(counts_ptr + (grid + q) * E_PAD + bins)
    else:
        for start in range(0, numel, CHUNK_):
            offs = start + tl.arange(0, CHUNK_)
            e = tl.load(ids_ptr + offs, mask=offs < numel, other=-1)
            valid = (offs < numel) & (e >= 0) & (e < num_experts)
            before += tl.histogram(tl.where(valid & (offs < first), e, E_PAD - 1), E_PAD)
            n += tl.histogram(tl.where(valid & (offs < recorded), e, E_PAD - 1), E_PAD)
    count = tl.maximum(tl.load(replica_count_ptr + bins, mask=bins < num_experts, other=1).to(tl.int32), 1)
    left = n % count
    dealt = tl.cumsum(left, 0) - left  # remainders dealt to the experts before each one
    record = tl.load(record_ptr) != 0
    lane = tl.arange(0, SUB_)
    earlier = lane[None, :] < lane[:, None]
    running = before
    for s in range(0, subs):
        offs = first + s * SUB_ + lane
        inside = offs < numel
        e = tl.load(ids_ptr + offs, mask=inside, other=-1)
        valid = inside & (e >= 0) & (e < num_experts)
        key = tl.where(valid, e, E_PAD - 1)
        inner = tl.sum(((key[:, None] == key[None, :]) & earlier).to(tl.int32), axis=1)
        c = tl.gather(count, key, 0)
        replica = (tl.gather(running, key, 0) + inner + tl.gather(dealt, key, 0)) % c
        phys = tl.load(l2p_ptr + key.to(tl.int64) * map_slots + replica, mask=valid, other=-1)
        tl.store(out_ptr + offs, phys, mask=inside)
        if record:  # outside a load window the pass records nothing
            ok = valid & (offs < recorded) & (phys >= 0) & (phys < load_size)
            tl.atomic_add(load_ptr + tl.where(ok, phys, 0), 1, mask=ok)
        running += tl.histogram(key, E_PAD)


def _grid(numel: int, max_programs: int) -> tuple[int, int]:
    """(programs, sub-blocks per program) for a batch of numel elements."""
    blocks = triton.cdiv(numel, SUB)
    subs = triton.cdiv(blocks, min(blocks, max_programs))
    return triton.cdiv(blocks, subs), subs


def triton_balanced_map_and_record(
    topk_ids: torch.Tensor,
    expert_load_view: torch.Tensor,
    logical_to_physical_map: torch.Tensor,
    logical_replica_count: torch.Tensor,
    record_enabled: torch.Tensor,
    num_unpadded_tokens: torch.Tensor | None = None,
    *,
    two_pass: bool | None = None,
    max_programs: int = MAX_PROGRAMS,
) -> torch.Tensor:
    """Upstream's `eplb_map_to_physical_and_record` signature, the balanced dispatch.
    two_pass / max_programs: the benchmark's knobs (default: chosen by the batch size)."""
    ids = topk_ids.contiguous().to(dtype=torch.int32)
    numel = ids.numel()
    if numel == 0:
        return topk_ids
    assert expert_load_view.is_contiguous()
    num_experts = logical_replica_count.shape[0]
    e_pad = triton.next_power_of_2(num_experts + 1)  # the last bin takes invalid ids
    if two_pass is None:
        two_pass = numel > TWO_PASS_ABOVE
    grid, subs = _grid(numel, max_programs)
    out = torch.empty((numel,), device=topk_ids.device, dtype=topk_ids.dtype)
    has_unpadded = num_unpadded_tokens is not None
    unpadded = num_unpadded_tokens if has_unpadded else ids  # an unread placeholder pointer
    counts = ids
    if two_pass:
        counts = torch.empty((2 * grid, e_pad), device=ids.device, dtype=torch.int32)
        _count_kernel[(grid,)](
            ids, counts, unpadded, numel, ids.shape[-1], num_experts, subs,
            HAS_UNPADDED=has_unpadded, E_PAD=e_pad, SUB_=SUB,
        )
    _balanced_kernel[(grid,)](
        ids, logical_replica_count.contiguous(), logical_to_physical_map.contiguous(), out, expert_load_view,
        record_enabled, unpadded, counts, numel, ids.shape[-1], num_experts, logical_to_physical_map.shape[1],
        expert_load_view.shape[0], subs,
        HAS_UNPADDED=has_unpadded, FROM_COUNTS=two_pass, E_PAD=e_pad, SUB_=SUB, CHUNK_=CHUNK,
    )
    return out.reshape(topk_ids.shape)
