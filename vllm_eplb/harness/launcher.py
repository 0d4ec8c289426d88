"""Start N processes joined by a gloo process group, run one function in each, and
collect what each returns. The rig's one launcher: the toy-MoE harness and the fault
matrix, the tests' multi-rank runs, tick_overhead.py. (gpu_rebalance.py still starts its
own ranks: they pin a GPU before the group is made and save after every run, so the runs
done survive a deadline.)

A rank that raises reports its traceback; a rank that hangs past the deadline is
killed and named; a rank that dies without a report is named with its exit code.
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, outdir: str, fn: Callable, args: tuple) -> None:
    result: Any = None
    error = ""
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        result = fn(rank, world, *args)
    except BaseException:
        error = traceback.format_exc()
    finally:
        with open(os.path.join(outdir, f"rank{rank}.pkl"), "wb") as fh:
            pickle.dump((result, error), fh)
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
            p.join(max(1.0, deadline - time.monotonic()))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
        if hung:
            raise TimeoutError(f"ranks {hung} did not finish within {timeout_s:g} s")
        results, errors = [], []
        for r in range(world):
            path = os.path.join(outdir, f"rank{r}.pkl")
            if not os.path.exists(path):
                raise RankFailed(f"rank {r} died without a report (exit code {procs[r].exitcode})")
            with open(path, "rb") as fh:
                result, error = pickle.load(fh)
            if error:
                errors.append(f"rank {r}:\n{error}")
            results.append(result)
        if errors:
            raise RankFailed("\n".join(errors))
        return results
