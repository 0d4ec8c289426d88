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
- P2PBackend ("nccl"): isend/irecv batched on a dedicated group; send buffers are
  packed rows (one message per peer and weight tensor). On GPU with an NCCL group,
  posted from a side stream. It runs on any group with point-to-point support, so
  the message logic is tested on CPU with gloo as well.
- HybridBackend: per pair of ranks, IPC within a node and P2P between nodes.
"""

from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.distributed as dist

from .backend import (
    LayerJob,
    StagingArena,
    TransferBackend,
    TransferError,
    TransferHandle,
    copy_rows,
    staging_tensor,
    wait_all,
)


class _StreamHandle(TransferHandle):
    """Done when the works completed and an event recorded after the copies on the
    side stream fired."""

    def __init__(self, start_event, event, works, received, staging_bytes, waiter=None):
        self._start = start_event
        self._event = event
        self._works = works
        self._received = received
        self._staging_bytes = staging_bytes
        # gloo works (CPU) report completion only through wait(): a waiter thread waits
        self._waited = waiter.submit(wait_all, works) if waiter is not None else None

    def done(self) -> bool:
        if self._waited is not None:
            return self._waited.done()
        return all(w.is_completed() for w in self._works) and (self._event is None or self._event.query())

    def wait(self):
        try:
            if self._waited is not None:
                self._waited.result()
                return self._received
            for w in self._works:
                # ProcessGroupNCCL's wait() only orders streams; poll for the CPU to know
                while not w.is_completed():
                    pass
                w.wait()  # the current (main) stream, which commits, waits for the receive
            if self._event is not None:
                self._event.synchronize()
        except Exception as exc:
            raise TransferError(f"transfer failed: {exc}") from exc
        return self._received

    def device_seconds(self) -> float | None:
        if self._start is None or self._event is None or not self._event.query():
            return None
        return self._start.elapsed_time(self._event) / 1e3

    @property
    def staging_bytes(self) -> int:
        return self._staging_bytes


def _events(stream):
    if stream is None:
        return None, None
    return torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)


class CudaIpcBackend(TransferBackend):
    name = "cuda_ipc"

    def __init__(self, cpu_group, weights_of, num_layers: int, rank: int, world: int, peers: list[int] | None = None):
        """Maps the expert tensors of `peers` (default: every rank). Collective over
        cpu_group (gloo): every rank of the group calls it."""
        from torch.multiprocessing.reductions import reduce_tensor

        self.rank = rank
        self.device = torch.device("cuda", torch.cuda.current_device())
        self.stream = torch.cuda.Stream(self.device)
        self._peer_streams: dict[int, torch.cuda.Stream] = {}  # per source GPU, on it
        self._recv_streams: dict[int, torch.cuda.Stream] = {}  # per source rank, on this GPU
        self.staging = StagingArena()
        mine = [[reduce_tensor(w) for w in weights_of(layer)] for layer in range(num_layers)]
        everyone: list = [None] * world
        dist.all_gather_object(everyone, mine, group=cpu_group)
        wanted = set(range(world) if peers is None else peers)
        # peers[r][layer][i]: rank r's i-th expert tensor of the layer, mapped here
        self.peers: list = []
        for r, handles in enumerate(everyone):
            if r == rank:
                self.peers.append([list(weights_of(layer)) for layer in range(num_layers)])
            elif r in wanted:
                self.peers.append([[fn(*args) for fn, args in layer] for layer in handles])
            else:
                self.peers.append(None)

    def prepare(self, weights: list[torch.Tensor], max_step_bytes: int, steps: int = 1) -> None:
        """Reserve the staging of `steps` steps in flight now (pulls land only in staging)."""
        self.staging.reserve(self.device, steps, max_step_bytes)

    def start(self, jobs: list[LayerJob], rank: int) -> TransferHandle:
        """Pull this rank's experts into staging on this rank's GPU.

        A copy between two GPUs runs on the source GPU's current stream, ordered by
        PyTorch against the destination GPU's current stream both before and after. So
        each source peer gets a receive stream here: its pulls (issued on a stream of this
        process on the source GPU) are ordered against that stream only, and the pulls
        from different peers overlap instead of waiting for one another. Every receive
        stream starts after this backend's side stream and the side stream waits for all
        of them: the events on it time the step. The staging lies on this GPU, the commit
        is a copy within it. The main stream is not waited for: the peer's slots change
        only after the commit round, which this rank enters only once its pulls completed."""
        received: dict[tuple[int, int], list[torch.Tensor]] = {}
        staging = 0
        main = torch.cuda.current_stream(self.device)
        start, end = _events(self.stream)
        region = self.staging.acquire(self.stream)  # after the last readers of its staging
        start.record(self.stream)
        by_src: dict[int, list] = {}
        for job in jobs:
            for t in job.plan.part(rank).recvs:
                by_src.setdefault(t.src, []).append((job, t))
        fresh: list[torch.Tensor] = []
        for src_rank, items in by_src.items():
            recv_stream = self._recv_streams.get(src_rank)
            if recv_stream is None:
                recv_stream = self._recv_streams[src_rank] = torch.cuda.Stream(self.device)
            recv_stream.wait_event(start)
            with torch.cuda.stream(recv_stream):
                for job, t in items:
                    src = self.peers[t.src][job.plan.layer]
                    with self._source_stream(src[0].device):
                        for peer_w in src:
                            shape = (len(t.experts), *peer_w.shape[1:])
                            buf, new = staging_tensor(region, shape, peer_w.dtype, self.device)
                            if new:
                                fresh.append(buf)
                            copy_rows(buf, peer_w, t.src_slots)  # cudaMemcpyAsync over NVLink
                            staging += buf.numel() * buf.element_size()
                            for row, e in enumerate(t.experts):
                                received.setdefault((job.plan.layer, e), []).append(buf[row])
            self.stream.wait_stream(recv_stream)
        end.record(self.stream)
        for b in fresh:  # the main stream reads them at commit (arena views need not)
            b.record_stream(main)
        handle = _StreamHandle(start, end, [], received, staging)
        handle._region = region
        return handle

    def _source_stream(self, device: torch.device):
        if device == self.device:
            return contextlib.nullcontext()
        stream = self._peer_streams.get(device.index)
        if stream is None:
            stream = self._peer_streams[device.index] = torch.cuda.Stream(device)
        return torch.cuda.stream(stream)


class P2PBackend(TransferBackend):
    name = "nccl"

    def __init__(self, group, device: torch.device | str = "cpu"):
        """group: a dedicated NCCL group on GPU (gloo works too). Collective: every rank
        of the group constructs it, since the first NCCL call on a group must be."""
        self.group = group
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream() if self.device.type == "cuda" else None
        self.staging = StagingArena()
        self._waiter = ThreadPoolExecutor(max_workers=1) if self.stream is None else None
        warm = torch.zeros(1, device=self.device)
        dist.all_reduce(warm, group=group)  # creates the communicator now, on every rank
        if self.stream is not None:
            self._warm_p2p()
            torch.cuda.synchronize()

    def _warm_p2p(self) -> None:
        """NCCL connects a pair of ranks for point-to-point on its first send/receive
        (measured: a 290 ms pass at the first transfer step on 2 x H200, 1.08 s at EP=4).
        Exchange one element with every peer now, from the side stream, at start-up."""
        me, world = dist.get_rank(self.group), dist.get_world_size(self.group)
        if world < 2:
            return
        with torch.cuda.stream(self.stream):
            out = torch.zeros(world, device=self.device)
            into = torch.empty(world, device=self.device)
            ops = []
            for peer in range(world):
                if peer != me:
                    ops.append(dist.P2POp(dist.irecv, into[peer : peer + 1], group=self.group, group_peer=peer))
                    ops.append(dist.P2POp(dist.isend, out[peer : peer + 1], group=self.group, group_peer=peer))
            for w in dist.batch_isend_irecv(ops):
                w.wait()
        self.stream.synchronize()

    def prepare(self, weights: list[torch.Tensor], max_step_bytes: int, steps: int = 1) -> None:
        """Reserve the staging of `steps` steps in flight now: received rows and packed
        sends, each at most a step's bound."""
        if self.stream is not None:  # on CPU (gloo point-to-point) messages need no staging
            self.staging.reserve(self.device, steps, 2 * max_step_bytes)

    def start(self, jobs: list[LayerJob], rank: int) -> TransferHandle:
        ops, received, staging, keep = [], {}, 0, []
        start, end = _events(self.stream)
        ctx = contextlib.nullcontext()
        region = None
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream())
            region = self.staging.acquire(self.stream)
            ctx = torch.cuda.stream(self.stream)
        with ctx:
            if start is not None:
                start.record(self.stream)
            for job in jobs:
                part = job.plan.part(rank)
                # Receives are posted before sends, in plan order on both sides, so the
                # messages of a pair of ranks match in order even with equal tags.
                for t in part.recvs:
                    bufs = [
                        staging_tensor(region, (len(t.experts), *w.shape[1:]), w.dtype, w.device)[0] for w in job.weights
                    ]
                    staging += sum(b.numel() * b.element_size() for b in bufs)
                    for b in bufs:
                        ops.append(dist.P2POp(dist.irecv, b, group=self.group, group_peer=t.src))
                    for row, e in enumerate(t.experts):
                        received[(job.plan.layer, e)] = [b[row] for b in bufs]
                for t in part.sends:
                    for w in job.weights:
                        # a packed copy travels, not the live slots, which keep serving;
                        # row copies, no index tensor (whose host->device copy would sync)
                        buf = staging_tensor(region, (len(t.src_slots), *w.shape[1:]), w.dtype, w.device)[0]
                        copy_rows(buf, w, t.src_slots)
                        staging += buf.numel() * buf.element_size()
                        keep.append(buf)
                        ops.append(dist.P2POp(dist.isend, buf, group=self.group, group_peer=t.dst))
            works = dist.batch_isend_irecv(ops) if ops else []
            if end is not None:
                # NCCL runs them on its own stream: make the side stream wait for it (on the
                # GPU; the CPU does not wait) so the end event times the messages too, not
                # only the packing (measured without: "946 GB/s" on a 387 GB/s link)
                for w in works:
                    w.wait()
                end.record(self.stream)
        handle = _StreamHandle(start, end, works, received, staging, self._waiter)
        handle._keep = keep  # send buffers live until the handle is dropped
        handle._region = region
        return handle


