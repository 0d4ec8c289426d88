"""Transfer backend over a gloo group: CPU tensors directly, GPU tensors through
pinned host staging. The fallback that works everywhere, and the only one on CPU."""

from __future__ import annotations

import torch
import torch.distributed as dist

from .backend import LayerJob, TransferBackend, TransferError, TransferHandle


class _GlooHandle(TransferHandle):
    def __init__(self, works, recv_bufs, device, staging_bytes):
        self._works = works
        self._recv_bufs = recv_bufs  # (layer, expert, weight index) -> (buffer, row)
        self._device = device
        self._staging_bytes = staging_bytes

    def done(self) -> bool:
        return all(w.is_completed() for w in self._works)

    def wait(self):
        try:
            for w in self._works:
                w.wait()
        except Exception as exc:
            raise TransferError(f"gloo transfer failed: {exc}") from exc
        out: dict[tuple[int, int], list[torch.Tensor]] = {}
        for (layer, expert, i), (buf, row) in sorted(self._recv_bufs.items()):
            t = buf[row]
            if self._device.type != "cpu":
                t = t.to(self._device, non_blocking=True)
            out.setdefault((layer, expert), []).append(t)
        return out

    @property
    def staging_bytes(self) -> int:
        return self._staging_bytes


class GlooBackend(TransferBackend):
    name = "gloo"

    def __init__(self, group):
        self.group = group

    def start(self, jobs: list[LayerJob], rank: int) -> TransferHandle:
        works = []
        recv_bufs = {}
        staging = 0
        device = torch.device("cpu")
        pin = False
        for j, job in enumerate(jobs):
            part = job.plan.part(rank)
            if job.weights:
                device = job.weights[0].device
                pin = device.type == "cuda"
            n_w = len(job.weights)
            # Receives first: a gloo send completes only once the peer posted its receive.
            for t in part.recvs:
                for i, w in enumerate(job.weights):
                    buf = torch.empty((len(t.experts), *w.shape[1:]), dtype=w.dtype, pin_memory=pin)
                    staging += buf.numel() * buf.element_size()
                    works.append(dist.irecv(buf, group=self.group, group_src=t.src, tag=j * n_w + i))
                    for row, e in enumerate(t.experts):
                        recv_bufs[(job.plan.layer, e, i)] = (buf, row)
            for t in part.sends:
                idx = torch.tensor(t.src_slots, device=device)
                for i, w in enumerate(job.weights):
                    # index_select copies: the live slot is not what travels, so the sender
                    # stays free to keep serving from it.
                    buf = w.index_select(0, idx)
                    if pin:
                        buf = buf.to("cpu", non_blocking=False).pin_memory()
                    staging += buf.numel() * buf.element_size()
                    works.append(dist.isend(buf.contiguous(), group=self.group, group_dst=t.dst, tag=j * n_w + i))
        return _GlooHandle(works, recv_bufs, device, staging)
