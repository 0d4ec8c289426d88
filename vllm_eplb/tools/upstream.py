"""Upstream vLLM source: fetch a release's sdist, check and apply vllm-eplb's patches.

    python -m vllm_eplb.tools.upstream check [--version V]          # V's patches apply to V's sdist, patched files compile
    python -m vllm_eplb.tools.upstream check --all                  # every patched release
    python -m vllm_eplb.tools.upstream check --kind tests [--src DIR] # the test patches against V's tests/
    python -m vllm_eplb.tools.upstream apply SRC_DIR [--version V]  # apply V's patches to a vLLM V tree
    python -m vllm_eplb.tools.upstream fetch [--version V]          # print the path of the extracted sdist

The patches of a kind (vllm: vLLM's source, tests: its tests) are one series,
patches/<kind>/series; a release takes each patch its platforms need, its own copy
(patches/<kind>/<release>/) where it has one. V defaults to the installed vLLM's release if
it has patches, else the primary one (vllm_eplb/compat/versions.py); sdists are fetched by
vllm_eplb/compat/sdist.py.
"""

from __future__ import annotations

import argparse
import os
import py_compile
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from vllm_eplb.compat.sdist import ROOT, default_version, fetch_sdist
from vllm_eplb.compat.source import bindings
from vllm_eplb.compat.versions import PATCHED, platforms_of

PATCHES = ROOT / "patches"
KINDS = ("vllm", "tests")


def series(kind: str) -> list[tuple[str, str]]:
    """(patch file name, platform or "any") of patches/<kind>/series, in the order they apply."""
    out = []
    for line in (PATCHES / kind / "series").read_text().splitlines():
        words = line.split("#", 1)[0].split()
        if words:
            out.append((words[0], words[1] if len(words) > 1 else "any"))
    return out


def patch_files(kind: str, version: str | None = None) -> list[Path]:
    """The series of `kind` (vllm or tests) for a release, in order: every patch its platforms
    take, its own copy where it has one. Empty for a release not declared patched."""
    version = version or default_version()
    if version not in PATCHED:
        return []
    platforms = platforms_of(version)
    own = PATCHES / kind / version
    return [
        own / name if (own / name).exists() else PATCHES / kind / name
        for name, platform in series(kind)
        if platform == "any" or platform in platforms
    ]


def is_own_copy(patch: Path) -> bool:
    """Is this a release's own copy of a patch of the series (patches/<kind>/<release>/)?"""
    return patch.parent.parent.parent == PATCHES


def layout_problems(kind: str) -> list[str]:
    """How patches/<kind>/ disagrees with its series and the declared releases (empty: it agrees)."""
    folder = PATCHES / kind
    names = [name for name, _ in series(kind)]
    problems = [f"patches/{kind}/series names {n} twice" for n in sorted({n for n in names if names.count(n) > 1})]
    problems += [f"patches/{kind}/series names {n}, which is not in patches/{kind}/" for n in names if not (folder / n).exists()]
    problems += [f"patches/{kind}/{p.name} is not in patches/{kind}/series" for p in sorted(folder.glob("*.patch"))
                 if p.name not in names]
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        if sub.name not in PATCHED:
            problems.append(f"patches/{kind}/{sub.name}/ is no release declared patched ({', '.join(PATCHED)})")
        problems += [f"patches/{kind}/{sub.name}/{p.name} is no patch of patches/{kind}/series"
                     for p in sorted(sub.iterdir()) if p.name not in names]
    return problems


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
            raise SystemExit(f"{_shown(p)} does not apply to {tree}: {r.stderr.strip()}")
        if not check_only:
            unchanged = [f for f, text in before.items() if _read(tree / f) == text]
            if unchanged:
                raise SystemExit(f"{_shown(p)} left {unchanged} unchanged in {tree}")


def _shown(patch: Path) -> str:
    """patches/<kind>/..., as the series names it."""
    return str(patch.relative_to(PATCHES.parent))


def _read(path: Path) -> str | None:
    return path.read_text() if path.exists() else None


def _applies(patch: Path, tree: Path) -> bool:
    env = {**os.environ, "GIT_CEILING_DIRECTORIES": str(Path(tree).resolve().parent)}
    return subprocess.run(["git", "apply", "--check", str(patch)], cwd=tree, capture_output=True, env=env).returncode == 0


