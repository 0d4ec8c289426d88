"""Start a real `vllm serve` (TP=2 + EP on CPU) for end-to-end tests, talk to it,
read its /metrics."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

import requests

# Two cores, two workers: each worker one core, threads sleep instead of spinning
# while waiting (otherwise the engine core and the workers starve each other).
CPU_ENV = {
    "VLLM_CPU_OMP_THREADS_BIND": "0|1",
    "OMP_WAIT_POLICY": "PASSIVE",
    "VLLM_CPU_KVCACHE_SPACE": "1",
}


def vllm_bin() -> str:
    exe = os.path.join(os.path.dirname(sys.executable), "vllm")
    return exe if os.path.exists(exe) else shutil.which("vllm")


def serve_cmd(model: str, port: int, eplb_config: str | None, extra: list[str] = (), tp: int = 2) -> list[str]:
    cmd = [
        vllm_bin(),
        "serve",
        model,
        "--port",
        str(port),
        "--tensor-parallel-size",
        str(tp),
        *(["--enable-expert-parallel"] if tp > 1 else []),
        "--dtype",
        "float32",
        "--max-model-len",
        "256",
        "--enforce-eager",
        "--max-num-seqs",
        "8",
    ]
    if eplb_config:
        cmd += ["--eplb-config", eplb_config]
    return cmd + list(extra)


@dataclass
class Server:
    model: str
    port: int
    eplb_config: str | None = None
    log_path: str = ""
    proc: subprocess.Popen | None = None
    extra: list[str] = field(default_factory=list)
    tp: int = 2

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 300) -> "Server":
        env = {**os.environ, **CPU_ENV}
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            serve_cmd(self.model, self.port, self.eplb_config, self.extra, self.tp),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(1)
        self.stop()
        raise TimeoutError(f"vllm serve not healthy after {timeout}s:\n{self.tail()}")

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

    def complete(self, prompt: str, max_tokens: int = 24) -> list[int]:
        r = requests.post(
            self.url + "/v1/completions",
            json={
                "model": self.model,
                "prompt": prompt,
                "max_tokens": max_tokens,
                "temperature": 0,
                "ignore_eos": True,
                "return_token_ids": True,
            },
            timeout=120,
        )
        r.raise_for_status()
        choice = r.json()["choices"][0]
        return choice.get("token_ids") or choice["text"]

    def metrics(self) -> dict[tuple, float]:
        """{(name, frozenset(labels)): value} of the vllm:eplb_* series."""
        text = requests.get(self.url + "/metrics", timeout=10).text
        out = {}
        for line in text.splitlines():
            if not line.startswith("vllm:eplb_"):
                continue
            m = re.match(r"([^{ ]+)(?:\{(.*)\})? (\S+)", line)
            if not m:
                continue
            labels = frozenset(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
            out[(m.group(1), labels)] = float(m.group(3))
        return out


def metric(ms: dict, name: str, **labels) -> float | None:
    want = {(k, str(v)) for k, v in labels.items()}
    for (n, ls), v in ms.items():
        if n == name and want <= set(ls):
            return v
    return None


def write_json(path: str, data: dict) -> str:
    with open(path, "w") as fh:
        json.dump(data, fh)
    return path
