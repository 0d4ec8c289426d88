"""The load window: expert load summed over the last `size` forward passes.

The model's router adds the tokens each physical expert receives into
`pass_load` (layers, physical slots) on every forward pass. Upstream vLLM copies
that buffer into a (window, layers, slots) ring and clears it after every pass;
here the router's own accumulation *is* the window sum: the buffer is cleared
when a window starts and read when it ends `size` passes later, so the sum
covers exactly the `size` passes that end where planning starts (the window
slides with the cycle). A collecting pass costs a counter increment and no
device op; no ring buffer is held (133 MB for DeepSeek-V3 with a 1000-pass window).

Overflow: with an int32 buffer the sum stays exact while size * (tokens per pass)
< 2**31, e.g. a 1000-pass window of 2M tokens per pass; the integration checks this.

On GPU the sum is copied to pinned host memory asynchronously at the window's
end and waited for one pass later, when the copy is long done.
"""

from __future__ import annotations

import torch


class LoadWindow:
    def __init__(self, pass_load: torch.Tensor, size: int, record_flag: torch.Tensor | None = None):
        self.pass_load = pass_load
        self.size = size
        self.filled = 0  # passes summed since the last reset
        # The router records only while this flag is set: outside a window it skips
        # the work entirely.
        self.record_flag = record_flag
        if record_flag is not None:
            record_flag.fill_(False)
        # The window's sum lands here: pinned once, at start-up (pinning host memory
        # stalls the process's CUDA calls, and a window ends while serving).
        self._host = None
        if pass_load.is_cuda:
            self._host = torch.empty(pass_load.shape, dtype=pass_load.dtype, pin_memory=True)

    def reset(self) -> None:
        """Start a new window; what the router recorded before now is dropped."""
        self.pass_load.zero_()
        self.filled = 0
        if self.record_flag is not None:
            self.record_flag.fill_(True)

    def record_pass(self) -> None:
        self.filled += 1

    @property
    def full(self) -> bool:
        return self.filled >= self.size

    def snapshot_to_host(self) -> "HostSnapshot":
        """End the window: stop recording and start copying the sum to host memory
        without blocking the CPU."""
        if self.record_flag is not None:
            self.record_flag.fill_(False)
        if self.pass_load.device.type == "cpu":
            return HostSnapshot(self.pass_load.to(torch.int64, copy=True), None)
        host = self._host
        host.copy_(self.pass_load, non_blocking=True)
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
            # a copy: the pinned buffer is reused by the next window
            return self.tensor.to(torch.int64, copy=True)
        return self.tensor.to(torch.int64)
