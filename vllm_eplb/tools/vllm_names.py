"""Every vLLM name vllm-eplb's code touches, checked against each declared release's sdist.

Run by the static seam check (`python -m vllm_eplb.tools.seams`, tests/test_seams.py): a
name one declared release lacks is named there, one line each (the defect it was written for:
build_model imported a name 0.26.0 lacks, and every rank died loading the model),

    vllm_eplb/integration/moe_adapter.py:100: vllm.model_executor.models.interfaces:get_mixture_of_experts_model is missing in vLLM 0.26.0

instead of at a user's start-up. Read with `ast` from the code of vllm_eplb/ and benchmarks/
(nothing of either is imported), the names are:

- every `import vllm.x.y [as z]`, `from vllm.x import Y [as Z]`, and
  `importlib.import_module("vllm.x")` with a literal name: the module exists, and Y is bound
  at its top level (def, class, assignment, import; inside top-level if/try too) or is a
  submodule;
- every attribute read or written through a name so imported, as far as it resolves
  statically: `layer.FusedMoEFactory` (a module's global), `MixtureOfExperts.set_eplb_state`
  (a class attribute, inherited ones found through the class's bases), and
  `getattr`/`hasattr`/`setattr` with a literal attribute name (a default given to getattr
  exempts nothing). What is read from an instance or a function's result is not resolvable
  and not checked; the seam checks of tools/seams.py cover the instances that matter.

A name is checked against the releases its line can run on: all declared releases, narrowed
by the guards of vllm_eplb/compat/guards.py around it (`if holds(...)`, `@only_where(...)`).
The places the hooks and the seam checks name as strings (compat/places.py: modules and
qualnames, under each release's name for them) are checked by tools/seams.py, for the
releases each hook declares.
"""

from __future__ import annotations

import ast
import functools
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from vllm_eplb.compat.guards import GUARDS
from vllm_eplb.compat.source import bindings
from vllm_eplb.compat.versions import SEAM_CHECKED

ROOT = Path(__file__).resolve().parents[2]
SCANNED = ("vllm_eplb", "benchmarks")  # folders of ROOT whose code is read


@dataclass(frozen=True)
class Ref:
    """One vLLM name used at file:line: `module` (dotted) and the attribute path from it."""

    file: str
    line: int
    module: str
    attrs: tuple[str, ...]
    releases: frozenset[str]  # the declared releases this line can run on


# --------------------------------------------------------------------------- our code


def _guard_of(test) -> tuple[str, bool] | None:
    """('key', True) for `holds("key")`, ('key', False) for `not holds("key")`."""
    positive = True
    if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
        test, positive = test.operand, False
    key = _call_key(test, "holds")
    return (key, positive) if key is not None else None


def _call_key(node, fn: str) -> str | None:
    """'key' for a call `fn("key")` or `x.fn("key")`."""
    if not (isinstance(node, ast.Call) and len(node.args) == 1 and isinstance(node.args[0], ast.Constant)):
        return None
    f = node.func
    name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
    return node.args[0].value if name == fn and isinstance(node.args[0].value, str) else None


