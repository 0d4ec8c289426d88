"""Run upstream vLLM's EPLB tests twice: as shipped (against upstream) and with the
release's test patches applied (patches/tests/series: against vllm-eplb), and print both
columns side by side.

    python -m vllm_eplb.tools.upstream_tests [--markdown docs/upstream_tests.md] [-k EXPR]
        [--release V] [--src DIR]

The tests come from the sdist of the installed vLLM release (test files change signatures
between releases), fetched through pip (nothing of it is committed); each column is a
fresh copy of its `tests/` tree. --release V takes release V's tests and test
patches instead (against whatever vLLM is installed); --src DIR takes the tests
from DIR, an extracted sdist or a folder holding its `tests/` and `pyproject.toml`, with no
pip (a machine without network). The child pytest finds vllm-eplb in this tree first,
then the caller's PYTHONPATH. --markdown rewrites that release's section of the file.
Exit status 1 if any test fails or errors in the vllm-eplb column, or if a test runs in
neither column without a reason listed in FILES below.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from vllm_eplb.compat.versions import PATCHED, base_version

from vllm_eplb.compat.sdist import DEFAULT_CACHE, ROOT, fetch_sdist, installed_version

from .upstream import apply, patch_files


@dataclass(frozen=True)
class TestFile:
    path: str
    subject: str  # what it tests
    replaced: bool  # does vllm-eplb replace that subject?
    run_here: bool  # can it run on a CPU-only machine?
    note: str = ""


FILES = [
    TestFile("tests/distributed/test_eplb_algo.py", "placement policy, logical maps, load stats", True, True),
    TestFile("tests/distributed/test_eplb_utils.py", "map commit (all layers, one layer)", True, True),
    TestFile(
        "tests/distributed/test_eplb_execute.py",
        "expert weight rearrangement across 2 and 4 ranks, per-layer async transfer",
        True,
        True,
        "ported to CPU ranks over gloo; the torch_nccl/pynccl cases skip on CPU (vllm-eplb takes the same gloo "
        "path for every communicator name there); nixl needs NIXL",
    ),
    TestFile(
        "tests/distributed/test_eplb_fused_moe_layer.py",
        "rearranging a FusedMoE layer's weights and block scales",
        True,
        True,
        "ported to CPU ranks over gloo",
    ),
    TestFile(
        "tests/v1/worker/test_gpu_model_runner_v2_eplb.py",
        "V2 model runner wiring of the EPLB state",
        True,
        True,
        "vllm-eplb's state under the recording fake; upstream's async thread never starts",
    ),
    TestFile(
        "tests/distributed/test_eplb_quant_scale_consistency.py",
        "quantized MoE parameters stay expert-major",
        False,
        True,
        "model-side layout, unchanged by vllm-eplb; two cases need Blackwell (SM100)",
    ),
    TestFile(
        "tests/distributed/test_eplb_migration_scheduler.py",
        "upstream's conflict-free migration batches (0.32+)",
        False,
        True,
        "upstream's scheduler, unchanged by vllm-eplb (which refuses enable_migration_batching): same in both columns",
    ),
    TestFile(
        "tests/distributed/test_eplb_events.py",
        "CpuGpuEvent, upstream's async handshake",
        False,
        False,
        "needs CUDA events and streams (fails, does not skip, without CUDA); vllm-eplb does not use it",
    ),
    TestFile(
        "tests/distributed/test_eplb_fused_moe_layer_dep_nvfp4.py",
        "DP+EP rearrangement of NVFP4 MoE layers with forward checks",
        True,
        False,
        "needs 2-4 Blackwell GPUs and FlashInfer NVFP4 kernels",
    ),
    TestFile(
        "tests/distributed/test_eplb_spec_decode.py",
        "GSM8K accuracy with EPLB and speculative decoding",
        True,
        False,
        "needs 4 GPUs of 80 GB, lm_eval and models from the hub",
    ),
]

WORK = DEFAULT_CACHE.parent / "upstream-tests"


def prepare(src: Path, column: str, version: str) -> Path:
    dest = WORK / version / column
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    shutil.copytree(src / "tests", dest / "tests")
    shutil.copy(src / "pyproject.toml", dest / "pyproject.toml")
    if column == "vllm-eplb":
        apply(patch_files("tests", version), dest)
    return dest


def run_column(dest: Path, files: list[str], keyword: str | None) -> dict[str, tuple[str, str]]:
    """pytest in dest; {test id: (outcome, message)}."""
    junit = dest / "junit.xml"
    # a file that does not import (another release's names) fails alone, not the whole run
    cmd = [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "--continue-on-collection-errors",
           f"--junitxml={junit}", *files]
    if keyword:
        cmd += ["-k", keyword]
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    env["PYTHONPATH"] = child_pythonpath(os.environ.get("PYTHONPATH", ""))
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=dest, env=env, capture_output=True, text=True)
    (dest / "pytest.log").write_text(proc.stdout + proc.stderr)
    print(f"  {dest.name}: pytest exit {proc.returncode} in {time.monotonic() - t0:.0f}s (log: {dest / 'pytest.log'})")
    results = {}
    if not junit.exists():
        return results
    for case in ET.parse(junit).getroot().iter("testcase"):
        classname, name = case.get("classname", ""), case.get("name", "")
        # a collection error is reported with the module as its name and no class
        tid = f"{classname.replace('.', '/')}.py::{name}" if classname else f"{name.replace('.', '/')}.py"
        outcome, msg = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "FAILED", "error": "ERROR", "skipped": "skipped"}[child.tag]
                msg = (child.get("message") or "").splitlines()[0][:110] if child.get("message") else ""
        results[tid] = (outcome, msg)
    return results


def child_pythonpath(inherited: str) -> str:
    """This tree first, so the patched tests import its vllm_eplb (not an installed copy of
    another checkout), then the caller's entries (a vLLM that is not installed, say)."""
    rest = [p for p in inherited.split(os.pathsep) if p and Path(p).resolve() != ROOT]
    return os.pathsep.join([str(ROOT), *rest])


