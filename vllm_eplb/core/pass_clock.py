"""The pass clock: which forward pass a rank is at, counted twice so neither count can drift.

Transitions are scheduled by pass number, so every rank of the expert-parallel group must
number the same forward pass alike. Two counts exist on every rank:

- the runner's count: forward passes the runner started, counted where it starts them
  (vLLM: `prepare_forward` and `dummy_pass`; the harness and benchmarks: at the start of
  their pass). A forward path that bypasses that place is missed.
- the MoE layers' count (`ForwardCounter`): how many times the model's first balanced MoE
  layer ran, advanced in place by that layer's router (a one-element tensor on the model's
  device, `add_(1)`). Every rank of the EP group runs every MoE layer in every pass, real or
  dummy, because the layer's expert-parallel collectives pair the ranks; so this count is
  the same on every rank at the same pass by construction, whichever runner path ran the
  pass. As a device op it is also recorded into CUDA graphs and advances on every replay,
  where no Python runs.

Where the counter lives in host memory (CPU serving, the harness) it is read at once, and
it is the schedule: no runner path can run the MoE layers without being counted. On a GPU
it can only be read after the device finished the pass (reading it sooner would stall the
forward loop), so there the runner's count is the schedule and the counter checks it, one
vote late. Either way every vote carries `offset()`: runner count x layer runs per pass -
layer runs, a constant on a rank whose two counts agree (the same constant on every rank).
A rank on which one count missed or added a pass carries another value from its next vote
on, every rank reads the difference in the same round, and rebalancing stops there
(`clock_mismatch`).
"""

from __future__ import annotations

from typing import Callable

import torch


class ForwardCounter:
    """Runs of the model's first balanced MoE layer: a one-element int64 tensor on the
    model's device that the layer's router advances (`advance()`) every time it runs."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.tensor = torch.zeros(1, dtype=torch.int64, device=device)
        # on the host, read through a numpy view of the same memory: a fraction of .item()'s
        # cost, and the clock is read twice a pass
        self._host = self.tensor.numpy() if self.on_host else None

    def advance(self) -> None:
        self.tensor.add_(1)

    @property
    def on_host(self) -> bool:
        return self.tensor.device.type == "cpu"

    def read(self) -> int:
        """The count now (on a GPU: after the device finished every op queued so far)."""
        return int(self._host[0]) if self._host is not None else int(self.tensor.item())

    # ---- for routers that cannot be handed the counter: they hand in their layer's load view
    _watched: dict[int, "ForwardCounter"] = {}

    def watch(self, first_layer_load: torch.Tensor) -> None:
        """Advance this counter whenever `advance_if_first_layer` sees `first_layer_load`
        (the first balanced layer's row of the load buffer, which its router writes)."""
        ForwardCounter._watched[first_layer_load.data_ptr()] = self

    def unwatch(self) -> None:
        for ptr in [p for p, c in ForwardCounter._watched.items() if c is self]:
            del ForwardCounter._watched[ptr]


def advance_if_first_layer(expert_load_view: torch.Tensor) -> None:
    """Called by a router with its layer's load view: one layer run counted if it is the
    first balanced layer of a watched model. A dict lookup on the other layers."""
    counter = ForwardCounter._watched.get(expert_load_view.data_ptr())
    if counter is not None:
        counter.advance()


class _DeviceSnapshot:
    """The counter copied to pinned host memory behind the work queued so far."""

    def __init__(self, counter: ForwardCounter):
        self._counter = counter
        self._host = torch.zeros(1, dtype=torch.int64, pin_memory=True)
        self._event = torch.cuda.Event()
        self.runner_runs = 0  # runner count x layer runs per pass when it was taken

    def take(self, runner_runs: int) -> None:
        self._host.copy_(self._counter.tensor, non_blocking=True)
        self._event.record()
        self.runner_runs = runner_runs

    def offset(self) -> int:
        self._event.synchronize()  # queued passes ago: long done unless the device lags badly
        return self.runner_runs - int(self._host[0])


class PassClock:
    """One rank's pass clock (see the module docstring).

    runner: the runner's count of forward passes started (counted at each pass's start,
    after the balancer's `catch_up()`). layers: the model's ForwardCounter, or None where
    the model's router cannot advance one (the runner's count is then unchecked).
    layer_runs_per_pass: runs of the first layer per pass (micro-batches run it once each)."""

    def __init__(
        self, runner: Callable[[], int], layers: ForwardCounter | None = None, layer_runs_per_pass: int = 1
    ):
        self._runner = runner
        self._layers = layers
        self._per_pass = layer_runs_per_pass
        self._snapshots: list[_DeviceSnapshot] = []
        self._pending: _DeviceSnapshot | None = None
        self.now = runner  # the runner's count schedules, unless:
        if layers is None:
            self.source = "runner"  # unchecked
        elif layers.on_host:
            self.source = "moe_layers"  # the schedule; the runner's count checks it
            self.now = self._layer_passes
        else:
            self.source = "runner, checked by the moe_layers counter"
            self._snapshots = [_DeviceSnapshot(layers), _DeviceSnapshot(layers)]
            self._last = runner() * layer_runs_per_pass - layers.read()  # at start-up: a sync is fine

    now: Callable[[], int]
    """Forward passes run or started on this rank: the pass the schedule is at (read twice a
    pass, so the choice of count is made once, here)."""

    def _layer_passes(self) -> int:
        return self._layers.read() // self._per_pass

    def offset(self) -> int:
        """What a vote carries: runner count x layer runs per pass - layer runs, a constant
        while both counts agree (0 from start-up). With the counter on a device, the value
        as of the previous call (its copy is queued behind that call's passes); each call
        queues the next copy."""
        if self._layers is None:
            return 0
        if not self._snapshots:
            return self._runner() * self._per_pass - self._layers.read()
        if self._pending is not None:
            self._last = self._pending.offset()
        snap = self._snapshots[0] if self._pending is not self._snapshots[0] else self._snapshots[1]
        snap.take(self._runner() * self._per_pass)
        self._pending = snap
        return self._last
