"""Sliding window of per-pass expert load.

The model's router adds the tokens each physical expert received in the current
forward pass into `pass_load` (layers, physical slots). Once per pass the window
moves that into a ring buffer of the last `size` passes and clears it. The sum
over the ring is what the planner sees.

Only two cheap device ops per pass (copy + zero), no host sync: on GPU the window
lives on the device and is copied to host memory asynchronously at the window's end.
"""

from __future__ import annotations

import torch


class LoadWindow:
    def __init__(self, pass_load: torch.Tensor, size: int):
        self.pass_load = pass_load
        self.size = size
        self._ring = torch.zeros((size, *pass_load.shape), dtype=torch.int64, device=pass_load.device)
        self._next = 0
        self.filled = 0  # passes recorded since the last reset, capped at size

    def reset(self) -> None:
        """Forget everything, including what the router recorded since the last pass."""
        self._ring.zero_()
        self.pass_load.zero_()
        self._next = 0
        self.filled = 0

    def record_pass(self) -> None:
        self._ring[self._next].copy_(self.pass_load)
        self.pass_load.zero_()
        self._next = (self._next + 1) % self.size
        self.filled = min(self.filled + 1, self.size)

    def discard_pass(self) -> None:
        """Clear what the router recorded without keeping it (load outside a collection)."""
        self.pass_load.zero_()

    @property
    def full(self) -> bool:
        return self.filled >= self.size

    def snapshot_to_host(self) -> "HostSnapshot":
        """Start copying the window's sum to host memory without blocking the CPU."""
        total = self._ring.sum(dim=0)
        if total.device.type == "cpu":
            return HostSnapshot(total, None)
        host = torch.empty(total.shape, dtype=total.dtype, pin_memory=True)
        host.copy_(total, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return HostSnapshot(host, event)


class HostSnapshot:
    """A host tensor that is valid once `ready()` (an async device->host copy may be in flight)."""

    def __init__(self, tensor: torch.Tensor, event):
        self.tensor = tensor
        self._event = event

    def ready(self) -> bool:
        return self._event is None or self._event.query()

    def wait(self) -> torch.Tensor:
        if self._event is not None:
            self._event.synchronize()
        return self.tensor
