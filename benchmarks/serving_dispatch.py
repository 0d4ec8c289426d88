"""Replica dispatch in real serving: hash (upstream's) vs balanced, side by side in one run,
on `vllm serve` TP=2 + EP on CPU with the tiny Qwen3-MoE (its routers skewed towards a few
hot experts per layer), the balancer rebalancing every `--interval` passes.

    python benchmarks/serving_dispatch.py [--rounds 3] [--repeats 2]

Servers alternate hash, balanced, hash, balanced, ... (`--repeats` of each, `--order`), with the same
eplb.json but for "replica_dispatch". Each sends the same requests (fixed prompts, greedy,
fixed length, `--concurrency` at a time) for `--rounds` rounds while /metrics is scraped
every 0.1 s. Per server, over the windows measured after its first completed cycle (the
placement planned, with replicas of the hot experts):

  pass bal.    vllm:eplb_balancedness{kind="pass"}: mean over a window's sampled passes of
               each pass's mean/max tokens per rank (median over windows)
  window bal.  vllm:eplb_balancedness{kind="observed"}: the same window's summed load
  straggler    vllm:eplb_straggler_share: the cost model's share of MoE time lost per pass
  pass ms      wall time per forward pass over the rounds (vllm:eplb_pass)
  tokens/s     generated tokens per second (median over rounds)
and whether its greedy outputs equal the first server's (float32: they must).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from vllm_eplb.harness.server import Server, metric  # noqa: E402
from vllm_eplb.harness.tiny_model import WORDS, build  # noqa: E402
from vllm_eplb.kernels.replica_dispatch import DISPATCHES  # noqa: E402


class Scraper:
    """Scrapes /metrics in a thread: per window (keyed by the pass planning was entered
    at), its figures once the window's load was read, and cycles completed by then."""

    def __init__(self, server: Server, every: float = 0.1):
        self.server, self.every = server, every
        self.windows: dict[float, dict] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                ms = self.server.metrics()
            except Exception:  # a scrape racing the server's start or stop
                time.sleep(self.every)
                continue
            at = metric(ms, "vllm:eplb_state_entered_pass", rank=0, state="planning")
            figs = {k: metric(ms, "vllm:eplb_balancedness", rank=0, kind=k) for k in ("pass", "observed")}
            figs["straggler"] = metric(ms, "vllm:eplb_straggler_share", rank=0)
            figs["completed"] = metric(ms, "vllm:eplb_cycles_total", rank=0, outcome="completed") or 0
            if at is not None and None not in figs.values():
                w = self.windows.setdefault(at, {})
                if "pass" not in w or w["pass"] != figs["pass"]:
                    w.update(figs)
            time.sleep(self.every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(10)

    def planned_windows(self) -> list[dict]:
        """Windows measured on a planned placement: after the first completed cycle."""
        return [w for _, w in sorted(self.windows.items()) if w["completed"] >= 1]


def run_round(server: Server, prompts: list[str], max_tokens: int, concurrency: int) -> tuple[float, list[str]]:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        outs = list(pool.map(lambda p: server.complete(p, max_tokens=max_tokens), prompts))
    return sum(len(o) for o in outs) / (time.perf_counter() - t0), outs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--window", type=int, default=40)
    ap.add_argument("--interval", type=int, default=80)
    ap.add_argument("--order", default=",".join(DISPATCHES), help="dispatches in the order each repeat serves them")
    ap.add_argument("--port", type=int, default=8340)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="eplb-dispatch-")
    model = args.model or build(os.path.join(work, "tiny-moe"))
    prompts = [" ".join(WORDS[(i * 13 + j) % len(WORDS)] for j in range(8 + i % 8)) for i in range(args.requests)]
    rows, reference = [], None
    order = [d for d in args.order.split(",") if d]
    if sorted(order) != sorted(DISPATCHES):
        ap.error(f"--order must name each of {', '.join(DISPATCHES)} once")
    for i in range(args.repeats * len(order)):
        dispatch = order[i % len(order)]
        cfg = os.path.join(work, f"eplb-{i}.json")
        with open(cfg, "w") as fh:
            json.dump({"window_size": args.window, "step_interval": args.interval, "num_redundant_experts": 4,
                       "agreement_lag": 4, "improvement_threshold": 0.0, "policy": "deepseek",
                       "replica_dispatch": dispatch}, fh)
        with Server(model, args.port + i, cfg, log_path=os.path.join(work, f"serve-{i}.log")) as s, Scraper(s) as sc:
            run_round(s, prompts[: args.concurrency], 8, args.concurrency)  # warm-up
            m0, t0 = s.metrics(), time.perf_counter()
            rates, outs = [], None
            for _ in range(args.rounds):
                rate, outs = run_round(s, prompts, args.max_tokens, args.concurrency)
                rates.append(rate)
            m1, t1 = s.metrics(), time.perf_counter()
            time.sleep(2 * sc.every)  # the last window's figures
        passes = metric(m1, "vllm:eplb_pass", rank=0) - metric(m0, "vllm:eplb_pass", rank=0)
        windows = sc.planned_windows()
        same = reference is None or outs == reference
        reference = reference or outs
        rows.append({"dispatch": dispatch, "windows": windows, "pass_ms": (t1 - t0) / passes * 1e3, "rates": rates,
                     "same": same})
        print(f"  {dispatch}: {len(windows)} windows, {', '.join(f'{r:.0f}' for r in rates)} tokens/s", flush=True)

    def med(ws, key):
        return statistics.median(w[key] for w in ws) if ws else float("nan")

    print(f"\nvllm serve TP=2+EP on CPU ({os.cpu_count()} cores), tiny Qwen3-MoE (skewed routers), 16 experts + 4 redundant, "
          f"policy deepseek, window {args.window} every {args.interval} passes; {args.requests} requests x {args.max_tokens} "
          f"tokens, {args.concurrency} concurrent, {args.rounds} rounds per server")
    print("| dispatch | windows | pass bal. | window bal. | straggler | pass ms | tokens/s | outputs = first server |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        ws = r["windows"]
        print(f"| {r['dispatch']} | {len(ws)} | {med(ws, 'pass'):.3f} | {med(ws, 'observed'):.3f} | {med(ws, 'straggler'):.1%} | "
              f"{r['pass_ms']:.2f} | {statistics.median(r['rates']):.0f} [{min(r['rates']):.0f}-{max(r['rates']):.0f}] | "
              f"{'yes' if r['same'] else 'NO'} |")
    print("medians over windows measured after each server's first completed cycle; tokens/s: median [min-max] over rounds")
    return 0 if all(r["same"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
