"""Where declared vLLM releases differ in what they do, declared once: the guards. No vLLM
import (the running release is read from the vLLM its callers imported).

Names a release spells differently are data in places.py (`renamed`: 0.26.0 names the MoE
layer factory `FusedMoE`, and builds models in `load_model`). What differs beyond a name is a
guard of GUARDS, named for what differs, with the declared releases it holds for:

- a vLLM name vllm-eplb reads that not every declared release has
  (`get_mixture_of_experts_model` came in 0.30.0), or a code path only one platform's
  releases run (the CPU hooks);
- something only some releases ask of vllm-eplb (0.32.0's runners pass `model_name` to
  `add_model`, 0.33.0's V2 warm-up reads `should_record_tensor`): VllmEplbState answers it
  on every release, the guard says where it is asked.

A guard's `seen` is the text in vLLM's source that shows the difference: the static seam
check (tools/seams.py) finds it in exactly the releases the guard holds for, so a new
release that a rule misjudges is named there. Code reads a guarded name only under its
guard, in one of two forms that the release check (tools/vllm_names.py) reads:

    if holds("get_mixture_of_experts_model"):   # or `a if holds(...) else b`
        ...  # checked against the releases of the guard only
    else:
        ...  # checked against every other declared release

    @only_where("cpu")
    def _prepacked_after_reload(setup_kernel): ...   # the whole body: the guard's releases only

Nothing else exempts a name: a `getattr(x, "a", None)` or `hasattr` fallback is a plain
read of `x.a`, checked against every release it may run on, so a name one release lacks
fails the check until it is guarded here.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable

from .places import MOE_INTERFACE, V2_EPLB_STATE
from .versions import RELEASES, base_version, platforms_of


def _key(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in base_version(version).split("."))


def since(first: str) -> Callable[[str], bool]:
    """Releases from `first` on (a later declared release is included without an edit)."""
    return lambda v: _key(v) >= _key(first)


def on_platform(platform: str) -> Callable[[str], bool]:
    """Releases declared for `platform` (versions.RELEASES)."""
    return lambda v: platform in platforms_of(v)


@dataclass(frozen=True)
class Guard:
    rule: Callable[[str], bool]  # release -> does the guard hold there
    why: str
    seen: tuple[str, str] | None = None  # (file, text) of vLLM's source found where the guard holds, and only there

    def releases(self) -> frozenset[str]:
        """The declared releases it holds for."""
        return frozenset(r.version for r in RELEASES if self.rule(r.version))


GUARDS: dict[str, Guard] = {
    "get_mixture_of_experts_model": Guard(
        since("0.30.0"),
        "vllm.model_executor.models.interfaces.get_mixture_of_experts_model: the runners of 0.30.0+ find the "
        "MoE model with it; 0.26.0 has only is_mixture_of_experts and unwraps a multimodal model in each runner",
        seen=(MOE_INTERFACE.file, "def get_mixture_of_experts_model("),
    ),
    "add_model_name": Guard(
        since("0.32.0"),
        "the runners of 0.32.0+ register a speculative-decoding draft MoE model with add_model(..., model_name=...); "
        "VllmEplbState.add_model takes it on every release and balances the first (main) model only",
        seen=(V2_EPLB_STATE.file, "model_name=eplb_draft_model_name("),
    ),
    "should_record_tensor": Guard(
        since("0.33.0"),
        "0.33.0's EPLBController.suppress() (the V2 runner's warm-up) reads the record flag as "
        "EplbState.should_record_tensor; VllmEplbState's property answers it",
        seen=(V2_EPLB_STATE.file, "self.state.should_record_tensor"),
    ),
    "cpu": Guard(
        on_platform("cpu"),
        "code only a CPU server runs: the hooks that reach it are declared for the CPU releases alone "
        "(integration/hooks.py, platform=\"cpu\"), and GPU-only releases moved some of its names",
    ),
}


def running_release() -> str:
    """The release of the vLLM imported in this process ('0.26.0' for '0.26.0+cu130'):
    `holds` is asked by code that runs inside vLLM, after it is imported."""
    vllm = sys.modules.get("vllm")
    if vllm is None:
        raise RuntimeError("vllm_eplb.compat.guards.holds() was asked before vLLM was imported")
    return base_version(vllm.__version__)


def holds(guard: str) -> bool:
    """Does `guard` hold for the vLLM running here? (KeyError: not declared in GUARDS.)"""
    return GUARDS[guard].rule(running_release())


def only_where(guard: str):
    """Declares that the decorated function runs only where `guard` holds (its callers
    make that so; the release check reads its body for those releases only)."""
    GUARDS[guard]  # a typo fails at import, not in the check
    return lambda fn: fn
