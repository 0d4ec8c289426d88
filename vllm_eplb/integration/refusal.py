"""A model vllm-eplb cannot balance is refused while it loads, in the worker processes;
the operator reads why as the last line of `vllm serve`, as for a bad eplb.json.

The `vllm` launcher (cli.py) names a file in EPLB_PLUGIN_REFUSAL before vLLM starts; the
worker that refuses writes its one line there (every rank refuses alike and writes the
same line), and the launcher, when vLLM's start-up fails, prints that line last and exits
with code 2. Under vLLM's own `vllm` command (a GPU install: vllm-eplb ships no launcher
there) the plugin names the file when it builds the engine config and prints the line
last as the process exits (`report_at_exit`; the exit status is vLLM's). Started another
way (`python -m vllm.entrypoints.openai.api_server`), the line is in the worker's error
log above vLLM's own start-up failure.
No vLLM import: the launcher reads this before vLLM is imported.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile

from .config import EplbConfigError

ENV_VAR = "EPLB_PLUGIN_REFUSAL"

DROP = "serve it without --eplb-config"


class ModelRefused(EplbConfigError):
    """The model cannot be balanced: one line naming the architecture, what is missing and
    how to proceed."""

    def __init__(self, arch: str, why: str, fix: str = DROP):
        super().__init__(f"--eplb-config: vllm-eplb cannot balance {arch}: {why}; {fix}")


def refuse(arch: str, why: str, fix: str = DROP) -> ModelRefused:
    """The refusal to raise, its line left for the launcher (when one is waiting for it)."""
    exc = ModelRefused(arch, why, fix)
    path = os.environ.get(ENV_VAR)
    if path:  # every rank writes the same line; each replaces the file whole
        tmp = f"{path}.{os.getpid()}"
        with open(tmp, "w") as fh:
            fh.write(str(exc))
        os.replace(tmp, path)
    return exc


def recorded() -> str | None:
    """In the launcher: the line a worker left, if any."""
    path = os.environ.get(ENV_VAR)
    try:
        with open(path) as fh:  # type: ignore[arg-type]
            return fh.read().strip() or None
    except (TypeError, OSError):
        return None


def report_at_exit() -> None:
    """Under vLLM's own `vllm` command: name a fresh file for the workers (before they start)
    and print the line one of them left, last, when this process exits."""
    if os.environ.get(ENV_VAR):
        return  # the vllm-eplb launcher reads it
    d = tempfile.mkdtemp(prefix="vllm-eplb-")
    os.environ[ENV_VAR] = os.path.join(d, "refusal")

    def report() -> None:
        line = recorded()
        if line:
            print(f"error: {line}", file=sys.stderr)
        shutil.rmtree(d, True)

    atexit.register(report)
