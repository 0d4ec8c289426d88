"""Where declared vLLM releases differ, declared once: the guards. No vLLM import (the
running release is read from the vLLM its callers imported).

vllm-eplb reads vLLM names that not every declared release has (`get_mixture_of_experts_model`
came in 0.30.0; 0.26.0 names the MoE layer factory `FusedMoE`) and runs code paths only one
platform's releases need (the CPU hooks). Each such difference is a guard of GUARDS, named
for what differs, with the declared releases it holds for. Code reads a guarded name only
under its guard, in one of two forms that the release check (tools/vllm_names.py) reads:

    if holds("get_mixture_of_experts_model"):   # or `a if holds(...) else b`
        ...  # checked against the releases of the guard only
    else:
        ...  # checked against every other declared release

    @only_where("cpu")
    def hook_cpu_router(): ...   # the whole body: the guard's releases only

Nothing else exempts a name: a `getattr(x, "a", None)` or `hasattr` fallback is a plain
read of `x.a`, checked against every release it may run on, so a name one release lacks
fails the check until it is guarded here.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable

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

    def releases(self) -> frozenset[str]:
        """The declared releases it holds for."""
        return frozenset(r.version for r in RELEASES if self.rule(r.version))


GUARDS: dict[str, Guard] = {
    "get_mixture_of_experts_model": Guard(
        since("0.30.0"),
        "vllm.model_executor.models.interfaces.get_mixture_of_experts_model: the runners of 0.30.0+ find the "
        "MoE model with it; 0.26.0 has only is_mixture_of_experts and unwraps a multimodal model in each runner",
    ),
    "FusedMoEFactory": Guard(
        since("0.30.0"),
        "vllm.model_executor.layers.fused_moe.layer.FusedMoEFactory: 0.26.0 names the same factory FusedMoE",
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
