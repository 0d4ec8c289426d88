"""The release check of every vLLM name the code touches (tools/vllm_names.py; the whole tree
is checked by tests/test_seams.py, whose CHECKS include it), its guards (compat/guards.py),
and the MoE model finder that 0.26.0 needed (compat/moe_model.py)."""

from __future__ import annotations

import functools
import re

import pytest

from vllm_eplb.compat import guards
from vllm_eplb.compat.guards import GUARDS
from vllm_eplb.compat.sdist import fetch_sdist
from vllm_eplb.compat.versions import SEAM_CHECKED
from vllm_eplb.tools import seams, vllm_names


@functools.cache
def tree(version: str) -> seams.Tree:
    return seams.Tree(fetch_sdist(version), version)


def missing(src: str, version: str, file: str = "x.py") -> list[str]:
    refs, errors = vllm_names.references_in(src, file)
    return errors + vllm_names.missing_in(tree(version), refs)


OLD_IMPORT = "    from vllm.model_executor.models.interfaces import get_mixture_of_experts_model\n"


def test_the_026_defect_is_named_with_its_line_and_release():
    """moe_adapter.build_model as it was before 0.26.0 was fixed: named for 0.26.0 only."""
    rel = "vllm_eplb/integration/moe_adapter.py"
    text = (vllm_names.ROOT / rel).read_text()
    fixed = next(line for line in text.splitlines(keepends=True) if "import mixture_of_experts_model as" in line)
    reverted = text.replace(fixed, OLD_IMPORT)
    line = reverted.splitlines().index(OLD_IMPORT.rstrip("\n")) + 1
    assert missing(reverted, "0.26.0", rel) == [
        f"{rel}:{line}: vllm.model_executor.models.interfaces:get_mixture_of_experts_model is missing in vLLM 0.26.0"
    ]
    for version in ("0.30.0", "0.32.0", "0.33.0"):
        assert missing(reverted, version, rel) == []


GUARDED = '''
from vllm_eplb.compat.guards import holds, only_where

def find(model):
    if {cond}:
        from vllm.model_executor.models.interfaces import get_mixture_of_experts_model
    else:
        from vllm.model_executor.models.interfaces import is_mixture_of_experts

def finder():
    from vllm.model_executor.models import interfaces

    return interfaces.get_mixture_of_experts_model if holds("get_mixture_of_experts_model") else interfaces.is_mixture_of_experts

@only_where("cpu")
def cpu_hook():
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts
'''


@pytest.mark.parametrize("version", SEAM_CHECKED)
def test_a_guarded_name_is_checked_where_its_guard_holds_only(version):
    assert missing(GUARDED.format(cond='holds("get_mixture_of_experts_model")'), version) == []
    # the guard the wrong way round: the name is read where it is missing
    inverted = missing(GUARDED.format(cond='not holds("get_mixture_of_experts_model")'), version)
    if version == "0.26.0":
        assert inverted == ["x.py:6: vllm.model_executor.models.interfaces:get_mixture_of_experts_model "
                            "is missing in vLLM 0.26.0"]
    else:
        assert inverted == []  # is_mixture_of_experts is in every release


@pytest.mark.parametrize("version", SEAM_CHECKED)
def test_a_fallback_exempts_nothing(version):
    src = ("from vllm.model_executor.layers.fused_moe import layer\n"
           "fn = getattr(layer, 'FusedMoEFactory', None) or layer.FusedMoE\n")
    lacks = "FusedMoEFactory" if version == "0.26.0" else "FusedMoE"
    assert missing(src, version) == [f"x.py:2: vllm.model_executor.layers.fused_moe.layer:{lacks} is missing in vLLM {version}"]


