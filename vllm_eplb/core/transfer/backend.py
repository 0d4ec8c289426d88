"""The interface every transfer backend implements.

A backend moves the experts of one transfer step (one or more layers) between
ranks into staging buffers it owns. It never writes a weight slot: the engine
commits staged experts at the pass the ranks agreed on (invariant 2), so a slot
a peer may still be reading is never overwritten early.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from .plan import LayerPlan


class TransferError(RuntimeError):
    pass


@dataclass
class LayerJob:
    plan: LayerPlan
    weights: list[torch.Tensor]  # this rank's expert tensors of the layer, each (local slots, ...)
    # Message tag of the job's first weight tensor (the i-th travels with tag + i). Unique
    # across the steps in flight, so a step one rank never posted (it failed to start)
    # leaves its peers' messages pending instead of pairing them with a later step's:
    # gloo aborts the process on a size mismatch.
    tag: int = 0


TAG_WEIGHTS = 16  # weight tensors a job may have (tags per job)
TAG_JOBS = 64  # jobs (layers) a step may have


def job_tag(step_seq: int, job_index: int) -> int:
    return ((step_seq % 32768) * TAG_JOBS + job_index) * TAG_WEIGHTS


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


class TransferBackend(ABC):
    name: str = ""

    @abstractmethod
    def start(self, jobs: list[LayerJob], rank: int) -> TransferHandle:
        """Post this rank's sends and receives for the step; return at once."""

    def prepare(self, weights: list[torch.Tensor], max_step_bytes: int) -> None:
        """Called once at start-up with one layer's expert tensors and the most bytes one
        step can move on this rank, so a backend can set up staging before serving starts."""

    def close(self) -> None:  # pragma: no cover - optional
        pass


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