def installed_release() -> str | None:
    """The release of the vLLM the child pytest imports: package metadata, else (a vLLM on
    PYTHONPATH without it) its __version__, read in a child process."""
    version = installed_version()
    if version is not None:
        return version
    env = {**os.environ, "PYTHONPATH": child_pythonpath(os.environ.get("PYTHONPATH", ""))}
    probe = "import vllm; print(vllm.__version__)"
    r = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    lines = r.stdout.strip().splitlines()
    return base_version(lines[-1]) if r.returncode == 0 and lines else None


def check_child_imports() -> None:
    """The patched tests import vllm-eplb's compat API and runner state: find out now, in
    one line, if they cannot (a machine without vllm-eplb's dependencies), rather than as
    an ImportError in every file of the vllm-eplb column."""
    env = {**os.environ, "PYTHONPATH": child_pythonpath(os.environ.get("PYTHONPATH", ""))}
    probe = "import vllm_eplb.compat.vllm_api, vllm_eplb.integration.runner_state"
    r = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise SystemExit(
            f"vllm-eplb does not import under {sys.executable}: {last}; install the dependencies in "
            f"{ROOT / 'pyproject.toml'} (transitions, numpy, pydantic, prometheus_client)"
        )


def machine() -> str:
    """What the tests ran on, for the results' header: GPUs as torch sees them, cores."""
    probe = "import torch; n = torch.cuda.device_count(); print(n, torch.cuda.get_device_name(0) if n else '')"
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    count, _, name = r.stdout.strip().partition(" ")
    if r.returncode == 0 and count.isdigit() and int(count) > 0:
        return f"{count} x {name} ({os.cpu_count()} cores)"
    return f"CPU-only machine ({os.cpu_count()} cores)"


def tests_from(src: Path) -> Path:
    """--src: an extracted sdist or a folder with its tests/ and pyproject.toml."""
    missing = [name for name in ("tests", "pyproject.toml") if not (src / name).exists()]
    if missing:
        raise SystemExit(
            f"--src {src}: no {' or '.join(missing)} there; give an extracted vLLM sdist "
            "(python -m vllm_eplb.tools.upstream fetch --version V prints one) "
            "or a folder holding its tests/ and pyproject.toml"
        )
    return src


def render(unpatched: dict, patched: dict) -> list[str]:
    lines = ["| test | upstream, as shipped | against vllm-eplb (patched) |", "| --- | --- | --- |"]
    for tid in sorted(set(unpatched) | set(patched)):
        cells = []
        for col in (unpatched, patched):
            outcome, msg = col.get(tid, ("not run", ""))
            cells.append(outcome + (f": {msg}" if msg and outcome != "passed" else ""))
        lines.append(f"| `{tid}` | {cells[0]} | {cells[1]} |")
    return lines


