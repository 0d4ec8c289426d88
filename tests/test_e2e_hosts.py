"""Two hosts, one expert-parallel group, end to end on CPU: the GPU check command
(benchmarks/gpu_check.py) on CPU, its whole path. vLLM's multi-node data-parallel launch with
both "hosts" on this machine (a front end, and a `--headless --data-parallel-start-rank 1`
process), each its own process tree and metrics directory, as on two machines; EPLB off beside
it for the reference probes.

What one host sees, the operator sees for all: the front end's /metrics (and `vllm-eplb
status`) shows the headless host's rank, relayed by rank 0 (integration/metrics_relay.py),
with the front rank's figures; every slot of both ranks is read over HTTP (the gathered
fingerprint RPC) and holds its expert's bytes; a reload during a transfer ends the cycle on
both ranks and lands in every slot; float32 probes are identical to EPLB off's; no clock
mismatch and no missed-tick alarm in either host's log."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_passes_on_cpu_with_two_hosts(tmp_path):
    out = tmp_path / "check.json"
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py"), "--device", "cpu", "--seconds", "20", "--min-reload-attempts", "2",
           "--workdir", str(tmp_path / "work"), "--model-dir", str(tmp_path / "model"), "--json", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1500)
    assert out.exists(), r.stdout[-3000:] + r.stderr[-3000:]
    d = json.loads(out.read_text())
    eplb = d["deployments"]["eplb-bf16"]
    assert r.returncode == 0 and d["ok"], json.dumps({k: v for k, v in eplb.items() if k != "error"}, default=str)[:3000] + eplb.get("error", "")
    assert d["startup"]["preflight"] == [] and d["startup"]["seams_and_names_missing"] == []
    ranks = eplb["ranks"]
    assert ranks["1"]["relayed_pass"] is not None and ranks["0"]["relayed_pass"] is None  # rank 1 relayed, rank 0 its own
    for key in ("cycles_completed", "layers_committed", "slot_checks_ok"):
        assert ranks["0"][key] == ranks["1"][key] > 0, (key, ranks)
    assert eplb["status_shows_every_rank"] and eplb["ranks_read_at_start"] == 2
    reload = eplb["reload"]
    assert reload["ok"] and reload["reloads_in_transfer"] >= 1, reload
    # both checkpoints were reloaded, and after each every slot held the bytes just loaded
    assert {t["loaded"] for t in reload["attempts"]} == {"new", "old"} and reload["every_attempt_slots_hold_loaded"], reload
    assert not any("no_transfer_within_requests" in t for t in reload["attempts"]), reload  # each reload left moves to make
    for under_load in (eplb["balance_under_load"], eplb["reload"]["balance_under_load"]):  # read before the settling passes
        assert all(0 < under_load[k] <= 1 for k in ("current", "planned", "initial", "sampled")), under_load
    # float32 on CPU: greedy outputs exact; teacher-forced log-probs within the check's bound
    assert eplb["probes"]["share"] == 1.0 and d["deployments"]["off-bf16"]["repeats"]["share"] == 1.0
    assert eplb["probes_within_noise"], (eplb["probes"], eplb["static_placement_drift"], eplb["probes_bound"])
    assert eplb["logs"]["clock"] == ["moe_layers"] and eplb["logs"]["clock_mismatch"] == 0
