"""vLLM general plugin (entry point group `vllm.general_plugins`).

vLLM calls `register()` in every process of a server: the API server (while it
builds its argument parser, before parsing), the engine core and every worker
(before the worker class is resolved). It installs the hooks of hooks.py: all of them, or none with one log line
saying why (an unknown vLLM release, a missing attribute).
Set EPLB_PLUGIN_DISABLE=1 to leave vLLM untouched. (Not VLLM_*: vLLM warns about
variables of its prefix it does not know.)
"""

from __future__ import annotations

import os

_registered = False


def register() -> None:
    global _registered
    if _registered or os.environ.get("EPLB_PLUGIN_DISABLE") == "1":
        return
    _registered = True
    from .hooks import install_all

    install_all()
