"""GPU transfer backends: CUDA IPC pulls within a node, NCCL point-to-point across nodes.

Both move experts into staging buffers on the receiving GPU on a side stream, so the
forward pass on the main stream keeps going; the engine commits (copies staging into
the weight slots, on the main stream) only at the agreed pass.

- CudaIpcBackend: at start-up every rank maps every same-node peer's expert weight
  tensors into its own address space (IPC handles exchanged once over the gloo
  group). A transfer is then a pull: the receiver copies the rows it needs straight
  from the peer's weights with cudaMemcpyAsync on its side stream, which the copy
  engines execute over NVLink. Senders do nothing. A peer's slot is never
  overwritten while it is read: the sender commits only after the commit round,
  which every reader enters only once its copies completed.
- NcclBackend: isend/irecv on a dedicated NCCL group, posted from a side stream;
  send buffers are packed rows (one message per peer and weight tensor).
- HybridBackend: per pair of ranks, IPC within a node and NCCL between nodes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .backend import LayerJob, TransferBackend, TransferError, TransferHandle


class _StreamHandle(TransferHandle):
    """Done when an event recorded after the copies on the side stream fired (and, for
    NCCL, when the works completed)."""

    def __init__(self, event, works, received, staging_bytes):
        self._event = event
        self._works = works
        self._received = received
        self._staging_bytes = staging_bytes

    def done(self) -> bool:
        return all(w.is_completed() for w in self._works) and (self._event is None or self._event.query())

    def wait(self):
        try:
            for w in self._works:
                # ProcessGroupNCCL's wait() only orders streams; poll for the CPU to know
                while not w.is_completed():
                    pass
            if self._event is not None:
                self._event.synchronize()
        except Exception as exc:
            raise TransferError(f"GPU transfer failed: {exc}") from exc
        return self._received

    @property
    def staging_bytes(self) -> int:
        return self._staging_bytes


class CudaIpcBackend(TransferBackend):
    name = "cuda_ipc"

    def __init__(self, cpu_group, weights_of, num_layers: int, rank: int, world: int):
        """Maps the peers' expert tensors. Collective over cpu_group (gloo)."""
        from torch.multiprocessing.reductions import reduce_tensor

        self.rank = rank
        self.stream = torch.cuda.Stream()
        mine = [[reduce_tensor(w) for w in weights_of(layer)] for layer in range(num_layers)]
        everyone: list = [None] * world
        dist.all_gather_object(everyone, mine, group=cpu_group)
        # peers[r][layer][i]: rank r's i-th expert tensor of the layer, mapped here
        self.peers = []
        for r, handles in enumerate(everyone):
            if r == rank:
                self.peers.append([list(weights_of(layer)) for layer in range(num_layers)])
            else:
                self.peers.append([[fn(*args) for fn, args in layer] for layer in handles])

    def start(self, jobs: list[LayerJob], rank: int) -> TransferHandle:
        received: dict[tuple[int, int], list[torch.Tensor]] = {}
        staging = 0
        main = torch.cuda.current_stream()
        self.stream.wait_stream(main)  # staging allocated on main must exist first
        with torch.cuda.stream(self.stream):
            for job in jobs:
                part = job.plan.part(rank)
                for t in part.recvs:
                    src = self.peers[t.src][job.plan.layer]
                    for e, slot in zip(t.experts, t.src_slots):
                        bufs = []
                        for peer_w in src:
                            buf = torch.empty_like(peer_w[slot])
                            buf.copy_(peer_w[slot], non_blocking=True)  # cudaMemcpyAsync, peer to peer
                            staging += buf.numel() * buf.element_size()
                            bufs.append(buf)
                        received[(job.plan.layer, e)] = bufs
            event = torch.cuda.Event()
            event.record(self.stream)
        for bufs in received.values():  # the main stream uses them at commit
            for b in bufs:
                b.record_stream(main)
        return _StreamHandle(event, [], received, staging)


class NcclBackend(TransferBackend):
    name = "nccl"

    def __init__(self, nccl_group):
        self.group = nccl_group
        self.stream = torch.cuda.Stream()

    def start(self, jobs: list[LayerJob], rank: int) -> TransferHandle:
        ops, received, staging, keep = [], {}, 0, []
        main = torch.cuda.current_stream()
        self.stream.wait_stream(main)
        with torch.cuda.stream(self.stream):
            for job in jobs:
                part = job.plan.part(rank)
                for t in part.recvs:
                    bufs = [torch.empty((len(t.experts), *w.shape[1:]), dtype=w.dtype, device=w.device) for w in job.weights]
                    staging += sum(b.numel() * b.element_size() for b in bufs)
                    for b in bufs:
                        ops.append(dist.P2POp(dist.irecv, b, group=self.group, group_peer=t.src))
                    for row, e in enumerate(t.experts):
                        received[(job.plan.layer, e)] = [b[row] for b in bufs]
                for t in part.sends:
                    idx = torch.tensor(t.src_slots, device=job.weights[0].device)
                    for w in job.weights:
                        buf = w.index_select(0, idx)
                        staging += buf.numel() * buf.element_size()
                        keep.append(buf)
                        ops.append(dist.P2POp(dist.isend, buf, group=self.group, group_peer=t.dst))
            works = dist.batch_isend_irecv(ops) if ops else []
            event = torch.cuda.Event()
            event.record(self.stream)
        handle = _StreamHandle(event, works, received, staging)
        handle._keep = keep  # send buffers live until the handle is dropped
        return handle


class HybridBackend(TransferBackend):
    """IPC for peers on this node, NCCL for the others; one handle over both."""

    name = "ipc+nccl"

    def __init__(self, ipc: CudaIpcBackend, nccl: NcclBackend, node_of):
        self.ipc, self.nccl, self.node_of = ipc, nccl, node_of

    def start(self, jobs: list[LayerJob], rank: int) -> TransferHandle:
        from .plan import LayerPlan, RankPart

        local, remote = [], []
        for job in jobs:
            parts_local, parts_remote = [], []
            for r, part in enumerate(job.plan.parts):
                same = lambda t: self.node_of(t.src) == self.node_of(t.dst)  # noqa: E731
                parts_local.append(RankPart([t for t in part.sends if same(t)], [t for t in part.recvs if same(t)]))
                parts_remote.append(RankPart([t for t in part.sends if not same(t)], [t for t in part.recvs if not same(t)]))
            local.append(LayerJob(LayerPlan(job.plan.layer, job.plan.transfers, parts_local), job.weights))
            remote.append(LayerJob(LayerPlan(job.plan.layer, job.plan.transfers, parts_remote), job.weights))
        a, b = self.ipc.start(local, rank), self.nccl.start(remote, rank)
        return _Both(a, b)


class _Both(TransferHandle):
    def __init__(self, a: TransferHandle, b: TransferHandle):
        self.a, self.b = a, b

    def done(self) -> bool:
        return self.a.done() and self.b.done()

    def wait(self):
        return {**self.a.wait(), **self.b.wait()}

    @property
    def staging_bytes(self) -> int:
        return self.a.staging_bytes + self.b.staging_bytes
