"""Reading a vLLM release's source without importing it: the names a module or class body
binds. Shared by the static seam check (tools/seams.py) and the patch tools
(tools/upstream.py)."""

from __future__ import annotations

import ast


def bindings(body: list) -> dict[str, list]:
    """Names bound at this level (defs, classes, assignments, imports), descending into
    top-level if/try blocks (vLLM picks implementations per platform that way)."""
    out: dict[str, list] = {}
    for node in body:
        names = []
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names = [node.name]
        elif isinstance(node, ast.Assign):
            names = [t.id for t in node.targets if isinstance(t, ast.Name)]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names = [node.target.id]
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [(a.asname or a.name).split(".")[0] for a in node.names]
        elif isinstance(node, (ast.If, ast.Try)):
            for sub in (node.body, getattr(node, "orelse", []), *[h.body for h in getattr(node, "handlers", [])]):
                for k, v in bindings(sub).items():
                    out.setdefault(k, []).extend(v)
        for n in names:
            out.setdefault(n, []).append(node)
    return out
