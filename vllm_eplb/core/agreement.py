"""Cross-rank agreement without stalling the forward loop (DESIGN invariant 1).

A *round* is a non-blocking all-reduce over a gloo CPU group, posted by every
rank at the same forward-pass number and read a fixed number of passes later
(`lag`). By then it has long completed; if not, the reader waits and the wait is
counted. Because every rank posts at the same pass and reads the same reduced
value at the same pass, any decision taken from a round's result is taken at the
same pass on every rank, from values every rank has seen.

Votes are packed into one int64 vector reduced with MIN:
  all(x)  -> min(x)
  any(x)  -> 1 - min(1 - x)
  x is equal on every rank -> min(x) == -min(-x)

If a round cannot complete within the group's timeout, gloo fails it on every
rank that posted it (the pairs are torn down), so no rank can read success while
another gave up. The group is then unusable: the balancer ends the cycle and
stops rebalancing on that rank (see balancer.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist


class AgreementError(RuntimeError):
    """A round failed or timed out: a peer is gone or stuck."""


@dataclass
class WaitStats:
    rounds: int = 0
    late_rounds: int = 0  # result not there when read: the forward loop waited
    wait_seconds_total: float = 0.0
    wait_seconds_max: float = 0.0
    samples: list[float] = field(default_factory=list)

    def record(self, seconds: float, late: bool) -> None:
        self.rounds += 1
        if late:
            self.late_rounds += 1
        self.wait_seconds_total += seconds
        self.wait_seconds_max = max(self.wait_seconds_max, seconds)
        if len(self.samples) < 100_000:
            self.samples.append(seconds)


class Round:
    def __init__(self, tensor: torch.Tensor, work, posted_at: int, due_at: int, stats: WaitStats):
        self.tensor = tensor
        self._work = work
        self.posted_at = posted_at
        self.due_at = due_at
        self._stats = stats
        self._value: torch.Tensor | None = None

    def result(self) -> torch.Tensor:
        """The reduced tensor. Waits (measured) if the collective is still in flight;
        raises AgreementError if it failed or timed out."""
        if self._value is not None:
            return self._value
        late = self._work is not None and not self._work.is_completed()
        t0 = time.perf_counter()
        try:
            if self._work is not None:
                self._work.wait()
        except Exception as exc:  # gloo raises RuntimeError subclasses on timeout / peer loss
            self._stats.record(time.perf_counter() - t0, True)
            raise AgreementError(f"agreement round posted at pass {self.posted_at} failed: {exc}") from exc
        self._stats.record(time.perf_counter() - t0, late)
        self._value = self.tensor
        return self._value


class Agreement:
    """Posts rounds on a gloo group. `group=None` with world size 1 runs locally."""

    def __init__(self, group, world_size: int, lag: int):
        self.group = group
        self.world_size = world_size
        self.lag = lag
        self.stats = WaitStats()

    def post(self, values, pass_no: int, op=dist.ReduceOp.MIN) -> Round:
        tensor = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=torch.int64)
        work = None
        if self.world_size > 1:
            work = dist.all_reduce(tensor, op=op, group=self.group, async_op=True)
        return Round(tensor, work, pass_no, pass_no + self.lag, self.stats)


# Helpers to build and read MIN-reduced vote vectors.
def vote_all(flag: bool) -> int:
    return 1 if flag else 0


def vote_any(flag: bool) -> int:
    return 0 if flag else 1  # min over ranks is 0 iff some rank said yes


def read_any(value: int) -> bool:
    return int(value) == 0


def vote_equal(x: int) -> list[int]:
    return [x, -x]


def read_equal(pair) -> bool:
    lo, neg_hi = int(pair[0]), int(pair[1])
    return lo == -neg_hi


def new_gloo_group(ranks: list[int], timeout_s: float):
    """A dedicated gloo group; must be called by every process of the default group."""
    return dist.new_group(ranks=ranks, backend="gloo", timeout=timedelta(seconds=timeout_s))
