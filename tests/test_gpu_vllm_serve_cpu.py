"""The real-vLLM serving comparison (benchmarks/gpu_vllm_serve.py) runs its whole path on CPU at
tiny shapes: the topic-skewed model, EPLB off and vllm-eplb under the drifting load, the table,
and the correctness check (float32 greedy outputs against EPLB off while the balancer cycles,
every slot checked after every commit inside the workers). vLLM's own EPLB does not run on CPU;
on GPUs the same command runs it beside these."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_vllm_serve.py")

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def _bench():
    spec = importlib.util.spec_from_file_location("gpu_vllm_serve", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_rebalance_windows_from_log_markers():
    w = _bench().windows_of
    events = [("start", 1.0), ("end", 1.5), ("start", 3.0), ("end", 3.2), ("start", 9.0)]
    assert w(events, "vllm-eplb", 0.01, 4) == [(1.0, 1.5), (3.0, 3.2), (9.0, 9.0)]  # no end yet: the start only
    assert w([("start", 2.0)], "vllm-async", 0.01, 4) == [(2.0, 2.0 + 12 * 0.01)]


def test_the_table_keeps_each_group_size_apart():
    """Rows of EP=2 and EP=4 runs in one file (the colocated table's calls): one table each, and
    an EP=4 row's ratio is taken against the EP=4 'off', never the EP=2 one."""
    from benchmarks.serving.report import report

    def row(ranks, config, tps):
        return {"deployment": "hosts", "config": config, "rep": 0, "ranks": ranks, "device": "cuda", "tokens_per_s": tps,
                "itl_p50_ms": 1.0, "itl_p99_ms": 1.0, "ttft_p99_ms": 1.0, "rebalances": 0, "itl_p99_rebalance_ms": float("nan"),
                "itl_p99_steady_ms": 1.0, "failed": 0, "requests": 1, "balancedness": float("nan"), "cycles": 0,
                "layers_moved": 0}

    text = report([row(2, "off", 800.0), row(4, "off", 100.0), row(2, "vllm-eplb", 400.0), row(4, "vllm-eplb", 50.0)])
    assert "HOSTS=2 + EP" in text and "HOSTS=4 + EP" in text
    ep4 = text[text.index("HOSTS=4"):]
    assert "| vllm-eplb | 50 | 0.500 |" in ep4 and "0.062" not in text


def test_the_comparison_runs_on_cpu(tmp_path):
    """Resident servers (one start-up per configuration, the reps interleaved on them, as the
    colocated GPU table runs): two reps, the second in the rotated order, each run's counters its
    own."""
    out = tmp_path / "runs.jsonl"
    cmd = [sys.executable, SCRIPT, "--device", "cpu", "--smoke", "--deployments", "tp", "--configs", "off,vllm-eplb",
           "--resident", "--reps", "2", "--seconds", "10", "--warmup", "2", "--check-seconds", "10",
           "--model-dir", str(tmp_path / "model"), "--workdir", str(tmp_path / "work"), "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    runs = [x for x in rows if "tokens_per_s" in x and "deployment" in x]
    assert [(x["rep"], x["config"]) for x in runs] == [(0, "off"), (0, "vllm-eplb"), (1, "vllm-eplb"), (1, "off")], runs
    assert all(x["resident"] and x["failed"] == 0 and x["tokens_per_s"] > 0 for x in runs), runs
    # one server per configuration: both reps report its one start-up
    assert len({(x["config"], x["start_s"]) for x in runs}) == 2, runs
    eplb = [x for x in runs if x["config"] == "vllm-eplb"]
    assert sum(x["cycles"] for x in eplb) >= 1 and sum(x["layers_moved"] for x in eplb) >= 1, eplb
    assert sum(x["rebalances"] for x in eplb) >= 1, eplb
    # counters are the run's own: a run's layers moved never exceed what its cycles can commit
    assert all(x["layers_moved"] <= 4 * (x["cycles"] + 1) for x in eplb), eplb
    assert all(0 < x["balancedness"] <= 1 for x in eplb if x["balancedness"] == x["balancedness"]), eplb
    check = next(x for x in rows if x.get("kind") == "correctness")
    # CPU float32: greedy identical, log-probs within the last bits a placement's summation order moves
    assert check["off_repeats"]["share"] == 1.0 and check["within_noise"], check
    assert check["outputs_identical"].split("/")[0] == check["outputs_identical"].split("/")[1], check
    assert check["cycles"] >= 1 and check["slot_checks_ok"] > 0 and check["slot_checks_mismatch"] == 0, check
    assert "| vllm-eplb |" in r.stdout and "correctness" in r.stdout


def test_gpu_servers_capture_graphs_only_up_to_the_runs_clients():
    """On GPU every engine is capped at the run's clients (vLLM captures CUDA graphs up to twice
    max_num_seqs), and engines sharing a GPU size their KV cache in bytes; CPU gets neither."""
    import argparse

    sys.path.insert(0, ROOT)
    from benchmarks.serving.deploy import server_argv

    def argv(device, ranks, gpus, deployment="hosts", **more):
        a = argparse.Namespace(ranks=ranks, gpus=gpus, device=device, clients=16, max_model_len=512,
                               kv_cache_gib=4.0, gpu_memory_utilization=0.8, window=64, interval=128, redundant=2, **more)
        return server_argv(a, "/m", deployment, "vllm-eplb", "/e.json", "bfloat16", None)

    shared = argv("cuda", 2, 1)
    assert shared[shared.index("--max-num-seqs") + 1] == "16"
    assert shared[shared.index("--kv-cache-memory-bytes") + 1] == str(4 * 2**30)
    own = argv("cuda", 2, 2)
    assert "--kv-cache-memory-bytes" not in own and own[own.index("--gpu-memory-utilization") + 1] == "0.8"
    # deployments side by side (gpu_check's three, --resident's), one engine per GPU: they share
    # the GPUs all the same, so each engine's KV cache is sized in bytes
    for deployment in ("hosts", "tp"):
        together = argv("cuda", 2, 2, deployment, side_by_side=True)
        assert together[together.index("--kv-cache-memory-bytes") + 1] == str(4 * 2**30), deployment
    cpu = argv("cpu", 2, 0)
    assert "--max-num-seqs" not in cpu and "--enforce-eager" in cpu and cpu[-2:] == ["--eplb-config", "/e.json"]
