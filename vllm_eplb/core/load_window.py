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

The balance each pass sees (core/pass_balance.py) needs each pass's load per rank,
which the window's sum has lost. So on up to PASS_SAMPLES passes spread evenly over the
window (every ceil(size / PASS_SAMPLES)-th pass) the tick sums `pass_load` per rank into
a small device ring before and after that pass, one reduction on the device, no host
sync; at the window's end one subtraction gives those passes' (passes, layers, ranks)
load, which travels with the window's sum in the same all-reduce. 128 passes of
DeepSeek-V3 (58 layers) on 64 ranks are 1.9 MB of int32 on the device and 3.8 MB in the
int64 all-reduce, once per window.
"""

from __future__ import annotations

import numpy as np
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


PASS_SAMPLES = 128  # passes of a window whose per-rank load is kept (spread evenly)


class PassSampler:
    """Per-rank load of the sampled passes of a window (module docstring).

    Sample j is pass (j + 1) * stride of the window: the cumulative per-rank load is
    taken after the pass before it and after it. Row 0 of the ring is the window's
    start (zero); with a stride of 1 consecutive samples share their rows."""

    def __init__(self, pass_load: torch.Tensor, size: int, ranks: int):
        self.layers, slots = pass_load.shape
        self.ranks = ranks
        self.stride = -(-size // PASS_SAMPLES)
        self.samples = size // self.stride
        fills = sorted({0} | {f for j in range(1, self.samples + 1) for f in (j * self.stride - 1, j * self.stride)})
        self._row = {f: i for i, f in enumerate(fills)}  # window passes done -> ring row
        self._after = torch.tensor([self._row[j * self.stride] for j in range(1, self.samples + 1)], device=pass_load.device)
        self._before = torch.tensor([self._row[j * self.stride - 1] for j in range(1, self.samples + 1)], device=pass_load.device)
        self._view = pass_load.view(self.layers, ranks, slots // ranks)
        self.ring = torch.zeros((len(fills), self.layers, ranks), dtype=pass_load.dtype, device=pass_load.device)
        self.taken = self.samples  # samples inside the current window (a shorter one takes fewer)
        self._last = self.taken * self.stride
        # on the CPU a sample's sum goes through numpy views of the same memory: about 3 us
        # against torch.sum's 15 us of dispatch for tensors this small (on GPU: one kernel launch)
        self._np = (self._view.numpy(), self.ring.numpy()) if pass_load.device.type == "cpu" else None
        self._host = None
        if pass_load.is_cuda:
            self._host = torch.empty((self.samples, self.layers, ranks), dtype=pass_load.dtype, pin_memory=True)

    def reset(self, size: int | None = None) -> None:
        """A new window of `size` passes (None: the full size): samples past its end are not
        taken (size 0: none, for a window whose per-pass load nobody reads)."""
        self.ring[0].zero_()
        self.taken = self.samples if size is None else min(self.samples, size // self.stride)
        self._last = self.taken * self.stride  # the last pass a sample reads

    def after(self, filled: int) -> None:
        """The window's `filled`-th pass ran: keep the per-rank sum if a sample needs it (only
        the passes on either side of a sample pay it)."""
        row = self._row.get(filled)
        if row is None or filled > self._last:
            return
        if self._np is not None:
            view, ring = self._np
            np.add.reduce(view, axis=-1, out=ring[row])
        else:
            torch.sum(self._view, dim=-1, out=self.ring[row])

    def per_pass(self) -> torch.Tensor:
        """(samples, layers, ranks) this rank's load of each sampled pass: on the CPU, or
        being copied into pinned host memory (valid once the window's copy event is done)."""
        diff = self.ring.index_select(0, self._after) - self.ring.index_select(0, self._before)
        if self.taken < self.samples:  # a shorter window: the rows past its end hold no pass of it
            diff[self.taken:].zero_()
        if self._host is None:
            return diff.to(torch.int64)
        self._host.copy_(diff, non_blocking=True)
        return self._host


class LoadWindow:
    def __init__(
        self, pass_load: torch.Tensor, size: int, record_flag: torch.Tensor | None = None, max_pass_tokens: int = 0,
        ranks: int = 1,
    ):
        limit = torch.iinfo(pass_load.dtype).max if not pass_load.dtype.is_floating_point else None
        if limit is not None and max_pass_tokens and size * max_pass_tokens > limit:
            raise ValueError(
                f"window_size {size} x {max_pass_tokens} expert-token loads per pass can exceed the "
                f"{pass_load.dtype} load counters ({limit}); lower window_size to at most {limit // max_pass_tokens}"
            )
        self.pass_load = pass_load
        self.size = size
        self.target = size  # passes of the current window: size, or fewer for a load-triggered cycle
        self.filled = 0  # passes summed since the last reset
        # Passes since the last reset that routed tokens while the router recorded (the runner
        # says so as each pass starts: `note_routed_pass`). A window that had such passes on
        # some rank and no load on any is a model whose MoE layers do not report (plan_rounds).
        self.routed = 0
        # The router records only while this flag is set: outside a window it skips
        # the work entirely.
        self.gate = RecordGate(record_flag)
        # The window's sum lands here: pinned once, at start-up (pinning host memory
        # stalls the process's CUDA calls, and a window ends while serving).
        self._host = None
        if pass_load.is_cuda:
            self._host = torch.empty(pass_load.shape, dtype=pass_load.dtype, pin_memory=True)
        self.sampler = PassSampler(pass_load, size, ranks)
        self.per_pass = True  # this window keeps its sampled passes' per-rank load

    def expect(self, passes: int | None = None) -> None:
        """The windows from the next reset on are `passes` passes long (None: `size`). A
        load-triggered cycle collects fewer: the trigger's watch windows make up the rest of its
        load (core/load_trigger.py, `Carried`). Pass arithmetic only: it cannot fail, so every
        rank's window ends at the same pass even where a reset failed."""
        self.target = self.size if passes is None else max(1, min(self.size, passes))

    def reset(self, per_pass: bool = True) -> None:
        """Start a new window (of `target` passes); what the router recorded before now is dropped.
        per_pass False: no pass is sampled (the load trigger's watch windows are judged on their
        summed load only)."""
        self.pass_load.zero_()
        self.sampler.reset(self.target if per_pass else 0)
        self.per_pass = per_pass
        self.filled = 0
        self.routed = 0
        self.gate.set_window(True)

    def reset_watch(self) -> None:
        """Start a watch window of the load trigger (core/load_trigger.py): summed load only."""
        self.reset(per_pass=False)

    def note_routed_pass(self) -> None:
        """The pass starting now routes real tokens through the MoE layers (the runner calls
        this before the pass; a dummy pass's tokens are not real): counted if the router
        records it."""
        if self.gate.recording:
            self.routed += 1

    def record_pass(self) -> None:
        self.filled += 1
        self.sampler.after(self.filled)

    @property
    def full(self) -> bool:
        return self.filled >= self.target

    def snapshot_to_host(self) -> "HostSnapshot":
        """End the window: stop recording and start copying the sum to host memory
        without blocking the CPU."""
        self.gate.set_window(False)
        per_pass = self.sampler.per_pass() if self.per_pass else None
        if self.pass_load.device.type == "cpu":
            return HostSnapshot(self.pass_load.to(torch.int64, copy=True), per_pass, None, self.routed)
        host = self._host
        host.copy_(self.pass_load, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return HostSnapshot(host, per_pass, event, self.routed)


class HostSnapshot:
    """Host tensors that are valid once `ready()` (async device->host copies may be in
    flight): the window's load (layers, slots) and its sampled passes' per-rank load;
    `routed`: the window's passes that routed real tokens while recording (LoadWindow.routed)."""

    def __init__(self, tensor: torch.Tensor, per_pass: torch.Tensor | None, event, routed: int = 0):
        self.tensor = tensor
        self.per_pass = per_pass
        self._event = event
        self.routed = routed

    def ready(self) -> bool:
        return self._event is None or self._event.query()

    def wait(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(window load, per-pass load: None for a window that samples none), int64."""
        copy = self._event is not None  # the pinned buffers are reused by the next window
        if copy:
            self._event.synchronize()
        per_pass = None if self.per_pass is None else self.per_pass.to(torch.int64, copy=copy)
        return self.tensor.to(torch.int64, copy=copy), per_pass
