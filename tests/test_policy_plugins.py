"""Policy plug-ins: a package installed next to vllm-eplb registers a placement policy
through the `vllm_eplb.policies` entry-point group and eplb.json selects it by name.

The example package (examples/round_robin_policy) is pip-installed into the test
environment. Two real `vllm serve` runs: one plans with the example policy (the status
tool is tested against it while it rebalances), one with a plug-in whose every plan
fails, to see the balancer fail loudly (log WARNING, /metrics reasons, stall gauge)."""

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
from pathlib import Path

import numpy as np
import pytest

from vllm_eplb.core import records
from vllm_eplb.core.placement import Topology, default_placement

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "round_robin_policy"


def run_py(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """A fresh interpreter: entry points are read once per process."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})


def plugin_dir(tmp: Path, name: str, module: str, source: str, target: str) -> str:
    """A directory that, on PYTHONPATH, holds an installed distribution with one policy
    entry point: the module and its .dist-info (the files pip would write)."""
    (tmp / f"{module}.py").write_text(source)
    info = tmp / f"{module}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[vllm_eplb.policies]\n{name} = {target}\n")
    return str(tmp)


@pytest.fixture(scope="session")
def example_installed(tmp_path_factory):
    # built from a copy: pip builds in the source folder (build/, *.egg-info)
    src = tmp_path_factory.mktemp("example") / "round_robin_policy"
    shutil.copytree(EXAMPLE, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    r = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", str(src)],
        capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return "round-robin"


def test_installed_plugin_is_listed_and_plans_valid_placements(example_installed):
    r = run_py(
        "import json, numpy as np\n"
        "from vllm_eplb.core.policies import policy_names, plugin_names, get_policy, PlanInput\n"
        "from vllm_eplb.core.placement import Topology, default_placement, validate_placement, predicted_balancedness\n"
        "rng = np.random.default_rng(0)\n"
        "out = []\n"
        "for ranks, logical, extra in [(2, 16, 4), (4, 64, 8), (8, 256, 0), (3, 9, 3)]:\n"
        "    topo = Topology(ranks, logical, logical + extra)\n"
        "    load = rng.zipf(1.4, size=(3, logical)).astype(float)\n"
        "    cur = default_placement(topo, 3)\n"
        "    new = get_policy('round-robin', tolerance=0.5).place(PlanInput(load, cur, topo))\n"
        "    validate_placement(new, topo)\n"
        "    out.append([predicted_balancedness(cur, load, topo), predicted_balancedness(new, load, topo)])\n"
        "print(json.dumps([policy_names(), plugin_names(), out]))\n"
    )
    assert r.returncode == 0, r.stderr[-2000:]
    names, plugins, balance = json.loads(r.stdout.strip().splitlines()[-1])
    assert {"deepseek", "greedy", "min-move", "round-robin"} <= set(names) and names == sorted(names)
    assert "round-robin" in plugins and "min-move" not in plugins
    for before, after in balance:  # skewed load: the plug-in's plan balances better than vLLM's layout
        assert after > before, balance


def test_unknown_policy_error_lists_installed_policies(example_installed):
    r = run_py("from vllm_eplb.integration.config import load_eplb_config\nload_eplb_config({'policy': 'fastest'})")
    last = r.stderr.strip().splitlines()[-1]
    assert "'policy' must be one of" in last and "round-robin" in last and "min-move" in last, last


def test_dry_run_takes_the_plugin_policy(example_installed, tmp_path):
    rng = np.random.default_rng(1)
    topo = Topology(2, 16, 20)
    path = str(tmp_path / "rec.json")
    records.save(records.PlacementRecord(default_placement(topo, 4), rng.zipf(1.3, size=(4, 16)).astype(float), 2, 16, "deepseek", 7), path)
    r = subprocess.run([sys.executable, "-m", "vllm_eplb.tools.dry_run", path, "--policy", "round-robin"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "policy round-robin" in r.stdout
    before, after = map(float, re.search(r"balancedness ([0-9.]+) -> ([0-9.]+)", r.stdout).groups())
    assert after > before


def test_broken_plugin_is_reported_by_name_and_others_still_work(tmp_path):
    path = plugin_dir(tmp_path, "broken", "broken_policy", "import not_a_module_anywhere\n", "broken_policy:Policy")
    r = run_py(
        "from vllm_eplb.core.policies import policy_names, get_policy\n"
        "print(policy_names())\n"
        "get_policy('broken')\n",
        env={"PYTHONPATH": path},
    )
    assert "'broken'" not in r.stdout and "min-move" in r.stdout
    last = r.stderr.strip().splitlines()[-1]
    assert "policy 'broken': plug-in 'broken_policy:Policy' failed to import: ModuleNotFoundError" in last, last


def test_config_names_a_broken_plugin_and_why(tmp_path):
    path = plugin_dir(tmp_path, "broken", "broken_policy", "raise ImportError('needs scipy')\n", "broken_policy:Policy")
    r = run_py("from vllm_eplb.integration.config import load_eplb_config\nload_eplb_config({'policy': 'broken'})", env={"PYTHONPATH": path})
    last = r.stderr.strip().splitlines()[-1]
    assert last.endswith("eplb config: 'policy': plug-in 'broken_policy:Policy' failed to import: ImportError: needs scipy"), last


def test_a_plugin_may_not_take_a_builtin_name(tmp_path):
    src = "from vllm_eplb.core.policies import Policy\nclass P(Policy):\n    def place(self, inp):\n        raise RuntimeError\n"
    path = plugin_dir(tmp_path, "deepseek", "impostor", src, "impostor:P")
    r = run_py("from vllm_eplb.core.policies import get_policy\nprint(type(get_policy('deepseek')).__module__)", env={"PYTHONPATH": path})
    assert r.stdout.strip().endswith("vllm_eplb.core.policies.deepseek"), r.stdout + r.stderr


# ---------------------------------------------------------------- real servers


class Load:
    """Concurrent clients sending random prompts until stopped: passes only run with traffic."""

    def __init__(self, server, clients: int = 6):
        from vllm_eplb.harness.tiny_model import WORDS

        self.stop_flag, self.errors = threading.Event(), []

        def run(seed):
            rng = random.Random(seed)
            while not self.stop_flag.is_set():
                try:
                    server.complete(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))), max_tokens=rng.randint(8, 40))
                except Exception as exc:  # recorded, asserted on
                    self.errors.append(exc)

        self.threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(clients)]

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop_flag.set()
        for t in self.threads:
            t.join(120)


def wait_for(server, done, timeout: float = 480) -> dict:
    """Scrape rank 0's metrics until done(metrics) or the deadline (a broken run only)."""
    deadline = time.monotonic() + timeout
    while True:
        ms = server.metrics()
        if done(ms) or time.monotonic() > deadline:
            return ms
        time.sleep(0.2)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from vllm_eplb.harness.tiny_model import build

    return build(str(tmp_path_factory.mktemp("tiny-moe")))


def status_once(url: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vllm_eplb.tools.status", url, "--once"], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def round_robin_run(model, example_installed, tmp_path_factory):
    """`vllm serve` with "policy": "round-robin" under load, the status tool refreshing
    beside it (as an operator would run it), until two cycles completed and the tool has
    shown a layer being moved (a transfer lasts a few passes: on a loaded machine a
    refresh can miss the first ones; the run ends on what was seen, the deadline only
    bounds a broken run)."""
    from vllm_eplb.harness.server import Server, metric

    d = tmp_path_factory.mktemp("plugin")
    cfg = d / "eplb.json"
    cfg.write_text(json.dumps({"policy": example_installed, "window_size": 40, "step_interval": 80, "num_redundant_experts": 4, "agreement_lag": 4, "improvement_threshold": 0.0}))
    log = str(d / "serve.log")
    out: dict = {"log": log}
    with Server(model, 8313, str(cfg), log_path=log) as s, Load(s) as load:
        screen = d / "status.txt"
        with open(screen, "w") as fh:
            watcher = subprocess.Popen([sys.executable, "-m", "vllm_eplb.tools.status", s.url, "--interval", "0.2"], stdout=fh, stderr=subprocess.STDOUT)
            t0 = time.monotonic()
            final = wait_for(
                s,
                lambda ms: (metric(ms, "vllm:eplb_cycles_total", rank=0, outcome="completed") or 0) >= 2
                and "moving layer" in screen.read_text(),
            )
            out["pace"] = f"{metric(final, 'vllm:eplb_pass', rank=0)} passes in {time.monotonic() - t0:.0f} s"
            watcher.send_signal(signal.SIGINT)
            out["watcher_rc"] = watcher.wait(60)
        out["once"] = status_once(s.url)
        out["metrics"] = s.metrics()
        out["load_errors"] = load.errors
    out["snapshots"] = (d / "status.txt").read_text().split("\nvllm-eplb status ")
    return out


@pytest.mark.vllm
@pytest.mark.slow
def test_serving_with_the_plugin_policy_rebalances(round_robin_run):
    from vllm_eplb.harness.server import metric

    ms, pace = round_robin_run["metrics"], round_robin_run["pace"]
    assert not round_robin_run["load_errors"], round_robin_run["load_errors"][:3]
    for rank in (0, 1):
        assert (metric(ms, "vllm:eplb_cycles_total", rank=rank, outcome="completed") or 0) >= 2, pace
        assert metric(ms, "vllm:eplb_enabled", rank=rank) == 1
        assert metric(ms, "vllm:eplb_stalled", rank=rank) == 0
        assert metric(ms, "vllm:eplb_last_abort_pass", rank=rank) == -1
    log = Path(round_robin_run["log"]).read_text()
    assert re.search(r"EPLB rank 0 pass \d+: plan \(round-robin, ", log), "no plan made by the plug-in in the log"


@pytest.mark.vllm
@pytest.mark.slow
def test_status_tool_against_a_rebalancing_server(round_robin_run):
    from vllm_eplb.harness.server import metric

    assert round_robin_run["watcher_rc"] == 0  # Ctrl-C ends the refreshing view cleanly
    snaps = round_robin_run["snapshots"]
    assert len(snaps) >= 5, snaps[:2]
    # the layer being moved, with its progress bar, was on screen at some refresh
    moving = [m for s in snaps for m in re.findall(r"moving layer (\d) of 4 \(index \d\)  \[[#-]{20}\]", s)]
    assert moving, f"{len(snaps)} snapshots, none while transferring ({round_robin_run['pace']})"
    once = round_robin_run["once"]
    assert once.returncode == 0, once.stderr
    ms = round_robin_run["metrics"]
    for rank in (0, 1):
        block = once.stdout.split(f"rank {rank}  ", 1)[1].split("\nrank ", 1)[0]
        done = int(re.search(r"cycles: (\d+) completed", block).group(1))
        assert done >= 2 and done <= metric(ms, "vllm:eplb_cycles_total", rank=rank, outcome="completed")
        kinds = re.search(
            r"balancedness: observed ([0-9.]+)  pass ([0-9.]+)  current ([0-9.]+)  planned ([0-9.]+)  initial ([0-9.]+)", block
        )
        assert kinds and all(0 < float(x) <= 1 for x in kinds.groups()), block
        assert re.search(r"plan: [0-9.]+ ms mean over \d+   transfer: [0-9.]+ ms per layer", block), block


FAILING = '''
from vllm_eplb.core.policies import Policy

class AlwaysFails(Policy):
    """Every plan raises: each cycle ends in an abort (planner_error)."""
    def place(self, inp):
        raise RuntimeError("this policy never plans")
'''


@pytest.mark.vllm
@pytest.mark.slow
def test_failing_cycles_are_loud_in_log_metrics_and_status(model, tmp_path):
    from vllm_eplb.integration.metrics import STALL_WARNING_WINDOWS
    from vllm_eplb.harness.server import Server, metric

    path = plugin_dir(tmp_path, "always-fails", "always_fails", FAILING, "always_fails:AlwaysFails")
    cfg = tmp_path / "eplb.json"
    cfg.write_text(json.dumps({"policy": "always-fails", "window_size": 10, "step_interval": 20, "num_redundant_experts": 4, "agreement_lag": 2}))
    log = tmp_path / "serve.log"
    # stalled, and the cycle of the window that made it so aborted too: the stall gauge rises
    # at a window's end, that window's abort lands when the planner's error has been voted
    def stalled(ms):
        return all(
            metric(ms, "vllm:eplb_stalled", rank=r) == 1
            and (metric(ms, "vllm:eplb_cycles_total", rank=r, outcome="aborted", reason="planner_error") or 0) > STALL_WARNING_WINDOWS
            for r in (0, 1)
        )

    with Server(model, 8314, str(cfg), log_path=str(log), env={"PYTHONPATH": path}) as s, Load(s):
        ms = wait_for(s, stalled)
        once = status_once(s.url)
    for rank in (0, 1):
        aborted = metric(ms, "vllm:eplb_cycles_total", rank=rank, outcome="aborted", reason="planner_error")
        assert aborted and aborted > STALL_WARNING_WINDOWS, ms
        assert metric(ms, "vllm:eplb_last_abort_info", rank=rank, reason="planner_error") == 1
        assert metric(ms, "vllm:eplb_last_abort_pass", rank=rank) > 0
        assert metric(ms, "vllm:eplb_windows_without_cycle", rank=rank) > STALL_WARNING_WINDOWS
        assert metric(ms, "vllm:eplb_stalled", rank=rank) == 1
    text = log.read_text()
    warnings = re.findall(r"WARNING.*EPLB rank (\d) pass \d+: no rebalancing cycle completed over the last (\d+) windows", text)
    assert sorted({r for r, _ in warnings}) == ["0", "1"], text[-3000:]
    assert len(warnings) == 2, warnings  # once per rank per stall, not once per window
    assert once.returncode == 0, once.stderr
    assert re.search(r"aborted \(planner_error \d+\); last: planner_error at pass \d+", once.stdout), once.stdout
    assert "STALLED: no cycle completed over the last" in once.stdout
