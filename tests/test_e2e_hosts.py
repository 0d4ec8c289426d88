"""Two hosts, one expert-parallel group, end to end on CPU: vLLM's multi-node data-parallel
launch with both "hosts" on this machine (`vllm serve ... --data-parallel-size 2
--data-parallel-size-local 1 ...` as the front end, the same with `--headless
--data-parallel-start-rank 1`), each its own process tree and metrics directory, as on two
machines. The deployment the GPU check runs on one H200 (benchmarks/gpu_check.py).

What one host sees, the operator sees for all: the front end's /metrics (and `vllm-eplb
status`) shows the headless host's rank, relayed by rank 0 over the expert-parallel group
(integration/metrics_relay.py), and its figures are the front rank's: the same cycles,
layers committed and slot checks, no clock mismatch, every slot holding the expert its map
names."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time

import pytest

from vllm_eplb.integration.server import Hosts, metric, vllm_bin
from vllm_eplb.integration.tiny_model import WORDS, build

pytestmark = pytest.mark.vllm

EPLB = {"window_size": 16, "step_interval": 128, "num_redundant_experts": 2, "agreement_lag": 2,
        "improvement_threshold": 0.0, "verify_slots": True}


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    d = tmp_path_factory.mktemp("hosts")
    model = build(str(d / "model"))
    cfg = d / "eplb.json"
    cfg.write_text(json.dumps(EPLB))
    argv = [vllm_bin(), "serve", model, "--tensor-parallel-size", "1", "--enable-expert-parallel", "--dtype", "float32",
            "--max-model-len", "512", "--enforce-eager", "--eplb-config", str(cfg)]
    cores = os.cpu_count() or 1
    h = Hosts(model, argv, hosts=2, port=8291,
              rpc_port=13291, log_dir=str(d), env_of=lambda i: {"VLLM_CPU_OMP_THREADS_BIND": str(i % cores)})
    h.start(600)
    yield h
    h.stop()


def _load(front, seconds: float) -> int:
    done, stop = [0], time.monotonic() + seconds

    def client(seed):
        rng = random.Random(seed)
        while time.monotonic() < stop:
            front.complete(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))), max_tokens=rng.randint(8, 40))
            done[0] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return done[0]


def _settled(ms) -> bool:
    """Rank 1's relayed figures are newer than rank 0's last transition."""
    relayed = metric(ms, "vllm:eplb_relayed_pass", rank=1)
    state = next((dict(ls)["state"] for (n, ls), v in ms.items() if n == "vllm:eplb_state" and v == 1 and ("rank", "0") in ls), None)
    entered = metric(ms, "vllm:eplb_state_entered_pass", rank=0, state=state) if state else None
    return relayed is not None and entered is not None and relayed > entered + 2 and state in ("idle", "collecting")


def test_front_end_shows_every_host_rank_with_the_same_figures(hosts):
    front = hosts.front
    assert _load(front, 30) > 0
    deadline, ms = time.monotonic() + 120, front.metrics()
    while not (_settled(ms) and (metric(ms, "vllm:eplb_cycles_total", rank=0, outcome="completed") or 0) >= 1):
        assert time.monotonic() < deadline, {k: v for k, v in ms.items() if "relayed" in k[0] or "cycles" in k[0]}
        front.complete("the model of the expert", max_tokens=40)  # 40 passes: the relay's next gathers
        ms = front.metrics()
    for name, labels in (("vllm:eplb_cycles_total", {"outcome": "completed"}), ("vllm:eplb_committed_layers_total", {}),
                         ("vllm:eplb_slot_checks_total", {"result": "ok"}), ("vllm:eplb_enabled", {})):
        r0, r1 = metric(ms, name, rank=0, **labels), metric(ms, name, rank=1, **labels)
        assert r0 is not None and r0 == r1, (name, r0, r1)
    assert metric(ms, "vllm:eplb_cycles_total", rank=1, outcome="completed") >= 1
    assert (metric(ms, "vllm:eplb_slot_checks_total", rank=1, result="mismatch") or 0) == 0
    assert metric(ms, "vllm:eplb_relayed_pass", rank=0) is None  # rank 0 writes its own
    for server in hosts.servers:  # both hosts' logs: no drift of the pass clock, no missed-tick alarm
        log = open(server.log_path).read()
        assert "clock_mismatch" not in log and "ticked out of step" not in log, server.log_path
        assert "Traceback" not in log, server.failure()

    out = subprocess.run([sys.executable, "-m", "vllm_eplb.tools.status", front.url, "--once"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "rank 0 " in out.stdout and "rank 1 " in out.stdout and "another host: relayed by rank 0" in out.stdout, out.stdout
