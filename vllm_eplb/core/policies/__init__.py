"""Placement policies: the built-in ones, and third-party ones installed as plug-ins.

Importing this package registers the built-ins ("deepseek", "greedy", "min-move").
Other packages add policies through the entry-point group `vllm_eplb.policies`:

    # the plug-in's pyproject.toml
    [project.entry-points."vllm_eplb.policies"]
    round-robin = "eplb_round_robin:RoundRobinPolicy"

The target is a subclass of `Policy` (base.py); the entry point's name is the name
`"policy"` selects in eplb.json. Plug-ins are loaded on first use of `policy_names()`
or `get_policy()`, in every process that plans (the planner child process included),
so an installed package is all it takes. See examples/round_robin_policy/.
"""

from __future__ import annotations

import logging
from importlib import metadata

from . import base
from .base import PlanInput, Policy, keep_in_place, register_policy
from . import deepseek, greedy, min_move  # noqa: F401  (register "deepseek", "greedy", "min-move")

ENTRY_POINT_GROUP = "vllm_eplb.policies"

log = logging.getLogger("vllm.eplb")

BUILTIN = frozenset(base._REGISTRY)
# plug-in name -> why it could not be used (import error, not a Policy, clashes with a
# built-in): reported when that name is asked for, instead of "unknown policy"
_broken: dict[str, str] = {}
_loaded = False


def _entry_points() -> list:
    eps = metadata.entry_points()
    if hasattr(eps, "select"):  # Python >= 3.10
        return list(eps.select(group=ENTRY_POINT_GROUP))
    return list(eps.get(ENTRY_POINT_GROUP, ()))  # pragma: no cover


def load_plugins() -> None:
    """Register every installed plug-in policy, once per process. A broken plug-in is
    logged and remembered, never fatal: the other policies stay usable."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for ep in _entry_points():
        if ep.name in BUILTIN:
            # a plug-in must not silently change what a built-in name plans
            _broken[ep.name] = f"plug-in {ep.value!r} uses the built-in name {ep.name!r}; ignored"
            log.warning("EPLB policy plug-in: %s", _broken[ep.name])
            continue
        try:
            cls = ep.load()
        except Exception as exc:  # any import-time failure of third-party code
            _broken[ep.name] = f"plug-in {ep.value!r} failed to import: {type(exc).__name__}: {exc}"
            log.warning("EPLB policy plug-in %r: %s", ep.name, _broken[ep.name])
            continue
        if not (isinstance(cls, type) and issubclass(cls, Policy)):
            _broken[ep.name] = f"plug-in {ep.value!r} is not a subclass of vllm_eplb.core.policies.Policy"
            log.warning("EPLB policy plug-in %r: %s", ep.name, _broken[ep.name])
            continue
        register_policy(ep.name)(cls)


def policy_names() -> list[str]:
    """Every usable policy: built-ins and installed plug-ins, sorted."""
    load_plugins()
    return base.policy_names()


def plugin_names() -> list[str]:
    """The installed plug-in policies that loaded."""
    load_plugins()
    return sorted(set(base._REGISTRY) - BUILTIN)


def broken_reason(name: str) -> str:
    """Why an installed plug-in of that name cannot be used, or "" (for config errors)."""
    load_plugins()
    return "" if name in base._REGISTRY else _broken.get(name, "")


def get_policy(name: str, **options) -> Policy:
    """A policy by name; options a policy does not take are ignored (e.g. tolerance)."""
    load_plugins()
    if name in _broken and name not in base._REGISTRY:
        raise ValueError(f"policy {name!r}: {_broken[name]}")
    if name not in base._REGISTRY:
        raise ValueError(f"unknown policy {name!r}; choose one of the installed policies: {', '.join(policy_names())}")
    return base.get_policy(name, **options)


__all__ = [
    "ENTRY_POINT_GROUP",
    "broken_reason",
    "PlanInput",
    "Policy",
    "get_policy",
    "keep_in_place",
    "load_plugins",
    "plugin_names",
    "policy_names",
    "register_policy",
]