class _Collector(ast.NodeVisitor):
    """The vLLM names one file uses, each with the releases its line runs on."""

    def __init__(self, file: str, releases: frozenset[str]):
        self.file = file
        self.refs: list[Ref] = []
        self.errors: list[str] = []
        self.scopes: list[dict[str, tuple[str, tuple[str, ...]] | None]] = [{}]  # local name -> (module, attrs)
        self.releases = [releases]

    # -- bookkeeping

    def _add(self, node, module: str, attrs: tuple[str, ...]) -> None:
        self.refs.append(Ref(self.file, node.lineno, module, attrs, self.releases[-1]))

    def _bound(self, name: str):
        for scope in reversed(self.scopes):
            if name in scope:
                return scope[name]
        return None

    def _guarded(self, key: str, positive: bool, node) -> frozenset[str]:
        if key not in GUARDS:
            self.errors.append(f"{self.file}:{node.lineno}: guard {key!r} is not declared in vllm_eplb/compat/guards.py")
            return self.releases[-1]
        g = GUARDS[key].releases()
        return self.releases[-1] & g if positive else self.releases[-1] - g

    def _under(self, releases: frozenset[str], nodes) -> None:
        self.releases.append(releases)
        for n in nodes if isinstance(nodes, list) else [nodes]:
            self.visit(n)
        self.releases.pop()

    # -- imports

    def visit_Import(self, node: ast.Import) -> None:
        for a in node.names:
            if a.name.split(".")[0] != "vllm":
                continue
            self._add(node, a.name, ())
            if a.asname:
                self.scopes[-1][a.asname] = (a.name, ())
            else:  # `import vllm.x.y` binds `vllm`
                self.scopes[-1]["vllm"] = ("vllm", ())

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level or (node.module or "").split(".")[0] != "vllm":
            return
        for a in node.names:
            self._add(node, node.module, (a.name,))
            self.scopes[-1][a.asname or a.name] = (node.module, (a.name,))

    # -- scopes and guards

    def _function(self, node) -> None:
        for d in node.decorator_list:
            self.visit(d)
        self.visit(node.args)
        if getattr(node, "returns", None) is not None:
            self.visit(node.returns)
        releases = self.releases[-1]
        for d in node.decorator_list:
            key = _call_key(d, "only_where")
            if key is not None:
                releases = self._guarded(key, True, d)
        args = node.args
        self.scopes.append({a.arg: None for a in args.posonlyargs + args.args + args.kwonlyargs
                            + [x for x in (args.vararg, args.kwarg) if x]})
        self._under(releases, node.body)
        self.scopes.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = _function

    def visit_Lambda(self, node: ast.Lambda) -> None:
        self.visit(node.args)
        args = node.args
        self.scopes.append({a.arg: None for a in args.posonlyargs + args.args + args.kwonlyargs})
        self.visit(node.body)
        self.scopes.pop()

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        for n in node.decorator_list + node.bases + node.keywords:
            self.visit(n)
        releases = self.releases[-1]
        for d in node.decorator_list:
            key = _call_key(d, "only_where")
            if key is not None:
                releases = self._guarded(key, True, d)
        self.scopes.append({})
        self._under(releases, node.body)
        self.scopes.pop()

    def _branches(self, node) -> None:
        guard = _guard_of(node.test)
        if guard is None:
            self.generic_visit(node)
            return
        self.visit(node.test)
        self._under(self._guarded(guard[0], guard[1], node), node.body)
        self._under(self._guarded(guard[0], not guard[1], node), node.orelse)

    visit_If = visit_IfExp = _branches

    def visit_Assign(self, node: ast.Assign) -> None:
        self.generic_visit(node)
        for t in node.targets:  # a local name reassigned no longer means the vLLM name
            if isinstance(t, ast.Name) and self._bound(t.id) is not None:
                self.scopes[-1][t.id] = None

    # -- uses

    def _chain(self, node):
        """(base expression, attribute names) of `base.a.b`."""
        attrs = []
        while isinstance(node, ast.Attribute):
            attrs.insert(0, node.attr)
            node = node.value
        return node, tuple(attrs)

    def _target(self, node):
        """(module, attrs) a Name or attribute chain stands for, or None."""
        base, attrs = self._chain(node)
        bound = self._bound(base.id) if isinstance(base, ast.Name) else None
        return (bound[0], bound[1] + attrs) if bound else None

    def visit_Attribute(self, node: ast.Attribute) -> None:
        target = self._target(node)
        if target is not None:
            self._add(node, *target)
        else:
            self.visit(self._chain(node)[0])

    def visit_Call(self, node: ast.Call) -> None:
        f = node.func
        fname = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
        args = node.args
        if fname in ("getattr", "hasattr", "setattr", "delattr") and len(args) >= 2 \
                and isinstance(args[1], ast.Constant) and isinstance(args[1].value, str):
            target = self._target(args[0])
            if target is not None:
                self._add(node, target[0], target[1] + (args[1].value,))
        elif fname == "import_module" and args and isinstance(args[0], ast.Constant) \
                and isinstance(args[0].value, str) and args[0].value.split(".")[0] == "vllm":
            self._add(node, args[0].value, ())
        self.generic_visit(node)


