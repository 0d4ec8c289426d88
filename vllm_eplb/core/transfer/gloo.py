"""Transfer backend over a gloo group: CPU tensors directly, GPU tensors through
pinned host staging. The fallback that works everywhere, and the only one on CPU.

Nothing here blocks the forward loop:
- A gloo send or receive reports completion only through wait() (is_completed()
  stays False until someone waited), so a waiter thread of the backend waits for
  them (gloo releases the GIL while it does) and done() asks that thread.
- GPU weights: the rows to send are packed on a side stream; the waiter thread
  copies them into pinned host memory, posts the sends, and copies received rows to
  the GPU on the side stream before it reports done. The pinned buffers are two
  arenas (send, receive) kept across steps and grown, on the waiter thread, to the
  largest step: pinning memory costs about as much as copying it.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch
import torch.distributed as dist

from .backend import (
    LayerJob,
    StagingArena,
    StagingRegion,
    TransferBackend,
    TransferError,
    TransferHandle,
    copy_rows,
    padded,
    staging_tensor,
    wait_all,
)


# Host<->device copies are cut into pieces of this size. One 700 MB copy holds the copy
# engine of its direction for ~20 ms, and the forward pass's own small copies (sampled
# tokens to the CPU) queue behind it: measured on 2 x H200, the pass after each gloo step
# started took 10-15 ms longer. Pieces let them in between.
COPY_CHUNK_BYTES = 16 << 20


def _chunked_copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst.copy_(src, non_blocking=True) in pieces of about COPY_CHUNK_BYTES (rows of
    dim 0, or flat slices when both are contiguous)."""
    nbytes = src.numel() * src.element_size()
    if nbytes <= COPY_CHUNK_BYTES or not (dst.is_contiguous() and src.is_contiguous()):
        dst.copy_(src, non_blocking=True)
        return
    d, s_ = dst.view(-1), src.view(-1)
    step = max(1, COPY_CHUNK_BYTES // src.element_size())
    for i in range(0, s_.numel(), step):
        d[i : i + step].copy_(s_[i : i + step], non_blocking=True)


class _PinnedArena(StagingRegion):
    """One pinned host buffer, carved into views for one step at a time."""

    def __init__(self):
        super().__init__(torch.empty(0, dtype=torch.uint8))

    def reserve(self, nbytes: int) -> None:
        """Make room for a step of `nbytes` (before any view of it is taken). Grows only
        past what prepare() pinned, which bounds every step."""
        self.off = 0
        if self.buf.numel() < nbytes:
            self.buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)


class _GlooHandle(TransferHandle):
    def __init__(self, future, received, staging_bytes):
        self._future = future
        self._received = received
        self._staging_bytes = staging_bytes

    def done(self) -> bool:
        return self._future.done()

    def wait(self):
        try:
            self._future.result()
        except Exception as exc:
            raise TransferError(f"gloo transfer failed: {exc}") from exc
        return self._received

    @property
    def staging_bytes(self) -> int:
        return self._staging_bytes


