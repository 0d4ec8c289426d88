"""Every rank's balancer figures on the front end's /metrics, whichever host the rank runs on.

A worker's `vllm:eplb_*` series reach /metrics through prometheus_client's multiprocess
directory of its own host (metrics.py). In a multi-node deployment (vLLM's data-parallel
launch: a front end and `--headless` hosts) the headless hosts serve no /metrics at all, so
their ranks would be invisible. The relay closes that gap over the expert-parallel group the
balancer already has:

- every `EVERY` passes, at the same pass numbers on every rank, every rank posts a
  non-blocking gloo all-gather (a group of its own) of a snapshot of its figures: the
  balancer's stats (histories cut to their newest entries), state, pass, and where its own
  series go (host name and metrics directory);
- EP rank 0 (always on the front end: vLLM's data-parallel rank 0 is the front's) reads a
  finished gather at a later pass and writes, through the same metric families, the series
  of every rank whose series do not reach its /metrics on their own (another host, or another
  metrics directory), with `vllm:eplb_relayed_pass{rank}` saying how fresh they are.

Nothing waits: a gather still running is looked at again at the next pass (a slow moment of a
loaded host only delays the figures). Posts stop, on the ranks that see it, when a gather fails
(a peer gone: gloo ends it after the group's timeout, `agreement_timeout_s`) or the gathers in
flight would hold more than MAX_PENDING_BYTES, and serving goes on. A rank posts once for every multiple of `EVERY` its pass count crosses, so
all ranks post the same gathers in the same order even when a tick was missed. Relayed
figures lag the rank's own by at most 2 x EVERY passes of serving.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import pickle
import socket
import struct
from typing import Callable

import torch
import torch.distributed as dist

log = logging.getLogger("vllm.eplb")

EVERY = 16  # passes between gathers
MAX_PENDING_BYTES = 64 << 20  # gathers in flight hold SIZE x world bytes each: at most this much
SIZE = 32768  # bytes per rank and gather: a snapshot is a few KB
KEEP = 32  # newest entries of each history a snapshot carries


def identity() -> tuple[str, str]:
    """Where this process's series go: its host and its metrics directory. Ranks with the
    same identity as rank 0 reach rank 0's /metrics on their own."""
    return socket.gethostname(), os.path.realpath(os.environ.get("PROMETHEUS_MULTIPROC_DIR", "") or "-")


def _newest(d: collections.deque) -> collections.deque:
    return collections.deque(reversed(list(itertools.islice(reversed(d), KEEP))), maxlen=d.maxlen)


def _cut_histories(stats):
    """A copy of the stats whose histories hold their newest KEEP entries (the totals say how
    many are new); O(KEEP) per history, whatever its length."""
    import copy

    out = copy.copy(stats)
    for name, value in vars(stats).items():
        if isinstance(value, collections.deque):
            setattr(out, name, _newest(value))
    return out


def pack(snapshot: dict) -> torch.Tensor:
    """A snapshot as SIZE bytes: its length, then its pickle. One too large loses its
    histories first, then its free-text fields."""
    data = pickle.dumps(snapshot)
    if len(data) + 4 > SIZE:
        stats = snapshot["stats"]
        for name, value in vars(stats).items():
            if isinstance(value, collections.deque):
                setattr(stats, name, collections.deque(maxlen=value.maxlen))
        snapshot["disabled_reason"] = snapshot["disabled_reason"][:200]
        data = pickle.dumps(snapshot)
    if len(data) + 4 > SIZE:
        raise ValueError(f"a metrics snapshot of {len(data)} bytes does not fit the relay's {SIZE}")
    buf = torch.zeros(SIZE, dtype=torch.uint8)
    buf[: 4 + len(data)] = torch.frombuffer(bytearray(struct.pack("<I", len(data)) + data), dtype=torch.uint8)
    return buf


def unpack(buf: torch.Tensor) -> dict | None:
    raw = buf.numpy().tobytes()
    (n,) = struct.unpack("<I", raw[:4])
    return pickle.loads(raw[4 : 4 + n]) if n else None


class MetricsRelay:
    """One rank's side of the relay (module docstring). `snapshot()` gives this rank's
    figures; on rank 0, `apply(rank, snapshot)` writes another rank's."""

    def __init__(self, rank: int, world: int, group, snapshot: Callable[[], dict], apply: Callable[[int, dict], None]):
        self.rank, self.world, self.group = rank, world, group
        self._snapshot, self._apply = snapshot, apply
        self._posted = 0  # gathers posted: one per multiple of EVERY the pass count crossed
        self._pending: collections.deque = collections.deque()  # (work, outputs), oldest first
        self.stopped = ""  # why this rank stopped relaying, if it did
        self.applied = 0  # snapshots of other ranks written here (rank 0)

    def step(self, pass_no: int) -> None:
        """After a pass: read finished gathers, post the ones due. Never raises, never waits."""
        if self.stopped:
            return
        try:
            self._read_finished()
            due = pass_no // EVERY
            while self._posted < due and not self.stopped:
                self._posted += 1
                self._post()
        except Exception as exc:  # a bug or a broken group: relaying stops, serving goes on
            self._stop(f"{type(exc).__name__}: {exc}")

    def _read_finished(self) -> None:
        while self._pending and self._pending[0][0].is_completed():
            work, outputs = self._pending.popleft()
            work.wait()  # finished: returns at once, or raises what failed it
            if self.rank != 0:
                continue
            for r, buf in enumerate(outputs):
                snap = unpack(buf) if r != self.rank else None
                if snap is not None:
                    self._apply(r, snap)
                    self.applied += 1

    def _post(self) -> None:
        if len(self._pending) >= max(4, MAX_PENDING_BYTES // (SIZE * self.world)):
            return self._stop(f"{len(self._pending)} gathers unfinished (a rank stopped serving or relaying)")
        buf = pack(self._snapshot())
        outputs = [torch.empty_like(buf) for _ in range(self.world)]
        self._pending.append((dist.all_gather(outputs, buf, group=self.group, async_op=True), outputs))

    def _stop(self, why: str) -> None:
        self.stopped = why
        self._pending.clear()
        log.warning("vllm-eplb: rank %d stopped relaying balancer metrics to the front end's /metrics: %s "
                    "(ranks of other hosts stay there as last relayed; vllm:eplb_relayed_pass says when)", self.rank, why)