def references_in(text: str, file: str, releases: frozenset[str] = frozenset(SEAM_CHECKED)) -> tuple[list[Ref], list[str]]:
    """(vLLM names used, guard errors) of one file's source."""
    c = _Collector(file, releases)
    c.visit(ast.parse(text))
    return c.refs, list(dict.fromkeys(c.errors))  # a guard of if/else is read twice


@functools.cache
def package_references() -> tuple[tuple[Ref, ...], tuple[str, ...]]:
    """Every vLLM name the code of SCANNED uses, and every misdeclared guard."""
    refs, errors = [], []
    for folder in SCANNED:
        for path in sorted((ROOT / folder).rglob("*.py")):
            r, e = references_in(path.read_text(), str(path.relative_to(ROOT)))
            refs += r
            errors += e
    return tuple(refs), tuple(errors)


# --------------------------------------------------------------------------- a release's source


class Target(NamedTuple):
    """What a name is in a release's source. kind: "module"; "class" (node: its ClassDef);
    "instance" (of the class `node`: a module global annotated with it, as vllm.platforms'
    current_platform); "external" (imported from outside vLLM: module.qual); "other" (it
    exists; what is read from it is not resolvable statically)."""

    kind: str
    module: str = ""
    qual: str = ""
    node: ast.ClassDef | None = None


_OTHER = Target("other")


class Resolver:
    """Names of one release's source, read from its parsed files (seams.Tree)."""

    def __init__(self, tree):
        self.t = tree

    def module_rel(self, dotted: str) -> str | None:
        base = dotted.replace(".", "/")
        for rel in (base + ".py", base + "/__init__.py"):
            if self.t.module(rel) is not None:
                return rel
        return None

    def lookup(self, dotted: str, name: str, depth: int = 0) -> Target | None:
        """What `name` is in module `dotted`; None: missing."""
        rel = self.module_rel(dotted)
        if rel is None:
            return None
        if depth > 20:
            return _OTHER
        bound = bindings(self.t.module(rel).body)
        for node in bound.get(name, []):
            found = self._binding(dotted, rel, node, name, depth)
            if found is not None:
                return found
        if self.module_rel(f"{dotted}.{name}"):
            return Target("module", f"{dotted}.{name}")
        for node in bound.get("*", []):  # from .x import *
            found = self.lookup(_absolute(dotted, rel, node), name, depth + 1)
            if found is not None:
                return found
        lazy = [n for n in bound.get("__getattr__", []) if isinstance(n, ast.FunctionDef)]
        if any(isinstance(c, ast.Constant) and c.value == name for n in lazy for c in ast.walk(n)):
            return _OTHER  # a module-level __getattr__ that answers this name
        return None

    def _binding(self, dotted: str, rel: str, node, name: str, depth: int) -> Target | None:
        if isinstance(node, ast.ClassDef):
            return Target("class", dotted, name, node)
        if isinstance(node, ast.ImportFrom):
            src = _absolute(dotted, rel, node)
            a = next(a for a in node.names if (a.asname or a.name) == name)
            if src.split(".")[0] != "vllm":
                return Target("external", src, a.name)
            if self.module_rel(f"{src}.{a.name}"):
                return Target("module", f"{src}.{a.name}")
            # an import vLLM itself runs is trusted (a failing one is vLLM's own bug), and
            # resolved to read what it is
            return self.lookup(src, a.name, depth + 1) or _OTHER
        if isinstance(node, ast.Import):
            a = next(a for a in node.names if (a.asname or a.name).split(".")[0] == name)
            module = a.name if a.asname else name
            return Target("module" if module.split(".")[0] == "vllm" else "external", module)
        if isinstance(node, ast.AnnAssign) and node.value is None and isinstance(node.annotation, (ast.Name, ast.Attribute)):
            cls = self.expr(dotted, node.annotation, depth + 1)  # `current_platform: Platform`
            if cls is not None and cls.kind == "class":
                return Target("instance", cls.module, cls.qual, cls.node)
        return _OTHER

    def member(self, cls: Target, name: str, depth: int = 0) -> Target | None:
        """An attribute of a class (or of an instance: what its methods set on `self` too),
        its bases' included; _OTHER where a base outside vLLM cannot be read; None: missing."""
        for node in bindings(cls.node.body).get(name, []):
            return Target("class", cls.module, f"{cls.qual}.{name}", node) if isinstance(node, ast.ClassDef) else _OTHER
        if cls.kind == "instance" and name in _self_stores(cls.node):
            return _OTHER
        if depth > 20:
            return _OTHER
        for base in cls.node.bases:
            b = self.expr(cls.module, base)
            if b is None:
                continue
            if b.kind == "class":
                found = self.member(Target(cls.kind, b.module, b.qual, b.node), name, depth + 1)
            elif b.kind == "external":
                found = _external_attr(b.module, b.qual, name)
            else:
                found = _OTHER  # a base built by an expression (Generic[T], a factory): unknown
            if found is not None:
                return found
        return None

    def expr(self, dotted: str, node, depth: int = 0) -> Target | None:
        """What a name or attribute chain at the top level of module `dotted` is."""
        if isinstance(node, ast.Name):
            return self.lookup(dotted, node.id, depth)
        if isinstance(node, ast.Attribute):
            v = self.expr(dotted, node.value, depth)
            return self.attr(v, node.attr) if v is not None else None
        return _OTHER

    def attr(self, target: Target, name: str) -> Target | None:
        if target.kind == "module":
            return self.lookup(target.module, name)
        if target.kind in ("class", "instance"):
            return self.member(target, name)
        if target.kind == "external":
            return _external_attr(target.module, target.qual, name)
        return _OTHER

    def missing(self, ref: Ref) -> str | None:
        """The first part of `ref` the release lacks ('module vllm.x', 'vllm.x:A.b'), or None."""
        if self.module_rel(ref.module) is None:
            return f"module {ref.module}"
        target = Target("module", ref.module)
        module, path = ref.module, []  # the name as the code reads it, submodules folded in
        for name in ref.attrs:
            found = self.attr(target, name)
            if found is None:
                if name.startswith("__") and name.endswith("__") and (target.kind != "module" or name in _MODULE_DUNDERS):
                    return None  # every module and class has these
                return f"{module}:{'.'.join(path + [name])}"
            if found.kind not in ("module", "class", "instance"):
                return None  # it exists; what is read from it is not resolvable here
            target = found
            module, path = (found.module, []) if found.kind == "module" else (module, path + [name])
        return None


