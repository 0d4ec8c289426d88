"""`vllm-eplb status`: the per-rank view rendered from /metrics text.

Fast tests on /metrics text recorded from real servers (tests/data/status: a server
rebalancing with the round-robin plug-in, caught while transferring and idle after two
cycles; a server whose plug-in policy never plans, stalled), on text produced by the
real balancer + metrics code on one rank (tests/single_rank_metrics.py: the failure
paths), and the command against a local HTTP server. The command against a live
`vllm serve` is in test_policy_plugins.py (it reuses that module's server)."""

import http.server
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from vllm_eplb.harness.server import metric, parse_metrics
from vllm_eplb.tools import status

DATA = Path(__file__).resolve().parent / "data" / "status"
HERE = Path(__file__).resolve().parent


def recorded(name: str) -> str:
    return (DATA / name).read_text()


def rank_block(screen: str, rank: int) -> str:
    return screen.split(f"\nrank {rank}  ", 1)[1].split("\nrank ", 1)[0]


def test_transferring_server_shows_layer_progress_and_figures():
    text = recorded("metrics_transferring.txt")
    ms = parse_metrics(text, "vllm:eplb_")  # the e2e tests' own parser, as a cross-check
    screen = status.render(text, "recorded")
    for rank in (0, 1):
        block = rank_block(screen, rank)
        assert block.startswith("TRANSFERRING"), block
        layer = int(metric(ms, "vllm:eplb_transfer_layer", rank=rank))
        filled = round(layer / 4 * 20)
        assert f"moving layer {layer + 1} of 4 (index {layer})  [{'#' * filled}{'-' * (20 - filled)}]" in block
        done = int(metric(ms, "vllm:eplb_cycles_total", rank=rank, outcome="completed"))
        skipped = int(metric(ms, "vllm:eplb_cycles_total", rank=rank, outcome="skipped", reason="insufficient_improvement") or 0)
        why = f" (insufficient_improvement {skipped})" if skipped else ""
        assert f"cycles: {done} completed, {skipped} skipped{why}, 0 aborted" in block
        for kind in status.KINDS:
            assert f"{kind} {metric(ms, 'vllm:eplb_balancedness', rank=rank, kind=kind):.3f}" in block
        share = metric(ms, "vllm:eplb_straggler_share", rank=rank)
        line = f"stragglers: {share:.1%} of MoE time per pass waits for the most loaded rank"
        # recorded before kind="sampled" existed (a newer status on an older server): no bound shown,
        # not the window's observed one (a different window's figure)
        assert metric(ms, "vllm:eplb_balancedness", rank=rank, kind="sampled") is None
        assert line + "\n" in block, block
        plan = metric(ms, "vllm:eplb_plan_seconds_sum", rank=rank) / metric(ms, "vllm:eplb_plan_seconds_count", rank=rank)
        assert f"plan: {plan * 1e3:.1f} ms mean over" in block
        assert re.search(r"transfer: [0-9.]+ ms per layer, mean over \d+ steps", block)
        assert "DISABLED" not in block and "STALLED" not in block


def test_idle_server_shows_no_transfer():
    screen = status.render(recorded("metrics_idle.txt"), "recorded")
    for rank in (0, 1):
        block = rank_block(screen, rank)
        assert block.startswith("IDLE") and "moving layer" not in block
        assert int(re.search(r"cycles: (\d+) completed", block).group(1)) >= 2


def test_stalled_server_shows_abort_reasons_and_stall():
    text = recorded("metrics_stalled.txt")
    ms = parse_metrics(text, "vllm:eplb_")
    screen = status.render(text, "recorded")
    for rank in (0, 1):
        block = rank_block(screen, rank)
        n = int(metric(ms, "vllm:eplb_cycles_total", rank=rank, outcome="aborted", reason="planner_error"))
        at = int(metric(ms, "vllm:eplb_last_abort_pass", rank=rank))
        assert f"0 completed, 0 skipped, {n} aborted (planner_error {n}); last: planner_error at pass {at}" in block
        w = int(metric(ms, "vllm:eplb_windows_without_cycle", rank=rank))
        assert f"STALLED: no cycle completed over the last {w} windows" in block


def test_a_model_whose_layers_record_no_load_is_named():
    """vllm:eplb_unrecorded_windows (plan_rounds._nothing_recorded) shows on the rank's block."""
    extra = (
        "# HELP vllm:eplb_unrecorded_windows_total windows\n# TYPE vllm:eplb_unrecorded_windows_total counter\n"
        'vllm:eplb_unrecorded_windows_total{rank="1"} 3.0\n'
    )
    screen = status.render(recorded("metrics_idle.txt") + extra, "recorded")
    assert "NO LOAD RECORDED in 3 window(s) that routed tokens" in rank_block(screen, 1), screen
    assert "NO LOAD RECORDED" not in rank_block(screen, 0)


def single_rank(mode: str) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, str(HERE / "single_rank_metrics.py"), mode], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_a_bug_in_every_tick_suspends_the_balancer_and_says_why():
    """From pass 45 every planning tick raises, its retry too: the rank cannot vote, so each cycle
    ends by the timeout path (agreement_timeout), never disabled; three in a row suspend it, the
    resume vote re-enables it after the back-off, and the bug suspends it again."""
    r = single_rank("disable")
    screen = status.render(r.stdout, "one rank")
    assert "SUSPENDED (a transient cause; the ranks vote to resume after a back-off): agreement_timeout_repeated x2" in screen, screen
    assert re.search(r"aborted \(agreement_timeout [4-9]\); last: agreement_timeout at pass \d+", screen), screen
    assert "DISABLED" not in screen and "rebalancing resumed" in r.stderr