NcclBackend = P2PBackend


class HybridBackend(TransferBackend):
    """IPC for peers on this node, P2P for the others; one handle over both."""

    name = "ipc+nccl"

    def __init__(self, ipc: CudaIpcBackend, p2p: P2PBackend, node_of):
        self.ipc, self.p2p, self.node_of = ipc, p2p, node_of

    def prepare(self, weights: list[torch.Tensor], max_step_bytes: int, steps: int = 1) -> None:
        self.ipc.prepare(weights, max_step_bytes, steps)
        self.p2p.prepare(weights, max_step_bytes, steps)

    def close(self) -> None:
        self.ipc.close()
        self.p2p.close()

    @property
    def reserved_bytes(self) -> int:
        return self.ipc.reserved_bytes + self.p2p.reserved_bytes

    def start(self, jobs: list[LayerJob], rank: int) -> TransferHandle:
        from .plan import LayerPlan, RankPart

        def same(t):
            return self.node_of(t.src) == self.node_of(t.dst)

        local, remote = [], []
        for job in jobs:
            parts_local, parts_remote = [], []
            for part in job.plan.parts:
                parts_local.append(RankPart([t for t in part.sends if same(t)], [t for t in part.recvs if same(t)]))
                parts_remote.append(RankPart([t for t in part.sends if not same(t)], [t for t in part.recvs if not same(t)]))
            local.append(LayerJob(LayerPlan(job.plan.layer, job.plan.transfers, parts_local), job.weights))
            remote.append(LayerJob(LayerPlan(job.plan.layer, job.plan.transfers, parts_remote), job.weights))
        return _Both(self.ipc.start(local, rank), self.p2p.start(remote, rank))


class _Both(TransferHandle):
    def __init__(self, a: TransferHandle, b: TransferHandle):
        self.a, self.b = a, b

    def done(self) -> bool:
        return self.a.done() and self.b.done()

    def wait(self):
        return {**self.a.wait(), **self.b.wait()}

    def release(self) -> None:
        self.a.release()
        self.b.release()

    def device_seconds(self) -> float | None:
        xs = [x for x in (self.a.device_seconds(), self.b.device_seconds()) if x is not None]
        return max(xs) if xs else None

    @property
    def staging_bytes(self) -> int:
        return self.a.staging_bytes + self.b.staging_bytes
