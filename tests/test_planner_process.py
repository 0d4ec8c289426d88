"""The planner child process: shutting it down while a job is being sent or read is quiet."""

import threading
import time

import numpy as np

from vllm_eplb.core.planner_process import ChildProcessExecutor, PlannerExited


def test_shutdown_racing_a_send_raises_nothing_in_the_threads(monkeypatch):
    """shutdown() used to close the connection under the sender's write (or the reader's read):
    the thread died with "TypeError: 'NoneType' object cannot be interpreted as an integer"."""
    errors = []
    monkeypatch.setattr(threading, "excepthook", lambda args: errors.append(repr(args.exc_value)))
    job = np.zeros(200_000)  # 1.6 MB: a send that is still under way when shutdown() comes
    futures = []
    for i in range(12):
        ex = ChildProcessExecutor()
        futures += [ex.submit(np.sum, job) for _ in range(4)]
        time.sleep(0.001 * (i % 4))
        ex.shutdown()
    time.sleep(0.5)
    assert errors == []
    for fut in futures:  # every job either ran or failed as the planner exiting
        exc = fut.exception(timeout=5)
        assert exc is None or isinstance(exc, PlannerExited), exc
