"""The static check of vLLM's seams (vllm_eplb/tools/seams.py) against each release's
sdist, 0.33.0 (GPU only, not runnable here) included."""

from __future__ import annotations

import ast

import pytest

from vllm_eplb.compat.versions import SEAM_CHECKED
from vllm_eplb.tools import seams
from vllm_eplb.compat.sdist import fetch_sdist


@pytest.mark.parametrize("version", SEAM_CHECKED)
def test_every_seam_fits(version):
    problems, known = seams.check(fetch_sdist(version), version)
    assert problems == [], "\n".join(problems)
    # a known gap that no longer shows must leave KNOWN_GAPS
    for (v, prefix), why in seams.KNOWN_GAPS.items():
        if v == version:
            assert any(p.startswith(prefix) for p in known), f"known gap no longer found, remove it: {prefix}"


def _tree_with(version: str, rel: str, old: str, new: str) -> seams.Tree:
    """The release's source with one edit, to show the check names what broke."""
    t = seams.Tree(fetch_sdist(version), version)
    text = (t.root / rel).read_text()
    assert old in text
    t._parsed[rel] = ast.parse(text.replace(old, new))
    return t


@pytest.mark.parametrize(
    "rel, old, new, expected",
    [
        ("vllm/v1/worker/gpu/model_runner.py", "    @step_eplb_after(is_dummy=True)\n", "",
         "hook v2_dummy_runs: GPUModelRunner._dummy_run (V2) is no longer decorated"),
        ("vllm/v1/worker/gpu_model_runner.py", "    def _dummy_run(\n", "    def _dummy_pass(\n",
         "hook v1_dummy_runs: vllm/v1/worker/gpu_model_runner.py has no GPUModelRunner._dummy_run"),
        ("vllm/model_executor/layers/fused_moe/router/base_router.py", "record_enabled: torch.Tensor,\n",
         "record: torch.Tensor,\n", "router: eplb_map_to_physical_and_record takes"),
        ("vllm/v1/worker/gpu/eplb_utils.py", "self.state.prepare_forward(", "self.state.prepare_pass(",
         "EplbState API: vllm/v1/worker/gpu/eplb_utils.py calls prepare_pass("),
        ("vllm/model_executor/layers/fused_moe/layer.py", "    enable_eplb: bool = False,\n", "",
         "moe_adapter: fused_moe/layer.py FusedMoEFactory no longer has enable_eplb=False"),
        ("vllm/model_executor/model_loader/base_loader.py", "        model = initialize_model(\n",
         "        model = utils.initialize_model(\n",
         "hook model_builder: BaseModelLoader no longer calls initialize_model"),
        ("vllm/v1/worker/gpu/eplb_utils.py", "self.state.should_record_tensor", "self.state.should_record",
         "guard should_record_tensor: vllm/v1/worker/gpu/eplb_utils.py lacks 'self.state.should_record_tensor', "
         "but the guard holds for vLLM 0.33.0"),
        ("vllm/config/parallel.py", "    enable_migration_batching: bool = False\n",
         "    enable_migration_batching: bool = False\n    max_moves: int = 0\n",
         "EPLBConfig: vLLM 0.33.0's field 'max_moves' is neither honoured nor refused"),
    ],
)
def test_a_broken_seam_is_named(rel, old, new, expected):
    t = _tree_with("0.33.0", rel, old, new)
    found = [p for c in seams.CHECKS for p in c(t)]
    assert any(p.startswith(expected) for p in found), found