def check(src: Path, version: str, kind: str = "vllm", subdir: str = "vllm") -> list[str]:
    """Apply the series of `kind` for `version` to a scratch copy of src/subdir, in order;
    compile what changed. A release's own copy of a patch is refused where the series' one
    would do (an override no longer needed)."""
    patches = patch_files(kind, version)
    if not patches:
        raise SystemExit(f"vLLM {version} has no patches in patches/{kind}/series (patched: {', '.join(PATCHED)})")
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp)
        shutil.copytree(src / subdir, tree / subdir)
        for p in patches:
            shared = PATCHES / kind / p.name
            if is_own_copy(p) and _applies(shared, tree):
                raise SystemExit(f"{_shown(p)} is not needed: {_shown(shared)} applies to vLLM {version}; remove the copy")
            apply([p], tree)
        lines = []
        for p in patches:
            for f in touched_files(p):
                py_compile.compile(str(tree / f), doraise=True)
            lines.append(f"ok  {p.relative_to(PATCHES / kind)}: {', '.join(touched_files(p))}")
        return lines


def changed_definitions(src: Path, version: str, kind: str = "vllm") -> set[tuple[str, str]]:
    """(file, qualname) of every definition of the release's source that the patches of
    `version` change: module-level names and class members present before patching whose
    code differs after (names the patches only add, like a helper or an import of
    vllm-eplb, change nothing vLLM had)."""
    import ast

    def defs(tree: ast.Module) -> dict[str, str]:
        out = {}
        for name, nodes in bindings(tree.body).items():
            out[name] = "\n".join(ast.dump(n) for n in nodes if not isinstance(n, (ast.If, ast.Try)))
            for n in nodes:
                if isinstance(n, ast.ClassDef):
                    for member, mnodes in bindings(n.body).items():
                        out[f"{name}.{member}"] = "\n".join(ast.dump(m) for m in mnodes)
        return out

    patches = patch_files(kind, version)
    changed = set()
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp)
        shutil.copytree(src / "vllm", tree / "vllm")
        apply(patches, tree)
        for f in sorted({f for p in patches for f in touched_files(p)}):
            before = defs(ast.parse((src / f).read_text()))
            after = defs(ast.parse((tree / f).read_text()))
            changed |= {(f, name) for name, code in before.items() if after.get(name) != code}
    # a class whose member changed is reported through the member
    return {(f, n) for f, n in changed if not any(g == f and m.startswith(n + ".") for g, m in changed)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch")
    c = sub.add_parser("check")
    c.add_argument("--src", type=Path, help="an extracted vLLM source tree of that release (default: fetch the sdist)")
    c.add_argument("--all", action="store_true", help="every release declared patched")
    c.add_argument(
        "--kind", choices=("vllm", "tests"), default="vllm", help="patches/vllm/ (vLLM's source) or patches/tests/ (its tests)"
    )
    a = sub.add_parser("apply")
    a.add_argument("tree", type=Path, help="a vLLM source tree of that release (the folder holding vllm/)")
    for p in (f, c, a):
        p.add_argument("--version", help="vLLM release (default: the installed one if patched, else the primary)")
    args = ap.parse_args(argv)
    version = args.version or default_version()
    if args.cmd == "fetch":
        print(fetch_sdist(version))
    elif args.cmd == "check":
        kind, subdir = args.kind, "vllm" if args.kind == "vllm" else "tests"
        problems = layout_problems(kind)
        if problems:
            raise SystemExit("\n".join(problems))
        for v in (PATCHED if args.all else [version]):
            src = args.src or fetch_sdist(v)
            if not (src / subdir).is_dir():
                raise SystemExit(f"--src {src}: no {subdir}/ there; give vLLM {v}'s extracted sdist")
            for line in check(src, v, kind=kind, subdir=subdir):
                print(line)
            patches = patch_files(kind, v)
            print(f"all {len(patches)} patches of patches/{kind}/series for vLLM {v} apply cleanly "
                  f"({sum(map(is_own_copy, patches))} of them its own copy) to {src}")
    else:
        apply(patch_files("vllm", version), args.tree)
        print(f"applied {len(patch_files('vllm', version))} patches for vLLM {version} to {args.tree}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