def summary(results: dict) -> str:
    counts: dict[str, int] = {}
    for outcome, _ in results.values():
        counts[outcome] = counts.get(outcome, 0) + 1
    return ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "none"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--markdown", type=Path, help="also write the results table to this file")
    ap.add_argument("-k", dest="keyword", help="pytest -k expression (both columns)")
    ap.add_argument("--release", help="whose tests and test patches to run (default: the installed vLLM's)")
    ap.add_argument(
        "--src",
        type=Path,
        help="that release's extracted sdist, or a folder with its tests/ and pyproject.toml (default: fetch it with pip)",
    )
    args = ap.parse_args(argv)

    installed = installed_release()
    version = args.release or installed
    if version is None or not patch_files("tests", version):
        how = "pass --release" if version is None else "pick one"
        print(f"vLLM {version} has no test patches in patches/tests/series (installed vLLM: {installed}): {how} of "
              f"{', '.join(PATCHED)}", file=sys.stderr)
        return 1
    src = tests_from(args.src) if args.src else fetch_sdist(version)
    check_child_imports()
    files = [f for f in FILES if (src / f.path).exists()]
    here = [f.path for f in files if f.run_here]
    print(f"upstream vLLM {version} EPLB tests from {src}")
    if installed != version:
        print(f"note: against the installed vLLM {installed}, not {version}: failures may be that difference")
    unpatched = run_column(prepare(src, "upstream", version), here, args.keyword)
    patched = run_column(prepare(src, "vllm-eplb", version), here, args.keyword)

    table = render(unpatched, patched)
    print("\n".join(table))
    print(f"\nupstream as shipped: {summary(unpatched)}")
    print(f"against vllm-eplb:   {summary(patched)}")
    for f in files:
        if not f.run_here:
            print(f"not run here: {f.path}: {f.note}")

    bad = [tid for tid, (o, _) in patched.items() if o in ("FAILED", "ERROR")]
    if not patched:
        bad.append("the vllm-eplb column produced no results")
    if args.markdown:
        write_markdown(args.markdown, version, files, unpatched, patched, installed)
    if bad:
        print("\nFAILED against vllm-eplb:\n  " + "\n  ".join(bad))
        return 1
    return 0


HEADER = """# Upstream vLLM EPLB tests against vllm-eplb

Generated by `python -m vllm_eplb.tools.upstream_tests --markdown docs/upstream_tests.md`, one
section per vLLM release (run with that release installed: `bash scripts/test.sh` runs it for
0.32.0 in ./.venv and for 0.30.0 in ./.venv-vllm-0.30.0; a GPU release is run where it is
installed, with `--release V --src DIR` on a machine without network). The tests come from
that release's sdist; the vllm-eplb column runs them with that release's test patches
applied (`patches/tests/series`, its own copies in `patches/tests/<release>/`), which point
them at `vllm_eplb.compat.vllm_api` (vllm-eplb's policy, map commit and transfer engine
behind upstream's function names) and port the multi-rank ones to CPU processes joined by
gloo when there is no GPU.
"""


def write_markdown(
    path: Path, version: str, files: list[TestFile], unpatched: dict, patched: dict, installed: str | None
) -> None:
    """Rewrite this release's section of `path`, keeping the others."""
    against = "" if installed == version else f" Run against the installed vLLM {installed}, not {version}."
    out = [
        f"<!-- BEGIN {version} -->",
        f"## vLLM {version}",
        "",
        f"{machine()}, {time.strftime('%Y-%m-%d')}; the test patches of {version} (`patches/tests/series`).{against}",
        "",
        "### Files",
        "",
        "| file | subject | replaced by vllm-eplb | runs here | note |",
        "| --- | --- | --- | --- | --- |",
    ]
    for f in files:
        out.append(f"| `{f.path}` | {f.subject} | {'yes' if f.replaced else 'no'} | {'yes' if f.run_here else 'no'} | {f.note} |")
    out += ["", "### Results", "", f"upstream as shipped: {summary(unpatched)}; against vllm-eplb: {summary(patched)}.", ""]
    out += render(unpatched, patched)
    out.append(f"<!-- END {version} -->")
    section = "\n".join(out)
    old = path.read_text() if path.exists() else ""
    sections = {}
    for chunk in old.split("<!-- BEGIN ")[1:]:
        v = chunk.split(" -->", 1)[0]
        sections[v] = "<!-- BEGIN " + chunk.split(f"<!-- END {v} -->", 1)[0] + f"<!-- END {v} -->"
    sections[version] = section
    ordered = sorted(sections, key=lambda v: tuple(int(x) for x in v.split(".")), reverse=True)
    path.write_text(HEADER + "\n" + "\n\n".join(sections[v] for v in ordered) + "\n")


if __name__ == "__main__":
    sys.exit(main())
