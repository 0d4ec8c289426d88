"""The balancer core. Imports nothing from vLLM: it runs under a test harness, a
synthetic benchmark, or vLLM through `vllm_eplb.integration`.

The names below load on first use (PEP 562), not with the package: the planner process
imports only `core.planner` and its policies (numpy), and an eager package import would
load PyTorch there too (about 1.5 s of CPU and 300 MB for every planner process)."""

from __future__ import annotations

import importlib

_WHERE = {
    "Agreement": "agreement",
    "AgreementError": "agreement",
    "new_gloo_group": "agreement",
    "Balancer": "balancer",
    "Comm": "balancer",
    "MoELayout": "balancer",
    "BalancerConfig": "config",
    "ForwardCounter": "pass_clock",
    "PassClock": "pass_clock",
    "RoutingMaps": "routing_maps",
    "Topology": "placement",
    "default_placement": "placement",
    "STATES": "state_machine",
    "TRANSITIONS": "state_machine",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
