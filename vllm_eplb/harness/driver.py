"""The runner's side of the balancer's contract, written once for every rig that drives a
balancer without vLLM (the harness, the benchmarks, the tests):

    driver = Driver()
    driver.balancer = Balancer(..., clock=driver.clock(model.pass_counter))
    for p in range(passes):
        with driver.forward_pass():
            model.forward(batch)        # the pass: its first MoE layer advances the layers' count

`forward_pass()` does what vLLM's model runner does around a pass (integration/runner_state.py
in vLLM): `catch_up()` before it (what a missed tick decided is in force before this pass
runs), the runner's pass count advanced as the pass starts (`prepare_forward`'s place), and
`tick()` after it. A pass whose body raises is not ticked.

The time spent in `catch_up()` and `tick()` is read with `perf_counter_ns` right around those
calls, and nothing else of the driver's runs between the two readings: `spent_ns` is the
balancer's own cost per pass (benchmarks/tick_overhead.py reports it), and a pass timed around
the `with` pays no more than the context's entry and exit.

What a fault double or a baseline changes is said per pass: `counted` (a forward path that
bypasses the runner's count), `ticks` (a driver that ticks more or less than once),
`before_tick` (upstream's stop-the-world rebalance, timed as part of the step, as vLLM runs it
in its EPLB step), `profile` (torch profiler ranges `eplb.catch_up` and `eplb.tick`).
"""

from __future__ import annotations

from functools import partial
from time import perf_counter_ns
from typing import Callable

from vllm_eplb.core import Balancer, PassClock
from vllm_eplb.core.pass_clock import ForwardCounter


class RunnerCount:
    """Forward passes this rank's driver started: the runner's count of the pass clock."""

    def __init__(self):
        self.count = 0

    def __call__(self) -> int:
        return self.count


def _step(tick: Callable[[], None], n: int, work: Callable[[], None] | None) -> None:
    if work is not None:
        work()
    for _ in range(n):
        tick()


def _ranged(fn: Callable[[], None], name: str) -> Callable[[], None]:
    import torch

    def call() -> None:
        with torch.profiler.record_function(name):
            fn()

    return call


class Driver:
    """One rank's driver: its runner count, its balancer (set once built: the balancer's clock
    reads the count), and one forward pass at a time (`with driver.forward_pass(): ...`)."""

    def __init__(self, balancer: Balancer | None = None):
        self.runner = RunnerCount()
        self.balancer = balancer
        self.spent_ns = 0  # the last pass's catch_up() + tick() (and before_tick work), in ns
        self._counted: Callable[[], bool] | None = None
        self._ticks: Callable[[], int] | None = None
        self._work: Callable[[], None] | None = None
        self._profile = False

    def clock(self, first_layer: ForwardCounter | None = None) -> PassClock:
        """The pass clock the balancer is built with: this driver's count, and the count of the
        model's first MoE layer runs (`first_layer`) where the model keeps one."""
        return PassClock(self.runner, first_layer)

    def forward_pass(
        self,
        *,
        counted: Callable[[], bool] | None = None,
        ticks: Callable[[], int] | None = None,
        profile: bool = False,
    ) -> Driver:
        """The context of one forward pass. counted: asked after catch_up(), False for a pass
        the runner does not count; ticks: asked after the pass, how many times to tick (1)."""
        self._counted, self._ticks, self._work, self._profile = counted, ticks, None, profile
        return self

    def before_tick(self, work: Callable[[], None]) -> None:
        """Inside the pass: `work` runs right before this pass's tick, timed with it."""
        self._work = work

    def __enter__(self) -> Driver:
        b = self.balancer
        catch_up = _ranged(b.catch_up, "eplb.catch_up") if self._profile else b.catch_up
        t0 = perf_counter_ns()
        catch_up()
        self.spent_ns = perf_counter_ns() - t0
        b.window.note_routed_pass()  # the rigs' passes route real tokens
        if self._counted is None or self._counted():
            self.runner.count += 1  # the pass starts
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            return False
        n = 1 if self._ticks is None else self._ticks()
        step = self.balancer.tick
        if n != 1 or self._work is not None or self._profile:
            step = partial(_step, step, n, self._work)
            if self._profile:
                step = _ranged(step, "eplb.tick")
        t0 = perf_counter_ns()
        step()
        self.spent_ns += perf_counter_ns() - t0
        return False