def test_config_mismatch_refused_at_start_up_and_exported():
    """Two ranks, layers_per_pass 1 and 2: neither balances; each exports why, naming the key
    and the ranks (vllm:eplb_disabled_info{reason="config_mismatch"}) and logs one line."""
    r = single_rank("mismatch")
    series = parse_metrics(r.stdout)
    detail = "layers_per_pass differs (rank 0: 1 | rank 1: 2)"
    for rank in (0, 1):
        assert metric(series, "vllm:eplb_disabled_info", rank=rank, reason="config_mismatch", detail=detail) == 1
        assert metric(series, "vllm:eplb_enabled", rank=rank) == 0
    lines = [l for l in r.stderr.splitlines() if "rebalancing disabled" in l]
    assert len(lines) == 2 and all(f"config_mismatch: {detail}" in l for l in lines), r.stderr[-3000:]


def test_stall_is_logged_once_and_exported():
    r = single_rank("stall")
    warnings = [l for l in r.stderr.splitlines() if l.startswith("WARNING") and "no rebalancing cycle" in l]
    assert len(warnings) == 1, r.stderr[-3000:]  # once per stall, not once per window
    # each abort has its own WARNING line with the reason and the pass (core/ends.py)
    assert re.search(r"WARNING vllm\.eplb EPLB rank 0 pass \d+: cycle aborted: planner_error", r.stderr)
    assert re.fullmatch(
        r"WARNING vllm\.eplb EPLB rank 0 pass \d+: no rebalancing cycle completed over the last 4 windows "
        r"\(8\d passes; stall_warning_windows=3\); aborted cycles so far: planner_error x\d",
        warnings[0],
    ), warnings[0]
    ms = parse_metrics(r.stdout, "vllm:eplb_")
    assert metric(ms, "vllm:eplb_stalled", rank=0) == 1
    assert metric(ms, "vllm:eplb_windows_without_cycle", rank=0) >= 5
    screen = status.render(r.stdout)
    assert "STALLED" in screen
    # the windows are still measured: the straggler share beside its own passes' summed balance
    share, summed = metric(ms, "vllm:eplb_straggler_share", rank=0), metric(ms, "vllm:eplb_balancedness", rank=0, kind="sampled")
    assert 1 - share <= summed + 1e-9, (share, summed)
    assert f"stragglers: {share:.1%} of MoE time per pass waits for the most loaded rank (the same passes' summed load would say {1 - summed:.1%})" in screen, screen


class Served:
    """A local HTTP server answering /metrics with the given text."""

    def __init__(self, body: str):
        data = body.encode()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200 if self.path == "/metrics" else 404)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.end_headers()
                self.wfile.write(data if self.path == "/metrics" else b"")

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def run_status(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "vllm_eplb.tools.status", *args], capture_output=True, text=True, timeout=timeout)


def test_once_prints_one_snapshot():
    with Served(recorded("metrics_idle.txt")) as srv:
        r = run_status(srv.url, "--once")
        r2 = run_status(srv.url + "/metrics", "--once")  # the /metrics URL itself works too
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("vllm-eplb status") == 1 and "\nrank 0  IDLE" in r.stdout and "\nrank 1  IDLE" in r.stdout
    assert r2.returncode == 0 and r2.stdout.split("\n", 1)[1] == r.stdout.split("\n", 1)[1]


def test_refreshes_until_interrupted():
    with Served(recorded("metrics_transferring.txt")) as srv:
        p = subprocess.Popen([sys.executable, "-m", "vllm_eplb.tools.status", srv.url, "--interval", "0.1"], stdout=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        out = ""
        while out.count("vllm-eplb status") < 3 and time.monotonic() < deadline:
            out += os.read(p.stdout.fileno(), 65536).decode()
        p.send_signal(signal.SIGINT)
        rc = p.wait(30)
        p.stdout.close()
    assert rc == 0
    assert out.count("vllm-eplb status") >= 3


@pytest.mark.parametrize(
    "body, expected",
    [
        ('vllm:num_requests_running{model_name="m"} 0.0\n', "no vllm:eplb_* series"),
        ("this is { not prometheus\n", "not Prometheus text"),
    ],
)
def test_bad_input_is_one_line(body, expected):
    with Served(body) as srv:
        r = run_status(srv.url, "--once")
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], r.stderr


def test_unreachable_server_is_one_line():
    with Served("") as srv:
        url = srv.url
    r = run_status(url, "--once")  # the port is closed now
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot read {url}/metrics: ") and "refused" in lines[0], lines


def test_console_script_runs_the_same_command():
    exe = Path(sys.executable).with_name("vllm-eplb")
    if not exe.exists():
        pytest.skip("vllm-eplb script not installed in this environment (pip install -e .)")
    with Served(recorded("metrics_idle.txt")) as srv:
        r = subprocess.run([str(exe), "status", srv.url, "--once"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "\nrank 1  IDLE" in r.stdout, r.stderr
