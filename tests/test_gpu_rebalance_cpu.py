"""The GPU rebalance benchmark runs on CPU (gloo, tiny shapes): its correctness checks
catch a wrong slot, its timed runs pass them, and its table has one row per strategy
with median and range over interleaved runs. The stall/steady windows are checked on a
synthetic run."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_rebalance.py")


def _bench():
    spec = importlib.util.spec_from_file_location("gpu_rebalance", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class _Args:
    skip, tail, big_layer_mb = 2, 2, 256


def _run(times, states, committed, checked_after, window_end, live):
    return {"times": times, "ticks": [0.0] * len(times), "states": states, "committed": committed,
            "checked_after": checked_after, "window_end": window_end, "live": live,
            "steps": [{"bytes_received": 300 << 20, "device_s": 0.001, "staging": 1}],
            "mismatch": {"slots": 0, "maps": 0, "outputs": 0, "checks": 1}, "completed": 1, "skipped": {},
            "aborted": {}, "observed": [], "agreement_late": 0}


def test_windows_on_a_synthetic_run():
    bench = _bench()
    n, we, live = 30, 12, 20
    t = [0.010] * n
    t[5] = 0.050  # pass 6: right after a check at pass 5, not steady
    t[we] = 0.030  # pass 13: planning, one pass after the window's end (first use of a group): stall
    t[15] = 0.012  # pass 16: a committing pass
    for i in range(live + _Args.tail, n):
        t[i] = 0.009  # balanced placement afterwards
    committed = [i + 1 == 16 for i in range(n)]
    run = _run(t, ["idle"] * n, committed, [5], we, live)
    f = bench.run_figures([run, run], _Args, {"all": 400.0})
    assert f["steady_p99"] == pytest.approx(10.0)  # the check's spike is excluded
    assert f["stall_max"] == pytest.approx(30.0)  # the pass after the window's end counts
    assert f["stall_passes"] == live + _Args.tail - we + 1
    assert f["passes_to_live"] == live - we
    assert f["commit_cost_ms"] == pytest.approx(2.0)
    assert f["after_p50"] == pytest.approx(9.0)
    assert f["payoff_passes"] == pytest.approx(f["extra_ms"] / 1.0)
    assert f["peer_frac"] == pytest.approx(300 * 2**20 / 1e6 / 400.0, rel=1e-6)


def test_cpu_run_checks_and_table(tmp_path):
    out = tmp_path / "out.json"
    cmd = [sys.executable, SCRIPT, "--device", "cpu", "--tiny", "--reps", "2", "--strategies", "stop-the-world,gloo",
           "--warmup", "8", "--window", "8", "--skip", "3", "--tail", "2", "--after-passes", "6", "--planner", "thread", "--fault", "--deadline", "100",
           "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=110, cwd=ROOT)
    text = proc.stdout + proc.stderr
    # the fault (one slot corrupted on rank 0 in each checked run) is caught, and fails the command
    assert proc.returncode != 0 and "correctness checks failed" in text, text
    data = json.loads(out.read_text())
    per_run = data["per_run"]
    checked = [f for f in per_run if f["mode"] == "checked"]
    timed = [f for f in per_run if f["mode"] == "timed"]
    assert [f["name"] for f in checked] == ["stop-the-world", "gloo"]
    assert all(f["checks"]["slots"] > 0 for f in checked)
    # timed runs: interleaved (rotated order), every check passes, one rebalance each
    assert [f["name"] for f in timed] == ["stop-the-world", "gloo", "gloo", "stop-the-world"]
    for f in timed:
        assert f["ok"] and f["checks"]["checks"] >= 2 and f["checks"]["slots"] == f["checks"]["maps"] == f["checks"]["outputs"] == 0
        assert f["completed"] == 1 and not f["aborted"]
    gloo = [f for f in timed if f["name"] == "gloo"]
    assert all(f["passes_to_live"] > 0 and f["commit_passes"] >= 1 for f in gloo)
    # the table: one row per strategy, medians with ranges
    rows = data["rows"]
    assert [r["strategy"] for r in rows] == ["stop-the-world", "gloo"]
    assert all(r["runs"] == 2 for r in rows)
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + 2  # header + one row per strategy, no duplicates
    assert all("FAIL" in line for line in table[1:])
    assert "CPU (gloo)" in proc.stdout and "median [min-max]" in proc.stdout
    assert np.isfinite(rows[1]["p99_ratio"][0])
