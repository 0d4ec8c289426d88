"""Upstream vLLM 0.30.0 source: fetch its sdist, check and apply vllm-eplb's patches.

    python -m vllm_eplb.tools.upstream check            # every patch applies to the sdist, patched files compile
    python -m vllm_eplb.tools.upstream apply SRC_DIR    # apply patches/vllm/*.patch to a vLLM 0.30.0 tree
    python -m vllm_eplb.tools.upstream fetch            # print the path of the extracted sdist

The sdist comes from PyPI through pip, never committed: pip builds its metadata, so
setuptools-scm and setuptools-rust must be installed (the test extra has them), and
VLLM_TARGET_DEVICE=empty keeps it from compiling anything.
"""

from __future__ import annotations

import argparse
import os
import py_compile
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

VLLM_VERSION = "0.30.0"
ROOT = Path(__file__).resolve().parents[2]
PATCHES = ROOT / "patches"
DEFAULT_CACHE = ROOT / ".work" / "upstream"


def fetch_sdist(cache: Path = DEFAULT_CACHE) -> Path:
    """Download (once) and extract the vLLM sdist; return the extracted source root."""
    cache.mkdir(parents=True, exist_ok=True)
    src = cache / f"vllm-{VLLM_VERSION}"
    if (src / "vllm" / "__init__.py").exists():
        return src
    tarball = cache / f"vllm-{VLLM_VERSION}.tar.gz"
    if not tarball.exists():
        env = {**os.environ, "VLLM_TARGET_DEVICE": "empty", "VLLM_VERSION_OVERRIDE": VLLM_VERSION}
        cmd = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "--no-build-isolation",
               "-q", f"vllm=={VLLM_VERSION}", "-d", str(cache)]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if r.returncode != 0 or not tarball.exists():
            raise SystemExit(f"could not fetch the vLLM {VLLM_VERSION} sdist with pip:\n{r.stdout}\n{r.stderr}")
    with tarfile.open(tarball) as tf:
        tf.extractall(cache, filter="data")
    return src


def patch_files(kind: str) -> list[Path]:
    return sorted((PATCHES / kind).glob("*.patch"))


def touched_files(patch: Path) -> list[str]:
    return [line[6:].strip() for line in patch.read_text().splitlines() if line.startswith("+++ b/")]


def apply(patches: list[Path], tree: Path, check_only: bool = False) -> None:
    """Apply in order with `git apply`; raise on failure.

    git apply run inside some repository's work tree patches paths relative to that
    repository and silently skips the rest: GIT_CEILING_DIRECTORIES keeps it from
    finding one above `tree`, and every touched file is checked to have changed."""
    env = {**os.environ, "GIT_CEILING_DIRECTORIES": str(Path(tree).resolve().parent)}
    for p in patches:
        before = {f: _read(tree / f) for f in touched_files(p)}
        cmd = ["git", "apply", "--check" if check_only else "--whitespace=nowarn", str(p)]
        r = subprocess.run(cmd, cwd=tree, capture_output=True, text=True, env=env)
        if r.returncode != 0:
            raise SystemExit(f"{p.relative_to(ROOT)} does not apply to {tree}: {r.stderr.strip()}")
        if not check_only:
            unchanged = [f for f, text in before.items() if _read(tree / f) == text]
            if unchanged:
                raise SystemExit(f"{p.relative_to(ROOT)} left {unchanged} unchanged in {tree}")


def _read(path: Path) -> str | None:
    return path.read_text() if path.exists() else None


def check(src: Path, kind: str = "vllm", subdir: str = "vllm") -> list[str]:
    """Apply every patch of `kind` to a scratch copy of src/subdir; compile what changed."""
    patches = patch_files(kind)
    if not patches:
        raise SystemExit(f"no patches in {PATCHES / kind}")
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp)
        shutil.copytree(src / subdir, tree / subdir)
        apply(patches, tree)
        lines = []
        for p in patches:
            for f in touched_files(p):
                py_compile.compile(str(tree / f), doraise=True)
            lines.append(f"ok  {p.name}: {', '.join(touched_files(p))}")
        return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("fetch")
    c = sub.add_parser("check")
    c.add_argument("--src", type=Path, help="an extracted vLLM 0.30.0 source tree (default: fetch the sdist)")
    a = sub.add_parser("apply")
    a.add_argument("tree", type=Path, help="a vLLM 0.30.0 source tree (the folder holding vllm/)")
    args = ap.parse_args(argv)
    if args.cmd == "fetch":
        print(fetch_sdist())
    elif args.cmd == "check":
        src = args.src or fetch_sdist()
        for line in check(src):
            print(line)
        print(f"all {len(patch_files('vllm'))} patches in patches/vllm apply cleanly to vLLM {VLLM_VERSION} ({src})")
    else:
        apply(patch_files("vllm"), args.tree)
        print(f"applied {len(patch_files('vllm'))} patches to {args.tree}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
