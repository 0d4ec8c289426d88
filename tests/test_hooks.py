"""The hooks as a declared list: checked before anything is installed, all or none,
one log line when they cannot be installed (real vLLM, in this process)."""

from __future__ import annotations

import dataclasses
import logging

import pytest

from vllm_eplb.compat.versions import KNOWN
from vllm_eplb.integration import hooks

pytestmark = pytest.mark.vllm


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """install_all runs once per process: let each test start from nothing installed.
    Multiprocess mode on keeps the metrics bridge (process-wide, inherited by the servers
    later tests start) from being set up in this process."""
    monkeypatch.setattr(hooks, "_installed", None)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    yield
    hooks.uninstall_all()


def test_every_hook_names_target_versions_and_reason():
    names = [h.name for h in hooks.HOOKS]
    assert len(names) == len(set(names))
    for h in hooks.HOOKS:
        assert h.target.module and h.target.qualname and h.why and set(h.versions) <= set(KNOWN), h
        # one way of making the change: wrapped, swapped or run here, or says where it is made
        assert [bool(h.wrap), bool(h.swap), bool(h.run), bool(h.applied_by)].count(True) == 1, h


def test_installed_release_passes_preflight_and_installs_everything(fresh):
    assert hooks.vllm_version() in KNOWN
    assert hooks.preflight() == []
    import vllm.v1.worker.gpu.eplb_utils as v2
    import vllm.v1.worker.gpu_model_runner as v1
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner as V2Runner

    from vllm_eplb.integration.runner_state import VllmEplbState

    import vllm.model_executor.model_loader.base_loader as base_loader

    assert hooks.install_all() is True
    assert v1.EplbState is VllmEplbState and v2.EplbState is VllmEplbState
    assert getattr(V2Runner._dummy_run, hooks._MARK, False)
    assert getattr(base_loader.initialize_model, hooks._MARK, False)
    hooks.uninstall_all()
    assert v1.EplbState is not VllmEplbState and not getattr(V2Runner._dummy_run, hooks._MARK, False)
    assert not getattr(base_loader.initialize_model, hooks._MARK, False)


def test_unknown_release_is_one_line_and_nothing_installed(fresh, monkeypatch, caplog):
    monkeypatch.setattr(hooks, "vllm_version", lambda: "0.31.0")
    import vllm.v1.worker.gpu_model_runner as v1

    before = v1.EplbState
    with caplog.at_level(logging.ERROR, logger="vllm.eplb"):
        assert hooks.install_all() is False
    lines = [r.getMessage() for r in caplog.records if r.name == "vllm.eplb"]
    assert len(lines) == 1 and "vLLM 0.31.0 is not a release vllm-eplb knows" in lines[0], lines
    assert "balancer is off" in lines[0]
    assert v1.EplbState is before and hooks._journal == []


def test_missing_attribute_is_named_and_nothing_installed(fresh, monkeypatch, caplog):
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner as V2Runner

    monkeypatch.delattr(V2Runner, "_dummy_run")  # as if a release renamed it
    import vllm.v1.worker.gpu_model_runner as v1

    before = v1.EplbState
    with caplog.at_level(logging.ERROR, logger="vllm.eplb"):
        assert hooks.install_all() is False
    lines = [r.getMessage() for r in caplog.records if r.name == "vllm.eplb"]
    assert len(lines) == 1, lines
    assert "hook v2_dummy_runs: vllm.v1.worker.gpu.model_runner:GPUModelRunner._dummy_run is missing" in lines[0]
    assert v1.EplbState is before and hooks._journal == []


def test_failure_half_way_undoes_what_was_installed(fresh, monkeypatch, caplog):
    import vllm.engine.arg_utils as arg_utils
    import vllm.v1.worker.gpu_model_runner as v1

    before = (arg_utils.get_kwargs, v1.EplbState)

    def broken(original):
        raise RuntimeError("simulated")

    # after cli, engine, gate, runner state
    with_broken = tuple(dataclasses.replace(h, wrap=broken) if h.name == "v2_dummy_runs" else h for h in hooks.HOOKS)
    monkeypatch.setattr(hooks, "HOOKS", with_broken)
    with caplog.at_level(logging.ERROR, logger="vllm.eplb"):
        assert hooks.install_all() is False
    assert (arg_utils.get_kwargs, v1.EplbState) == before
    assert hooks._journal == []
    lines = [r.getMessage() for r in caplog.records if r.name == "vllm.eplb"]
    assert len(lines) == 1 and "installing hook v2_dummy_runs" in lines[0] and "every hook undone" in lines[0]


def test_absent_policy_is_said_at_start_up(tmp_path):
    """Real `vllm serve`: the start-up log says which policy an eplb.json without `policy`
    gets. The slots are made not to divide over the ranks, so the server stops right after
    (exit 2, one line) instead of loading the model."""
    import subprocess

    from vllm_eplb.harness.server import serve_cmd
    from vllm_eplb.harness.tiny_model import build

    model = build(str(tmp_path / "model"))
    cmd = serve_cmd(model, 8241, '{"window_size": 10, "step_interval": 20, "num_redundant_experts": 3}', max_model_len=256)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 2, out[-2000:]
    assert "vllm-eplb: 'policy' not set: using 'min-move' (vllm-eplb's default" in out, out[-2000:]
    assert "do not divide over 2 expert-parallel ranks; choose num_redundant_experts so the sum is a multiple of 2 (e.g. 4)" in r.stderr.strip().splitlines()[-1]
