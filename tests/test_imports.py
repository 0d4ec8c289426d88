"""The package's import graph (every import, at module level or inside a function, read
with `ast`): no import circle but the ones listed, and the core imports nothing of vLLM; the
planner process loads no PyTorch."""

import ast
import os
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "vllm_eplb"
ROOT = str(PACKAGE.parent)

# Circles still in the house, each with why; a circle not listed fails, a listed one that
# is gone must be removed from here.
KNOWN_CIRCLES: set[tuple[str, ...]] = set()


def _modules() -> dict[str, Path]:
    out = {}
    for p in PACKAGE.rglob("*.py"):
        parts = p.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def _imports(name: str, path: Path, modules) -> set[str]:
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                head = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(head + ([base] if base else []))
            out |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return out


def _graph():
    modules = _modules()
    return {m: {d for d in _imports(m, p, modules) if d in modules and d != m} for m, p in modules.items()}


def _circles(graph) -> set[tuple[str, ...]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), set()

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.add(tuple(sorted(comp)))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_circle_but_the_known_ones():
    circles = _circles(_graph())
    assert circles - KNOWN_CIRCLES == set(), f"new import circle(s): {sorted(circles - KNOWN_CIRCLES)}"
    assert KNOWN_CIRCLES - circles == set(), f"gone, remove from KNOWN_CIRCLES: {sorted(KNOWN_CIRCLES - circles)}"


def test_the_circle_finder_finds_one():
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == {("a", "b", "c")}


def test_core_and_release_wing_import_no_vllm():
    """The core never imports vLLM (it runs under the harness and the benchmarks); the
    release wing reads vLLM's source as text, never imports it."""
    for name, path in _modules().items():
        if name.startswith(("vllm_eplb.core", "vllm_eplb.compat")):
            bad = {m for m in _imports(name, path, {}) if m == "vllm" or m.startswith("vllm.")}
            assert not bad, f"{path}: imports {sorted(bad)}"


def _loaded_after(code: str, module: str) -> bool:
    """Whether `module` is loaded after running `code` in a fresh interpreter."""
    r = subprocess.run([sys.executable, "-c", f"import sys\n{code}\nsys.exit({module!r} in sys.modules)"],
                       capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode in (0, 1), r.stderr[-2000:]
    return r.returncode == 1


def test_the_planner_process_runs_without_pytorch():
    """A planner process unpickles its jobs (core.planner, the policies, the cost model,
    a Topology) and nothing of that loads PyTorch: each rank's planner process starts in
    a fraction of a second and holds no PyTorch memory."""
    code = ("from vllm_eplb.core.planner_process import child\n"
            "import vllm_eplb.core.planner, vllm_eplb.core.policies, vllm_eplb.core.cost_model, vllm_eplb.core.placement")
    assert not _loaded_after(code, "torch"), "the planner process imports torch"


def test_the_engine_side_imports_no_numba():
    """min-move's loops are compiled with numba in the planner process only: the plugin, the
    policies and the balancer load no numba in a vLLM worker (vLLM's CPU platform walks every
    loaded module when a worker starts, and numba's objects made the engine die there)."""
    code = ("import vllm_eplb.core.policies, vllm_eplb.core.balancer, vllm_eplb.integration.plugin\n"
            "from vllm_eplb.core.policies import get_policy\n"
            "get_policy('min-move')")
    assert not _loaded_after(code, "numba"), "the engine side imports numba"
    assert _loaded_after("from vllm_eplb.core.policies.min_move_jit import warm_up", "numba")  # the check can fail