_MODULE_DUNDERS = {"__name__", "__file__", "__path__", "__spec__", "__doc__", "__package__", "__dict__"}


def _self_stores(cls: ast.ClassDef) -> set[str]:
    """Attributes a class's methods set on `self`."""
    return {
        n.attr for n in ast.walk(cls)
        if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store)
        and isinstance(n.value, ast.Name) and n.value.id == "self"
    }


def _absolute(dotted: str, rel: str, node: ast.ImportFrom) -> str:
    """The absolute module of a (possibly relative) `from` import in module `dotted`."""
    if not node.level:
        return node.module or ""
    package = dotted if rel.endswith("__init__.py") else dotted.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def _external_attr(module: str, qual: str, attr: str) -> Target | None:
    """An attribute of something outside vLLM (torch.nn.Module, typing.Protocol: a base
    of a vLLM class), read by importing it here; _OTHER if it cannot be imported."""
    try:
        obj = importlib.import_module(module)
        for part in filter(None, qual.split(".")):
            obj = getattr(obj, part)
    except Exception:
        return _OTHER
    return Target("external", module, f"{qual}.{attr}".lstrip(".")) if hasattr(obj, attr) else None


# --------------------------------------------------------------------------- the check


def check_names(t) -> list[str]:
    """Every vLLM name of our code that release `t.version` (a seams.Tree) lacks, where the
    name's line runs on that release; every guard misdeclared."""
    refs, errors = package_references()
    return list(errors) + missing_in(t, refs)


def missing_in(t, refs) -> list[str]:
    """One line per name of `refs` that release `t.version` lacks, where its line runs there."""
    r = Resolver(t)
    problems = []
    for ref in refs:
        if t.version in ref.releases:
            name = r.missing(ref)
            if name is not None:
                problems.append(f"{ref.file}:{ref.line}: {name} is missing in vLLM {t.version}")
    return list(dict.fromkeys(problems))
