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
< 2**31, e.g. a 1000-pass window of 2M tokens per pass. Given the most tokens one
pass can route (vLLM: max_num_batched_tokens * top_k), the constructor refuses a
window that could wrap.

On GPU the sum is copied to pinned host memory asynchronously at the window's
end and waited for one pass later, when the copy is long done.
"""

from __future__ import annotations

import torch


class RecordGate:
    """The router's record flag: on while a window is open and no dummy pass runs.

    Two owners set it: the window (open/closed) and the runner (dummy passes, whose
    made-up tokens are no load). Each keeps its own bit, so neither can undo the other:
    a tick inside a dummy pass that opens or closes the window is not reverted when the
    dummy pass ends. The flag tensor is written only when its value changes."""

    def __init__(self, flag: torch.Tensor | None):
        self.flag = flag
        self.window_open = False
        self.suppressed = 0  # dummy passes in progress
        self._value: bool | None = None
        self._apply()

    def set_window(self, open_: bool) -> None:
        self.window_open = open_
        self._apply()

    def suppress(self) -> None:
        self.suppressed += 1
        self._apply()

    def release(self) -> None:
        self.suppressed = max(0, self.suppressed - 1)
        self._apply()

    @property
    def recording(self) -> bool:
        return self.window_open and not self.suppressed

    def _apply(self) -> None:
        v = self.recording
        if self.flag is not None and v != self._value:
            self.flag.fill_(v)
        self._value = v


class LoadWindow:
    def __init__(self, pass_load: torch.Tensor, size: int, record_flag: torch.Tensor | None = None, max_pass_tokens: int = 0):
        limit = torch.iinfo(pass_load.dtype).max if not pass_load.dtype.is_floating_point else None
        if limit is not None and max_pass_tokens and size * max_pass_tokens > limit:
            raise ValueError(
                f"window_size {size} x {max_pass_tokens} expert-token loads per pass can exceed the "
                f"{pass_load.dtype} load counters ({limit}); lower window_size to at most {limit // max_pass_tokens}"
            )
        self.pass_load = pass_load
        self.size = size
        self.filled = 0  # passes summed since the last reset
        # The router records only while this flag is set: outside a window it skips
        # the work entirely.
        self.gate = RecordGate(record_flag)
        # The window's sum lands here: pinned once, at start-up (pinning host memory
        # stalls the process's CUDA calls, and a window ends while serving).
        self._host = None
        if pass_load.is_cuda:
            self._host = torch.empty(pass_load.shape, dtype=pass_load.dtype, pin_memory=True)

    def reset(self) -> None:
        """Start a new window; what the router recorded before now is dropped."""
        self.pass_load.zero_()
        self.filled = 0
        self.gate.set_window(True)

    def record_pass(self) -> None:
        self.filled += 1

    @property
    def full(self) -> bool:
        return self.filled >= self.size

    def snapshot_to_host(self) -> "HostSnapshot":
        """End the window: stop recording and start copying the sum to host memory
        without blocking the CPU."""
        self.gate.set_window(False)
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