def test_every_form_of_use_is_read():
    src = '''
import importlib
import vllm.v1.worker.no_such_runner
import vllm.model_executor.layers as layers
from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts
from vllm.v1.worker.cpu_model_runner import CPUModelRunner
from vllm.model_executor.models.interfaces import MixtureOfExperts, NoSuchInterface
from vllm.platforms import current_platform
from vllm import __version__, LLM

importlib.import_module("vllm.no_such_module")
layers.fused_moe.layer.FusedMoEFactory, layers.fused_moe.layer.NoSuchFactory
RoutedExperts.weight_loader, RoutedExperts.named_modules, RoutedExperts.no_such
CPUModelRunner.load_model, CPUModelRunner.execute_model, CPUModelRunner.no_such
hasattr(MixtureOfExperts, "set_eplb_state"), getattr(MixtureOfExperts, "no_such", None), MixtureOfExperts.__mro__
current_platform.is_cuda_alike, current_platform.no_such

def shadowed(RoutedExperts):
    return RoutedExperts.anything  # a parameter, not vLLM's class
'''
    assert missing(src, "0.32.0") == [
        "x.py:3: module vllm.v1.worker.no_such_runner is missing in vLLM 0.32.0",
        "x.py:7: vllm.model_executor.models.interfaces:NoSuchInterface is missing in vLLM 0.32.0",
        "x.py:11: module vllm.no_such_module is missing in vLLM 0.32.0",
        "x.py:12: vllm.model_executor.layers.fused_moe.layer:NoSuchFactory is missing in vLLM 0.32.0",
        # inherited members are found through the bases, vLLM's (GPUModelRunner) and torch's (nn.Module)
        "x.py:13: vllm.model_executor.layers.fused_moe.routed_experts:RoutedExperts.no_such is missing in vLLM 0.32.0",
        "x.py:14: vllm.v1.worker.cpu_model_runner:CPUModelRunner.no_such is missing in vLLM 0.32.0",
        "x.py:15: vllm.model_executor.models.interfaces:MixtureOfExperts.no_such is missing in vLLM 0.32.0",
        # an instance annotated at module level (current_platform: Platform) is read as one
        "x.py:16: vllm.platforms:current_platform.no_such is missing in vLLM 0.32.0",
    ]


def test_an_undeclared_guard_is_an_error():
    src = "from vllm_eplb.compat.guards import holds\nif holds('get_moe_model'):\n    pass\n"
    assert missing(src, "0.32.0") == ["x.py:2: guard 'get_moe_model' is not declared in vllm_eplb/compat/guards.py"]
    with pytest.raises(KeyError):
        guards.only_where("get_moe_model")


def test_every_guard_is_used_and_narrows_the_releases():
    """A guard no code uses, or one that holds for every declared release or none, must go;
    one for what only some releases ask of vllm-eplb names where that shows (`seen`, which
    the seam check finds in those releases only)."""
    code = "".join(p.read_text() for folder in vllm_names.SCANNED for p in (vllm_names.ROOT / folder).rglob("*.py"))
    for key, guard in GUARDS.items():
        used = re.search(rf"""(holds|only_where)\(["']{key}["']\)""", code)
        assert used or guard.seen, f"guard {key!r} is used nowhere and shows nowhere: remove it"
        assert 0 < len(guard.releases()) < len(SEAM_CHECKED), f"guard {key!r} holds for {sorted(guard.releases())}"


def test_guards_hold_where_declared():
    assert GUARDS["get_mixture_of_experts_model"].releases() == {"0.30.0", "0.32.0", "0.33.0"}
    assert GUARDS["add_model_name"].releases() == {"0.32.0", "0.33.0"}
    assert GUARDS["should_record_tensor"].releases() == {"0.33.0"}
    assert GUARDS["cpu"].releases() == {"0.30.0", "0.32.0"}
    assert guards.since("0.30.0")("0.31.2+cpu") and not guards.since("0.30.0")("0.26.0+cu130")


# --------------------------------------------------------------------------- the MoE model finder


@pytest.mark.vllm
def test_the_moe_model_is_found_alike_in_both_forms(monkeypatch):
    """0.26.0's form (what its runners inline) and 0.30+'s get_mixture_of_experts_model give
    the same answer for every kind of model, on vLLM's real interface classes."""
    import torch
    from vllm.model_executor.models.interfaces import MixtureOfExperts, SupportsMultiModal

    from vllm_eplb.integration.moe_model import mixture_of_experts_model

    class Moe(torch.nn.Module, MixtureOfExperts):
        def __init__(self, layers: int):
            super().__init__()
            self.num_moe_layers = layers

    class Multimodal(torch.nn.Module, SupportsMultiModal):
        def __init__(self, language_model):
            super().__init__()
            self.lm = language_model

        def get_language_model(self):
            if self.lm is None:
                raise NotImplementedError
            return self.lm

    moe = Moe(2)
    wrapped = Multimodal(moe)
    cases = [(moe, moe), (Moe(0), None), (wrapped, moe), (Multimodal(torch.nn.Linear(2, 2)), None),
             (Multimodal(None), None), (torch.nn.Linear(2, 2), None)]
    assert guards.holds("get_mixture_of_experts_model")  # the venv's vLLM (0.30+)
    for release in ("0.26.0", "0.32.0"):
        monkeypatch.setattr(guards, "running_release", lambda release=release: release)
        assert guards.holds("get_mixture_of_experts_model") == (release != "0.26.0")
        for model, want in cases:
            assert mixture_of_experts_model(model) is want, (release, model)
