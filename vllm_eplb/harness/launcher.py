"""Start N processes joined by a gloo process group, run one function in each, and
collect what each returns. The rig's one launcher: the harness and the fault matrix, the
tests' multi-rank runs, the demo, and every multi-rank benchmark (gpu_rebalance.py,
tick_overhead.py). A rank function that needs a GPU pins it first thing (the default
group is gloo: nothing of it lives on a device).

A rank that raises reports its traceback; a rank that dies without a report is named
with its exit code; a rank still running at the deadline is killed and named
(`TimedOut`), with what every rank last handed `checkpoint`: a long run reports the work
its ranks finished.
"""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
import time
import traceback
from typing import Any, Callable

import torch.distributed as dist
import torch.multiprocessing as mp


class RankFailed(RuntimeError):
    pass


class TimedOut(TimeoutError):
    """Ranks `hung` were still running at the deadline and were killed. `partial`: per
    rank, what it last passed to `checkpoint` (its result if it finished), or None."""

    def __init__(self, message: str, hung: list[int], partial: list):
        super().__init__(message)
        self.hung, self.partial = hung, partial


_report_path: str | None = None  # this rank's report file (set in the rank's process)


def _write(path: str, result: Any, error: str) -> None:
    with open(path + ".tmp", "wb") as fh:
        pickle.dump((result, error), fh)
    os.replace(path + ".tmp", path)  # a reader never sees half a file


def checkpoint(result: Any) -> None:
    """In a launched rank: what it has done so far, reported if it is killed at the deadline."""
    if _report_path is None:
        raise RuntimeError("checkpoint() is for a rank that launch() started")
    _write(_report_path, result, "")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, outdir: str, fn: Callable, args: tuple) -> None:
    global _report_path
    _report_path = os.path.join(outdir, f"rank{rank}.pkl")
    result: Any = None
    error = ""
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        result = fn(rank, world, *args)
    except BaseException:
        error = traceback.format_exc()
    finally:
        _write(_report_path, result, error)
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                pass


def launch(fn: Callable, world: int, args: tuple = (), timeout_s: float = 600) -> list:
    """Run fn(rank, world, *args) in `world` spawned processes; return their results in rank order.
    `fn` and `args` must be picklable (module-level function, plain data)."""
    with tempfile.TemporaryDirectory() as outdir:
        ctx = mp.get_context("spawn")
        port = free_port()
        procs = [ctx.Process(target=_entry, args=(r, world, port, outdir, fn, args)) for r in range(world)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout_s
        for p in procs:
            while p.is_alive() and time.monotonic() < deadline:
                # in slices: a wait longer than the OS's poll limit raises OverflowError
                p.join(min(max(1.0, deadline - time.monotonic()), 3600.0))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
        if hung:
            for p in procs:
                p.join(10)
            partial = [_read(os.path.join(outdir, f"rank{r}.pkl"))[0] for r in range(world)]
            raise TimedOut(f"ranks {hung} did not finish within {timeout_s:g} s", hung, partial)
        results, errors = [], []
        for r in range(world):
            path = os.path.join(outdir, f"rank{r}.pkl")
            if not os.path.exists(path):
                raise RankFailed(f"rank {r} died without a report (exit code {procs[r].exitcode})")
            result, error = _read(path)
            if error:
                errors.append(f"rank {r}:\n{error}")
            results.append(result)
        if errors:
            raise RankFailed("\n".join(errors))
        return results


def _read(path: str) -> tuple[Any, str]:
    if not os.path.exists(path):
        return None, ""
    with open(path, "rb") as fh:
        return pickle.load(fh)
