"""patches/vllm/: the integration as patch files against each supported vLLM source, one
series (patches/vllm/series) with a release's own copy of a patch where its source differs.

1. They apply cleanly to that release's sdist fetched from PyPI, and the patched files compile
   (patches/tests/ to its tests/ likewise); a release's own copy is there only where the
   series' patch does not apply.
2. They change exactly the vLLM definitions the hooks change (integration/hooks.HOOKS), so
   the plugin and a fork carrying the patches are the same integration.
3. A "fork": the installed vLLM with its release's patches applied (a tree of symlinks, the
   patched files real copies) serves with the balancer while the plugin is disabled:
   the patches alone carry the integration."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vllm_eplb.compat.versions import PATCHED
from vllm_eplb.integration.hooks import HOOKS
from vllm_eplb.harness.server import Server, metric
from vllm_eplb.harness.tiny_model import build
from vllm_eplb.tools import upstream

pytestmark = pytest.mark.vllm


@pytest.mark.parametrize("kind", upstream.KINDS)
def test_the_series_and_the_folders_agree(kind):
    """Every patch is in its series once, every release's own copy is of a patch of the series,
    under a release declared patched; each patched release takes patches of both kinds."""
    assert upstream.layout_problems(kind) == []
    for version in PATCHED:
        assert upstream.patch_files(kind, version), version


@pytest.mark.parametrize("version", PATCHED)
def test_patches_apply_to_vllm_sdist(version):
    src = upstream.fetch_sdist(version)
    lines = upstream.check(src, version)
    # one line per patch; 0.26.0 (GPU only) has no CPU kernel patches, so fewer than the CPU releases
    assert len(lines) == len(upstream.patch_files("vllm", version)) >= 4


def test_an_own_copy_the_series_would_do_is_refused(tmp_path, monkeypatch):
    patches = tmp_path / "patches"
    shutil.copytree(upstream.PATCHES, patches)
    monkeypatch.setattr(upstream, "PATCHES", patches)
    name = upstream.series("vllm")[0][0]
    (patches / "vllm" / "0.32.0").mkdir(exist_ok=True)
    shutil.copy(patches / "vllm" / name, patches / "vllm" / "0.32.0" / name)
    with pytest.raises(SystemExit, match=f"patches/vllm/0.32.0/{name} is not needed: patches/vllm/{name} applies"):
        upstream.check(upstream.fetch_sdist("0.32.0"), "0.32.0")


@pytest.mark.parametrize("version", PATCHED)
def test_test_patches_apply_to_the_sdists_tests(version):
    """The release's test patches apply to its tests/ and the files compile (the
    upstream_tests tool runs them; this catches a patch that no longer applies in seconds)."""
    src = upstream.fetch_sdist(version)
    lines = upstream.check(src, version, kind="tests", subdir="tests")
    assert len(lines) == len(upstream.patch_files("tests", version)) >= 6


@pytest.mark.parametrize("version", PATCHED)
def test_hooks_and_patches_change_the_same_things(version):
    hooked = {h.changes_for(version) for h in HOOKS if h.changes_for(version) and version in h.versions}
    patched = upstream.changed_definitions(upstream.fetch_sdist(version), version)
    assert hooked - patched == set(), f"hooks change what no patch of {version} changes"
    assert patched - hooked == set(), f"patches of {version} change what no hook changes"


@pytest.fixture(scope="module")
def forked_vllm(tmp_path_factory) -> Path:
    import vllm

    installed = Path(vllm.__file__).parent
    root = tmp_path_factory.mktemp("fork")
    subprocess.run(["cp", "-rs", str(installed), str(root / "vllm")], check=True)
    for p in upstream.patch_files("vllm"):
        for f in upstream.touched_files(p):
            target = root / f
            text = target.resolve().read_text()
            target.unlink()
            target.write_text(text)
    upstream.apply(upstream.patch_files("vllm"), root)
    return root


def test_forked_vllm_serves_with_balancer(forked_vllm, tmp_path):
    model = build(str(tmp_path / "model"))
    cfg = tmp_path / "eplb.json"
    cfg.write_text(json.dumps({"window_size": 20, "step_interval": 60, "num_redundant_experts": 4}))
    env = {
        "EPLB_PLUGIN_DISABLE": "1",  # nothing from the plugin: the patches alone
        "PYTHONPATH": f"{forked_vllm}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    which = subprocess.run(
        [sys.executable, "-c", "import vllm; print(vllm.__file__)"], env={**os.environ, **env}, capture_output=True, text=True
    )
    assert which.stdout.startswith(str(forked_vllm)), which
    launcher = [sys.executable, "-c", "import sys; from vllm.entrypoints.cli.main import main; sys.exit(main())", "serve", model]
    with Server(model, 8251, str(cfg), log_path=str(tmp_path / "serve.log"), launcher=launcher, env=env) as server:
        deadline = time.monotonic() + 480  # bounds a broken run; a loaded CI box is slow
        done = 0
        while time.monotonic() < deadline and done < 1:
            for prompt in ("the model of the expert", "one two three", "load on a rank"):
                server.complete(prompt, max_tokens=32)
            done = metric(server.metrics(), "vllm:eplb_cycles_total", rank=0, outcome="completed") or 0
        assert done >= 1, server.tail()
        log = Path(server.log_path).read_text()
        assert "vllm-eplb: EP rank 0/2" in log
