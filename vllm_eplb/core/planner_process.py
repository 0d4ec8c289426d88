"""A one-worker executor whose worker is a child Python process started with subprocess.

Why not multiprocessing / ProcessPoolExecutor: vLLM runs its workers as daemonic
multiprocessing processes, and a daemonic process may not start multiprocessing
children ("daemonic processes are not allowed to have children"). A plain subprocess
is allowed. Calls and results travel pickled over a socket pair wrapped in
multiprocessing.connection.Connection; the child exits when the socket closes, so it
never outlives the serving process.
"""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
from concurrent.futures import Future
from multiprocessing.connection import Connection


class PlannerExited(RuntimeError):
    """The planner process ended (killed, crashed or shut down) before answering."""


class ChildProcessExecutor:
    def __init__(self):
        parent_sock, child_sock = socket.socketpair()
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        self._proc = subprocess.Popen(
            [sys.executable, "-c", f"from vllm_eplb.core.planner_process import child; child({child_sock.fileno()})"],
            pass_fds=(child_sock.fileno(),),
            env=env,
            stdin=subprocess.DEVNULL,
        )
        child_sock.close()
        self._conn = Connection(parent_sock.detach())
        self._lock = threading.Lock()
        self._pending: list[Future] = []  # one worker: results come back in submission order
        self._closed = False
        # Sends go through a thread: a job is ~250 KB (DeepSeek-V3 shape) and the child may
        # be busy, so a send on the caller's (forward) thread could block on a full socket.
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._sender = threading.Thread(target=self._send, name="eplb-planner-sender", daemon=True)
        self._reader = threading.Thread(target=self._read, name="eplb-planner-reader", daemon=True)
        self._sender.start()
        self._reader.start()

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def alive(self) -> bool:
        return not self._closed and self._proc.poll() is None

    def submit(self, fn, *args) -> Future:
        """Queue a call; never blocks."""
        fut: Future = Future()
        with self._lock:
            if self._closed:
                fut.set_exception(PlannerExited("the planner process exited"))
                return fut
            self._pending.append(fut)
        self._outbox.put((fn, args))
        return fut

    def _send(self) -> None:
        while True:
            item = self._outbox.get()
            if item is None:
                return
            try:
                self._conn.send(item)
            except (OSError, ValueError, TypeError):
                # OSError/ValueError: the socket closed; TypeError: shutdown() closed the
                # connection between its closed-check and the write (its handle became None).
                # Either way the reader sees the socket end and fails what is pending.
                return

    def _read(self) -> None:
        while True:
            try:
                ok, value = self._conn.recv()
            except (EOFError, OSError, TypeError):
                break  # TypeError: shutdown() closed the connection under a blocked read
            with self._lock:
                fut = self._pending.pop(0)
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(value)
        with self._lock:
            self._closed = True
            for fut in self._pending:
                if not fut.done():
                    fut.set_exception(PlannerExited(f"the planner process exited (pid {self._proc.pid})"))
            self._pending.clear()

    def shutdown(self, wait: bool = False, cancel_futures: bool = True) -> None:
        """Stop the child now; never waits on the caller's thread longer than a kill."""
        with self._lock:
            self._closed = True
        self._outbox.put(None)
        # end the socket for both threads first (a blocked read returns EOF, a send fails with
        # OSError), then close it: closing alone races a thread inside send/recv
        try:
            with socket.socket(fileno=os.dup(self._conn.fileno())) as dup:
                dup.shutdown(socket.SHUT_RDWR)
        except (OSError, ValueError):
            pass
        try:
            self._conn.close()
        except OSError:
            pass
        self._proc.kill()
        if wait:
            self._proc.wait(5)
        else:
            # reap it off the caller's thread, so no zombie is left behind
            threading.Thread(target=self._proc.wait, name="eplb-planner-reap", daemon=True).start()


def child(fd: int) -> None:
    """The child's loop: run each call, send back its result or exception."""
    # Ctrl-C reaches the whole process group; the child ends when its parent closes the
    # socket, not on a signal meant for the server (which would print a traceback here).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    conn = Connection(fd)
    while True:
        try:
            fn, args = conn.recv()
        except (EOFError, OSError):
            return  # the serving process closed the socket or died
        try:
            result = (True, fn(*args))
        except BaseException as exc:  # sent back and raised by the caller's Future
            result = (False, exc)
        try:
            conn.send(result)
        except (EOFError, OSError):
            return