class GlooBackend(TransferBackend):
    name = "gloo"

    def __init__(self, group, stage_on_cpu: bool = False):
        """stage_on_cpu: reserve the per-step staging for CPU tensors as well (off by
        default: on CPU an allocation costs little, and reserving would hold min(lag + 1, 6) x 2
        steps of host memory for good). The test rig turns it on, so that the staging's
        reuse across commits and aborted cycles runs under its every-pass checks."""
        self.group = group
        self.stage_on_cpu = stage_on_cpu
        self._waiter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="eplb-gloo-wait")
        self._send_arena = _PinnedArena()
        self._recv_arena = _PinnedArena()
        self.staging = StagingArena()  # received and packed rows, per step in flight
        self._stream = None

    def prepare(self, weights: list[torch.Tensor], max_step_bytes: int, steps: int = 1) -> None:
        """Pin both host arenas now, at start-up: pinning (cudaHostAlloc) stalls every
        CUDA call of the process, so it must not happen while serving. The waiter thread
        runs one step at a time, so one step's host staging serves them all; the device
        staging (received rows until the commit, packed sends) is one region per step in
        flight."""
        if not weights:
            return
        if weights[0].is_cuda:
            self._recv_arena.reserve(max_step_bytes)
            self._send_arena.reserve(max_step_bytes)
        if weights[0].is_cuda or self.stage_on_cpu:
            self.staging.reserve(weights[0].device, steps, 2 * max_step_bytes)

    def close(self) -> None:
        self._waiter.shutdown(wait=False)

    def start(self, jobs: list[LayerJob], rank: int) -> TransferHandle:
        device = next((j.weights[0].device for j in jobs if j.weights), torch.device("cpu"))
        if device.type == "cuda":
            return self._start_gpu(jobs, rank, device)
        works, received, staging = [], {}, 0
        region = self.staging.acquire(None) if self.staging.regions else None
        for job in jobs:
            part = job.plan.part(rank)
            # Receives first: a gloo send completes only once the peer posted its receive.
            for t in part.recvs:
                bufs = [staging_tensor(region, (len(t.experts), *w.shape[1:]), w.dtype, "cpu")[0] for w in job.weights]
                for i, buf in enumerate(bufs):
                    staging += buf.numel() * buf.element_size()
                    works.append(dist.irecv(buf, group=self.group, group_src=t.src, tag=job.tag + i))
                for row, e in enumerate(t.experts):
                    received[(job.plan.layer, e)] = [b[row] for b in bufs]
            for t in part.sends:
                idx = torch.tensor(t.src_slots)
                for i, w in enumerate(job.weights):
                    # index_select copies: the live slot is not what travels, so the sender
                    # stays free to keep serving from it.
                    buf = staging_tensor(region, (len(idx), *w.shape[1:]), w.dtype, "cpu")[0]
                    torch.index_select(w, 0, idx, out=buf)
                    staging += buf.numel() * buf.element_size()
                    works.append(dist.isend(buf, group=self.group, group_dst=t.dst, tag=job.tag + i))
        handle = _GlooHandle(self._waiter.submit(wait_all, works), received, staging)
        handle._region = region
        return handle

    def _start_gpu(self, jobs: list[LayerJob], rank: int, device) -> TransferHandle:
        """On the loop's thread only GPU work is queued (rows packed on a side stream,
        receive buffers allocated); pinning host memory, the host copies and gloo run on
        the waiter thread, which holds no GIL while it waits."""
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        stream, main = self._stream, torch.cuda.current_stream(device)
        recvs, sends, received, staging = [], [], {}, 0
        stream.wait_stream(main)  # the slots hold what the map says as of this pass
        region = self.staging.acquire(stream)
        fresh = []
        with torch.cuda.stream(stream):
            for job in jobs:
                part = job.plan.part(rank)
                for t in part.recvs:
                    for i, w in enumerate(job.weights):
                        dev, new = staging_tensor(region, (len(t.experts), *w.shape[1:]), w.dtype, device)
                        if new:
                            fresh.append(dev)
                        recvs.append((dev, t.src, job.tag + i))
                        for row, e in enumerate(t.experts):
                            received.setdefault((job.plan.layer, e), []).append(dev[row])
                for t in part.sends:
                    for i, w in enumerate(job.weights):
                        # a packed copy travels, not the live slots, which keep serving
                        # (row copies: an index tensor's host->device copy would sync)
                        packed = staging_tensor(region, (len(t.src_slots), *w.shape[1:]), w.dtype, device)[0]
                        copy_rows(packed, w, t.src_slots)
                        sends.append((packed, t.dst, job.tag + i))
        for b in fresh:
            b.record_stream(main)  # the main stream reads them at commit (arena views need not)
        nbytes = lambda items: sum(padded(d.numel() * d.element_size()) for d, _, _ in items)  # noqa: E731
        staging = 2 * nbytes(recvs) + 2 * nbytes(sends)  # device and pinned host copies
        group, recv_arena, send_arena = self.group, self._recv_arena, self._send_arena

        def run():
            recv_arena.reserve(nbytes(recvs))
            send_arena.reserve(nbytes(sends))
            host_in = [recv_arena.take(d.shape, d.dtype) for d, _, _ in recvs]
            works = [dist.irecv(h, group=group, group_src=src, tag=tag) for h, (_, src, tag) in zip(host_in, recvs)]
            with torch.cuda.stream(stream):
                host_out = [send_arena.take(d.shape, d.dtype) for d, _, _ in sends]
                for h, (d, _, _) in zip(host_out, sends):
                    _chunked_copy(h, d)
                out_ready = torch.cuda.Event()
                out_ready.record(stream)
            out_ready.synchronize()
            works += [dist.isend(h, group=group, group_dst=dst, tag=tag) for h, (_, dst, tag) in zip(host_out, sends)]
            wait_all(works)
            with torch.cuda.stream(stream):
                for h, (d, _, _) in zip(host_in, recvs):
                    _chunked_copy(d, h)
                landed = torch.cuda.Event()
                landed.record(stream)
            landed.synchronize()
            sends.clear()  # packed rows can go

        handle = _GlooHandle(self._waiter.submit(run), received, staging)
        handle._region = region
        return handle
