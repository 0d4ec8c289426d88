"""Run `vllm serve` as a child process and talk to it: used by the serve demo, the
end-to-end tests and the serving benchmark."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from vllm_eplb.integration.config import ENV_VAR as CONFIG_ENV_VAR

# Two workers on a small CPU box: one core each (VLLM_CPU_OMP_THREADS_BIND), and
# threads that sleep instead of spinning while they wait (OMP_WAIT_POLICY): with
# spinning, the engine core and the workers starve each other (measured: 26 ms per
# decode pass spinning, 15 ms passive, on 2 cores). The operator's own values win.
CPU_ENV = {
    "VLLM_CPU_OMP_THREADS_BIND": "0|1",
    "OMP_WAIT_POLICY": "PASSIVE",
    "VLLM_CPU_KVCACHE_SPACE": "1",
}


def cpu_env() -> dict[str, str]:
    return {k: os.environ.get(k, v) for k, v in CPU_ENV.items()}


def vllm_bin() -> str:
    exe = os.path.join(os.path.dirname(sys.executable), "vllm")
    return exe if os.path.exists(exe) else (shutil.which("vllm") or "vllm")


def serve_cmd(model: str, port: int, eplb_config: str | None = None, extra=(), tp: int = 2, max_model_len: int = 512) -> list[str]:
    cmd = [vllm_bin(), "serve", model, "--port", str(port), "--tensor-parallel-size", str(tp)]
    if tp > 1:
        cmd.append("--enable-expert-parallel")
    cmd += ["--dtype", "float32", "--max-model-len", str(max_model_len), "--enforce-eager"]
    if eplb_config:
        cmd += ["--eplb-config", eplb_config]
    return cmd + list(extra)


def http_get(url: str, timeout: float = 10) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def http_post(url: str, body: dict, timeout: float = 180) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def parse_metrics(text: str, prefix: str = "vllm:") -> dict[tuple, float]:
    """{(name, frozenset of (label, value)): value} for the series starting with prefix."""
    out = {}
    for line in text.splitlines():
        if not line.startswith(prefix):
            continue
        m = re.match(r"([^{ ]+)(?:\{(.*)\})? (\S+)", line)
        if m:
            labels = frozenset(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
            out[(m.group(1), labels)] = float(m.group(3))
    return out


def metric(ms: dict, name: str, **labels) -> float | None:
    want = {(k, str(v)) for k, v in labels.items()}
    for (n, ls), v in ms.items():
        if n == name and want <= set(ls):
            return v
    return None


# a Python exception line ("ValueError: ...", "torch.OutOfMemoryError: ...") or vLLM's
# "ERROR" log level: where a failed start's root cause is
ERROR_LINE = re.compile(r"(^|\s)([\w.]*(Error|Exception)|ERROR)\b[:\s]")


@dataclass
class Server:
    model: str
    port: int
    eplb_config: str | None = None
    log_path: str = "serve.log"
    tp: int = 2
    extra: list[str] = field(default_factory=list)
    launcher: list[str] | None = None  # instead of `vllm serve MODEL` (e.g. the api_server module)
    env: dict[str, str] = field(default_factory=dict)  # on top of os.environ and cpu_env()
    argv: list[str] | None = None  # the whole command, instead of serve_cmd's (the GPU benchmark's)
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def cmd(self) -> list[str]:
        if self.argv is not None:
            return self.argv
        cmd = serve_cmd(self.model, self.port, self.eplb_config, self.extra, self.tp)
        return (self.launcher + cmd[3:]) if self.launcher else cmd

    def launch(self) -> None:
        """Start the process; `start` also waits until it serves."""
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            self.cmd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            # a config published in this process (a test, a notebook) must not reach a server
            # started with its own flags: the server publishes what its --eplb-config says
            env={**{k: v for k, v in os.environ.items() if k != CONFIG_ENV_VAR}, **cpu_env(), **self.env},
            start_new_session=True,
        )

    def start(self, timeout: float = 300, companions: list["Server"] = ()) -> "Server":
        """Launch and wait for /health. `companions`: processes already launched that this
        server needs (the headless hosts of a multi-host deployment): one that exits fails
        the start with its log."""
        self.launch()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for c in (self, *companions):
                if c.proc.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"vllm serve ({c.log_path}) exited with {c.proc.returncode}:\n{c.failure()}")
            try:
                http_get(self.url + "/health", 2)
                return self
            except OSError:
                time.sleep(1)
        self.stop()
        raise TimeoutError(f"vllm serve not healthy after {timeout}s:\n{self.failure()}")

    def failure(self) -> str:
        """The log's first error lines, then its tail: a failed engine core prints its root
        cause well above the tail, which holds the API server's traceback saying only
        "See root cause above"."""
        try:
            with open(self.log_path) as fh:
                lines = fh.readlines()
        except OSError:
            return ""
        causes = [ln for ln in lines if ERROR_LINE.search(ln) and "See root cause above" not in ln]
        head = "".join(causes[:8])
        return (f"first error lines:\n{head}last lines:\n" if head else "") + "".join(lines[-40:])

    def tail(self, n: int = 40) -> str:
        try:
            with open(self.log_path) as fh:
                return "".join(fh.readlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        if getattr(self, "_log", None):
            self._log.close()

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def complete(self, prompt: str, max_tokens: int = 24, ignore_eos: bool = True) -> list[int]:
        """Greedy completion; returns the generated token ids."""
        body = {
            "model": self.model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": ignore_eos,
            "return_token_ids": True,
        }
        choice = http_post(self.url + "/v1/completions", body)["choices"][0]
        return choice.get("token_ids") or choice["text"]

    def metrics(self, prefix: str = "vllm:eplb_") -> dict[tuple, float]:
        return parse_metrics(http_get(self.url + "/metrics"), prefix)


# --------------------------------------------------------------------------- several hosts


def dp_host_args(hosts: int, host: int, rpc_port: int, address: str = "127.0.0.1") -> list[str]:
    """vLLM's multi-node data-parallel launch, one engine per host: host 0 is the front end
    (API server, DP coordinator), the others run `--headless` and join it."""
    args = ["--data-parallel-size", str(hosts), "--data-parallel-size-local", "1",
            "--data-parallel-address", address, "--data-parallel-rpc-port", str(rpc_port)]
    return args + (["--headless", "--data-parallel-start-rank", str(host)] if host else [])


@dataclass
class Hosts:
    """N `vllm serve` processes on this machine as the N hosts of one data-parallel +
    expert-parallel deployment (one engine each). `argv`: the serve command of `model`
    without port or data-parallel flags; `env_of(host)`: what each host's process gets on top (on one GPU:
    the same device and a `NCCL_HOSTID` of its own, so NCCL takes the engines for hosts).
    `servers[0]` is the front end: requests and /metrics go to it."""

    model: str
    argv: list[str]
    hosts: int
    port: int
    rpc_port: int
    log_dir: str
    env_of: object = None  # Callable[[int], dict[str, str]]
    tag: str = "host"
    servers: list[Server] = field(default_factory=list)

    def __post_init__(self):
        for h in range(self.hosts):
            argv = self.argv + dp_host_args(self.hosts, h, self.rpc_port) + (["--port", str(self.port)] if h == 0 else [])
            env = dict(self.env_of(h)) if self.env_of else {}
            log = os.path.join(self.log_dir, f"{self.tag}{h}.log")
            self.servers.append(Server(self.model, self.port, log_path=log, argv=argv, env=env))

    @property
    def front(self) -> Server:
        return self.servers[0]

    @property
    def url(self) -> str:
        return self.front.url

    @property
    def log_path(self) -> str:
        """The front end's log: EP rank 0's balancer logs there."""
        return self.front.log_path

    def metrics(self, prefix: str = "vllm:eplb_") -> dict[tuple, float]:
        return self.front.metrics(prefix)

    def complete(self, prompt: str, max_tokens: int = 24, ignore_eos: bool = True) -> list[int]:
        return self.front.complete(prompt, max_tokens, ignore_eos)

    def start(self, timeout: float = 600) -> "Hosts":
        for s in self.servers[1:]:
            s.launch()
        try:
            self.front.start(timeout, companions=self.servers[1:])
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for s in self.servers:
            s.stop()

    def failure(self) -> str:
        return "\n".join(f"== {s.log_path}\n{s.failure()}" for s in self.servers)

    def __enter__(self) -> "Hosts":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class Load:
    """Concurrent clients sending random prompts of the tiny models' words until stopped;
    every failed request is kept in `errors`."""

    def __init__(self, server: Server, clients: int = 8):
        self.server, self.stop_flag, self.errors, self.done = server, threading.Event(), [], 0
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]

    def _run(self, seed: int) -> None:
        from .tiny_model import WORDS

        rng = random.Random(seed)
        while not self.stop_flag.is_set():
            prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))
            try:
                self.server.complete(prompt, max_tokens=rng.randint(8, 40))
                self.done += 1
            except Exception as exc:  # recorded, asserted on
                self.errors.append(exc)

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def stop(self) -> None:
        self.stop_flag.set()
        for t in self.threads:
            if t.is_alive():
                t.join(120)
