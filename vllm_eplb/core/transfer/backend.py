"""The interface every transfer backend implements.

A backend moves the experts of one transfer step (one or more layers) between
ranks into staging buffers it owns. It never writes a weight slot: the engine
commits staged experts at the pass the ranks agreed on (invariant 2), so a slot
a peer may still be reading is never overwritten early.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable

import torch

from .plan import LayerPlan


class TransferError(RuntimeError):
    pass


@dataclass
class LayerJob:
    plan: LayerPlan
    weights: list[torch.Tensor]  # this rank's expert tensors of the layer, each (local slots, ...)
    # Message tag of the job's first weight tensor (the i-th travels with tag + i): the step
    # and the layer. Unique across the steps in flight, so a step one rank never posted (it
    # failed to start) leaves its peers' messages pending instead of pairing them with a later
    # step's, and a step two ranks hold as different layers pairs nothing: gloo aborts the
    # process on a size mismatch.
    tag: int = 0


TAG_WEIGHTS = 16  # weight tensors a job may have (tags per job)
TAG_LAYERS = 1024  # layers told apart by the tags (a model with more would reuse them modulo this)


def job_tag(step_seq: int, layer: int) -> int:
    return ((step_seq % 32768) * TAG_LAYERS + layer % TAG_LAYERS) * TAG_WEIGHTS


class TransferHandle(ABC):
    @abstractmethod
    def done(self) -> bool:
        """Non-blocking: has every send and receive of this rank completed?"""

    @abstractmethod
    def wait(self) -> dict[tuple[int, int], list[torch.Tensor]]:
        """Block until complete; return {(layer, expert): [one tensor per weight]} of what
        this rank received, on the weights' device. Raises TransferError."""

    @property
    @abstractmethod
    def staging_bytes(self) -> int:
        """Bytes of staging memory this step holds on this rank."""

    def device_seconds(self) -> float | None:
        """Time the copies took on the device (GPU backends, once done), else None."""
        return None

    def release(self) -> None:
        """Nothing will read this step's staging any more (it was committed, or it was
        dropped once done): its reserved memory may serve a later step."""
        region = getattr(self, "_region", None)
        if region is not None:
            self._region = None
            region.release()


class TransferBackend(ABC):
    name: str = ""
    staging: StagingArena | None = None  # what prepare() reserved, for backends that do
    @abstractmethod
    def start(self, jobs: list[LayerJob], rank: int) -> TransferHandle:
        """Post this rank's sends and receives for the step; return at once."""

    def prepare(self, weights: list[torch.Tensor], max_step_bytes: int, steps: int = 1) -> None:
        """Called once at start-up with one layer's expert tensors, the most bytes one
        step can move on this rank and the most steps in flight at once, so a backend can
        set up staging before serving starts."""

    def close(self) -> None:  # pragma: no cover - optional
        pass

    @property
    def reserved_bytes(self) -> int:
        """Staging memory prepare() reserved (held for as long as the backend lives)."""
        return self.staging.reserved_bytes if self.staging is not None else 0


class DelegatingBackend(TransferBackend):
    """A backend that hands every call to `inner` (its name and reserved staging too).
    Subclass it and override `start` to watch or change what a step does: the harness's fault
    doubles and step log, the GPU benchmark's per-step record."""

    def __init__(self, inner: TransferBackend):
        self.inner, self.name = inner, inner.name

    def start(self, jobs: list[LayerJob], rank: int) -> TransferHandle:
        return self.inner.start(jobs, rank)

    def prepare(self, weights: list[torch.Tensor], max_step_bytes: int, steps: int = 1) -> None:
        self.inner.prepare(weights, max_step_bytes, steps)

    def close(self) -> None:
        self.inner.close()

    @property
    def reserved_bytes(self) -> int:
        return self.inner.reserved_bytes


@dataclass
class DeferredBackend:
    """A backend to build once the ranks agreed they build the same one: building is
    collective for most backends (IPC handles exchanged, an NCCL communicator warmed up),
    so ranks configured with different backends would block in each other's set-up before
    any check. The balancer builds it after its start-up check passed (`name`: the backend
    as configured, compared there)."""

    name: str
    build: Callable[[], TransferBackend]


class NoBackend(TransferBackend):
    """Stands in for a backend never built: the ranks disagreed at start-up, nothing moves."""

    def __init__(self, name: str):
        self.name = name

    def start(self, jobs, rank):
        raise TransferError(f"no transfer backend: rebalancing is off ({self.name} was never built)")


STAGING_ALIGN = 512  # bytes; staging views aligned for any dtype


