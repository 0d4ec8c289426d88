"""The load: closed-loop clients streaming completions from topic `phase(t)` of the run, every
chunk timed on the client; the rebalance markers of the server log, timed as they appear; the
probes (fixed prompts, greedy) that check outputs."""

from __future__ import annotations

import http.client
import json
import random
import re
import threading
import time
from dataclasses import dataclass, field

from vllm_eplb.harness.server import http_post

from .model import topic_range

MARKERS = {  # (start, end) of a rebalance in the server log, rank 0
    "vllm-eplb": (re.compile(r"EPLB rank 0 pass \d+: syncing -> transferring"), re.compile(r"EPLB rank 0 pass \d+: transferring -> idle")),
    "vllm": (re.compile(r"Rearranging experts (sync|\(async)"), re.compile(r"Rearranged experts\s+in")),
}


@dataclass
class Request:
    start: float
    first: float = 0.0
    times: list[float] = field(default_factory=list)  # arrival of each streamed chunk
    tokens: int = 0  # a chunk can carry several tokens (the server batches what it has)
    error: str = ""


def stream_completion(port: int, model: str, prompt: list[int], max_tokens: int, timeout: float = 300) -> Request:
    """One streamed completion; every chunk's arrival time on the client. Inter-token latency
    is counted per chunk, as vLLM's own serving benchmark does."""
    req = Request(time.monotonic())
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                       "stream": True, "return_token_ids": True}).encode()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        r = conn.getresponse()
        if r.status != 200:
            req.error = f"HTTP {r.status}: {r.read()[:200]!r}"
            return req
        for line in r:
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            t = time.monotonic()
            chunk = json.loads(line[6:])
            choice = (chunk.get("choices") or [{}])[0]
            n = len(choice.get("token_ids") or []) or (1 if choice.get("text") else 0)
            if n:
                req.times.append(t)
                req.tokens += n
        conn.close()
        req.first = req.times[0] if req.times else 0.0
        if req.tokens < max_tokens:
            req.error = f"{req.tokens} of {max_tokens} tokens"
    except Exception as exc:  # counted as a failed request
        req.error = f"{type(exc).__name__}: {exc}"
    return req


class Load:
    """`clients` closed-loop clients; prompts from topic `phase(t)` of the run."""

    def __init__(self, port: int, model: str, a, vocab: int, seconds: float):
        self.port, self.model, self.a, self.vocab, self.seconds = port, model, a, vocab, seconds
        self.requests: list[Request] = []
        self.lock = threading.Lock()

    def _client(self, i: int, t0: float) -> None:
        rng = random.Random(self.a.seed * 1000 + i)
        while (now := time.monotonic()) < t0 + self.seconds:
            phase = int((now - t0) / self.seconds * self.a.phases) % self.a.groups
            lo, hi = topic_range(self.vocab, self.a.groups, phase)
            prompt = [rng.randrange(lo, hi) for _ in range(rng.randint(self.a.prompt_len // 2, self.a.prompt_len))]
            r = stream_completion(self.port, self.model, prompt, self.a.max_tokens)
            with self.lock:
                self.requests.append(r)

    def run(self) -> tuple[float, float]:
        t0 = time.monotonic()
        threads = [threading.Thread(target=self._client, args=(i, t0), daemon=True) for i in range(self.a.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return t0, time.monotonic()


class LogWatch:
    """Timestamps rebalance markers as they appear in the server log (polled every 10 ms)."""

    def __init__(self, path: str, kind: str):
        self.path, (self.start_re, self.end_re) = path, MARKERS[kind]
        self.events: list[tuple[str, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        pos = 0
        while not self._stop.is_set():
            try:
                with open(self.path) as fh:
                    fh.seek(pos)
                    chunk = fh.read()
                    pos = fh.tell()
            except OSError:
                chunk = ""
            now = time.monotonic()
            for line in chunk.splitlines():
                if self.start_re.search(line):
                    self.events.append(("start", now))
                elif self.end_re.search(line):
                    self.events.append(("end", now))
            time.sleep(0.01)

    def stop(self) -> list[tuple[str, float]]:
        self._stop.set()
        self._thread.join(2)
        return self.events


# --------------------------------------------------------------------------- one run


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q / 100 * len(xs)))]


def windows_of(events, kind: str, steady_itl: float, layers: int) -> list[tuple[float, float]]:
    """(start, end) of each rebalance; vLLM's async worker logs no end: num_layers + 8 passes."""
    starts = [t for what, t in events if what == "start"]
    if kind == "vllm-async":
        return [(t, t + (layers + 8) * steady_itl) for t in starts]
    ends = [t for what, t in events if what == "end"]
    return [(b, next((e for e in ends if e >= b), b)) for b in starts]
