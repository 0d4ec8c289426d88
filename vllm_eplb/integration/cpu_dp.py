"""Data parallelism with expert parallelism on CPU: the variable-size collectives.

With `--data-parallel-size N --enable-expert-parallel`, each MoE layer's dispatch on
CPU goes through vLLM's `AgRsAll2AllManager` (the only all2all backend the CPU
communicator accepts): it all-gathers every DP rank's tokens with
`all_gatherv(..., sizes=<tokens per DP rank>)` and hands each rank its tokens back
after the experts with `reduce_scatterv(..., sizes=...)`. DP ranks run batches of
different sizes (an idle rank runs a 1-token dummy pass), so the sizes differ.
vLLM 0.30's `CpuCommunicator` does not define either method: the base class's raise
NotImplementedError (vllm/distributed/device_communicators/base_device_communicator.py,
`all_gatherv` and `reduce_scatterv`), and the first request kills every worker.

`install_cpu_dp_collectives()` (the hook `cpu_dp_collectives`) gives `CpuCommunicator` both
methods, built on the collectives it has over its gloo group:
  all_gatherv     pad each tensor to the largest rank's size, all_gather_into_tensor,
                  drop each rank's padding (one collective per tensor)
  reduce_scatterv all_reduce the whole (sum(sizes), ...) tensor, keep this rank's rows
                  (the sum every rank computes is the reduce-scatter's; gloo's own
                  reduce_scatter is not used: not every torch build has it for gloo)
It installs nothing where the class already defines its own (a later vLLM), so the
same call is safe on every version. Mirrored for a fork by the series' patch
0008-cpu-communicator-all-gatherv-reduce-scatterv.patch (patches/vllm/series, marked cpu:
every CPU release applies patches/vllm/0008-...patch, no release folder patches/vllm/<release>/
holds its own copy).
"""

from __future__ import annotations

import torch

_MARK = "_vllm_eplb_cpu_dp"


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] == rows:
        return t.contiguous()
    out = t.new_zeros((rows,) + tuple(t.shape[1:]))
    out[: t.shape[0]] = t
    return out


def all_gatherv(self, input_, dim: int = 0, sizes: list[int] | None = None):
    """CpuCommunicator.all_gatherv: concatenation along dim 0 of every rank's tensor
    (or of each tensor of a list), rank i contributing sizes[i] rows."""
    if dim != 0:
        raise NotImplementedError("only dim 0 all-gatherv is supported")
    world = self.world_size
    single = isinstance(input_, torch.Tensor)
    tensors = [input_] if single else list(input_)
    if sizes is not None:
        assert len(sizes) == world, f"{len(sizes)} sizes for {world} ranks"
    outs = []
    for t in tensors:
        if sizes is None:
            rows = [t.shape[0]] * world
        else:
            assert t.shape[0] == sizes[self.rank_in_group], f"{t.shape[0]} != {sizes[self.rank_in_group]}"
            rows = list(sizes)
        if world == 1:
            outs.append(t)
            continue
        most = max(rows)
        padded = _pad_rows(t, most)
        gathered = torch.empty((world * most,) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
        self.dist_module.all_gather_into_tensor(gathered, padded, group=self.device_group)
        if all(r == most for r in rows):
            outs.append(gathered)
        else:
            outs.append(torch.cat([gathered[i * most : i * most + r] for i, r in enumerate(rows)]))
    return outs[0] if single else outs


def reduce_scatterv(self, input_: torch.Tensor, dim: int = -1, sizes: list[int] | None = None) -> torch.Tensor:
    """CpuCommunicator.reduce_scatterv: the sum over ranks of input_, split along dim
    into sizes[i] rows for rank i (equal parts without sizes); returns this rank's."""
    world = self.world_size
    if dim < 0:
        dim += input_.dim()
    t = input_.movedim(0, dim).contiguous() if dim != 0 else input_.contiguous()
    if sizes is not None:
        assert len(sizes) == world, f"{len(sizes)} sizes for {world} ranks"
        assert t.shape[0] == sum(sizes), f"{t.shape[0]} rows != sum of {sizes}"
        start, rows = sum(sizes[: self.rank_in_group]), sizes[self.rank_in_group]
    else:
        assert t.shape[0] % world == 0, f"{t.shape[0]} rows over {world} ranks"
        rows = t.shape[0] // world
        start = rows * self.rank_in_group
    if world > 1:
        t = t.clone() if t is input_ else t  # all_reduce works in place: leave the caller's tensor alone
        self.dist_module.all_reduce(t, group=self.device_group)
    out = t[start : start + rows]
    return (out.movedim(0, dim) if dim != 0 else out).contiguous()


def install_cpu_dp_collectives() -> bool:
    """Give vLLM's CpuCommunicator all_gatherv / reduce_scatterv where it lacks them.
    Returns True if it installed them (False: already there, its own or ours)."""
    from vllm.distributed.device_communicators.base_device_communicator import DeviceCommunicatorBase
    from vllm.distributed.device_communicators.cpu_communicator import CpuCommunicator

    installed = False
    for name, fn in (("all_gatherv", all_gatherv), ("reduce_scatterv", reduce_scatterv)):
        current = getattr(CpuCommunicator, name)
        if getattr(current, _MARK, False) or current is not getattr(DeviceCommunicatorBase, name):
            continue  # ours already, or vLLM's own implementation
        setattr(fn, _MARK, True)
        setattr(CpuCommunicator, name, fn)
        installed = True
    return installed