def padded(nbytes: int) -> int:
    """nbytes rounded up to STAGING_ALIGN: what a staging view of that size takes."""
    return -(-nbytes // STAGING_ALIGN) * STAGING_ALIGN


def wait_all(works) -> None:
    """Wait for torch.distributed works (on a waiter thread: gloo works report completion
    only through wait())."""
    for w in works:
        w.wait()


def expert_nbytes(weights: list[torch.Tensor]) -> int:
    """Bytes of one expert across a layer's weight tensors."""
    return sum(w[0].numel() * w.element_size() for w in weights)


def pack_rows(w: torch.Tensor, slots) -> torch.Tensor:
    """A new tensor of w's rows `slots`, in order, on w's device and the current stream.
    Row copies rather than index_select, whose index tensor would travel host->device
    from pageable memory: a synchronising copy."""
    out = torch.empty((len(slots), *w.shape[1:]), dtype=w.dtype, device=w.device)
    copy_rows(out, w, slots)
    return out


def copy_rows(out: torch.Tensor, w: torch.Tensor, slots) -> None:
    """out[i] = w[slots[i]], one asynchronous copy per run of consecutive slots."""
    slots = list(slots)
    i = 0
    while i < len(slots):
        j = i + 1
        while j < len(slots) and slots[j] == slots[j - 1] + 1:
            j += 1
        out[i:j].copy_(w[slots[i] : slots[i] + (j - i)], non_blocking=True)
        i = j


class StagingRegion:
    """One step's share of a StagingArena, carved into views in order."""

    def __init__(self, buf: torch.Tensor):
        self.buf = buf
        self.off = 0
        self.busy = False
        self.freed_after: torch.cuda.Event | None = None  # the last reader's stream passed this

    def take(self, shape, dtype) -> torch.Tensor | None:
        """A view of `shape` and `dtype`, or None when the region is full."""
        n = torch.Size(shape).numel() * dtype.itemsize
        if self.off + n > self.buf.numel():
            return None
        view = self.buf[self.off : self.off + n].view(dtype).view(shape)
        self.off += padded(n)
        return view

    def release(self) -> None:
        # Readers (the commit's copies) were queued on the current stream: a later step's
        # writes wait for this event on the GPU, never on the CPU.
        if self.buf.is_cuda:
            self.freed_after = torch.cuda.Event()
            self.freed_after.record(torch.cuda.current_stream(self.buf.device))
        self.busy = False


class StagingArena:
    """Device staging reserved once, at start-up: one region per step in flight.

    Allocating staging while serving costs the pass that starts a step its cudaMalloc
    (3-7 ms per step start measured at EP=4 on 4 x H200, in the balancer's tick) and can
    fail for memory the KV cache took meanwhile. Reserved before the KV cache is sized,
    the memory is visible to vLLM from the start and a step start only carves views.
    A region comes back when its step is committed or dropped once done (TransferHandle.
    release); a step that finds none free (one left pending by an aborted cycle)
    allocates as before."""

    def __init__(self):
        self.regions: list[StagingRegion] = []
        self.fallbacks = 0  # steps that allocated outside the arena

    @property
    def reserved_bytes(self) -> int:
        return sum(r.buf.numel() for r in self.regions)

    def reserve(self, device: torch.device, steps: int, region_bytes: int) -> None:
        if steps < 1 or region_bytes < 1:
            return
        region_bytes = padded(region_bytes)
        if len(self.regions) == steps and all(r.buf.numel() >= region_bytes and r.buf.device == device for r in self.regions):
            return  # reserved already (the benchmark builds a balancer per run over one backend)
        buf = torch.empty(steps * region_bytes, dtype=torch.uint8, device=device)
        self.regions = [StagingRegion(buf[i * region_bytes : (i + 1) * region_bytes]) for i in range(steps)]

    def acquire(self, stream) -> StagingRegion | None:
        """A free region whose last readers `stream` is made to wait for; None if none."""
        for region in self.regions:
            if not region.busy:
                region.busy, region.off = True, 0
                if region.freed_after is not None:
                    stream.wait_event(region.freed_after)
                return region
        self.fallbacks += 1
        return None


def staging_tensor(region: StagingRegion | None, shape, dtype, device) -> tuple[torch.Tensor, bool]:
    """A staging buffer from `region` if it has room, else a fresh one. Returns it and
    whether it was freshly allocated (the caller then owns its lifetime)."""
    if region is not None:
        view = region.take(shape, dtype)
        if view is not None:
            return view, False
    return torch.empty(shape, dtype=dtype, device=device), True
