"""Record the /metrics texts in this folder from real `vllm serve` runs (TP=2 + EP on CPU,
the tiny Qwen3-MoE), for tests/test_status.py and tests/test_dashboard.py:

  metrics_transferring.txt, metrics_idle.txt   the example plug-in policy (round-robin,
                                               moves every cycle): caught while moving a
                                               layer, then idle after two completed cycles
  metrics_stalled.txt                          a plug-in policy whose every plan fails

    VLLM_CPU_OMP_THREADS_BIND='0|1' OMP_WAIT_POLICY=PASSIVE .venv/bin/python tests/data/status/record.py

The plug-ins are put on PYTHONPATH as installed distributions (module + .dist-info), so
nothing is pip-installed."""

from __future__ import annotations

import json
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
sys.path.insert(0, str(ROOT))

from vllm_eplb.harness.server import Server, http_get, metric, parse_metrics  # noqa: E402
from vllm_eplb.harness.tiny_model import WORDS, build  # noqa: E402

FAILING = '''from vllm_eplb.core.policies import Policy


class AlwaysFails(Policy):
    """Every plan raises: each cycle ends in an abort (planner_error)."""

    def place(self, inp):
        raise RuntimeError("this policy never plans")
'''


def plugin(tmp: Path, name: str, module: str, source: str, target: str) -> str:
    tmp.mkdir(parents=True)
    (tmp / f"{module}.py").write_text(source)
    info = tmp / f"{module}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[vllm_eplb.policies]\n{name} = {target}\n")
    return str(tmp)


def load(server: Server, stop: threading.Event, clients: int = 6) -> list[threading.Thread]:
    def run(seed):
        rng = random.Random(seed)
        while not stop.is_set():
            try:
                server.complete(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))), max_tokens=rng.randint(8, 40))
            except Exception:  # the server stopping under a request
                return

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    return threads


def record_until(server: Server, path: Path, done, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = http_get(server.url + "/metrics")
        if done(parse_metrics(text, "vllm:eplb_")):
            path.write_text(text)
            print(f"wrote {path.name}", flush=True)
            return
        time.sleep(0.1)
    raise SystemExit(f"{path.name}: not seen within {timeout:.0f} s")


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="eplb-record-"))
    model = build(str(work / "model"))
    runs = [
        ("round-robin", plugin(work / "rr", "round-robin", "eplb_round_robin",
                               (ROOT / "examples" / "round_robin_policy" / "eplb_round_robin.py").read_text(),
                               "eplb_round_robin:RoundRobinPolicy"),
         {"window_size": 40, "step_interval": 80, "num_redundant_experts": 4, "agreement_lag": 4, "improvement_threshold": 0.0},
         [("metrics_transferring.txt", lambda ms: metric(ms, "vllm:eplb_state", rank=0, state="transferring") == 1
           and metric(ms, "vllm:eplb_state", rank=1, state="transferring") == 1
           and (metric(ms, "vllm:eplb_cycles_total", rank=0, outcome="completed") or 0) >= 1),
          ("metrics_idle.txt", lambda ms: metric(ms, "vllm:eplb_state", rank=0, state="idle") == 1
           and metric(ms, "vllm:eplb_state", rank=1, state="idle") == 1
           and (metric(ms, "vllm:eplb_cycles_total", rank=0, outcome="completed") or 0) >= 2)]),
        ("always-fails", plugin(work / "af", "always-fails", "always_fails", FAILING, "always_fails:AlwaysFails"),
         {"window_size": 10, "step_interval": 20, "num_redundant_experts": 4, "agreement_lag": 2},
         [("metrics_stalled.txt", lambda ms: metric(ms, "vllm:eplb_stalled", rank=0) == 1
           and metric(ms, "vllm:eplb_stalled", rank=1) == 1)]),
    ]
    for i, (policy, path, cfg, targets) in enumerate(runs):
        (work / f"eplb-{i}.json").write_text(json.dumps({"policy": policy, **cfg}))
        with Server(model, 8360 + i, str(work / f"eplb-{i}.json"), log_path=str(work / f"serve-{i}.log"),
                    env={"PYTHONPATH": f"{path}:{ROOT}"}) as s:
            stop = threading.Event()
            threads = load(s, stop)
            try:
                for name, done in targets:
                    record_until(s, HERE / name, done)
            finally:
                stop.set()
                for t in threads:
                    t.join(120)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
