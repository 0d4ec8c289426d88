"""Static check of every vLLM seam vllm-eplb relies on, against a release's sdist.

    python -m vllm_eplb.tools.seams [--version V ...]     # default: every release in SEAM_CHECKED

Reads the source with `ast` (nothing of vLLM is imported or run), so releases that cannot
run here (vLLM 0.33.0 is GPU-only) are checked too: the day a GPU box runs that release,
the plugin is known to fit, or the exact missing seam is named. Checked:

- hooks: every target attribute of integration/hooks.HOOKS and the definition it changes
  exist, and the code around them still works the way the hook assumes (the runner builds
  `EplbState(...)` through the module global the hook replaces, the V1 dummy pass calls
  `eplb_step`, the V2 one is decorated with `step_eplb_after(is_dummy=True)`, argparse's
  --eplb-config comes from `get_kwargs(ParallelConfig)`, the platform gate asks
  `current_platform.is_cuda_alike()`; the model loader builds models through the module
  global `initialize_model`, `FusedMoEFactory` takes `enable_eplb` and `num_redundant_experts`
  with their defaults, `MoERunner` has what moe_adapter reads);
- the EplbState API: every method the runners and speculators call on their EPLB state
  exists on VllmEplbState and accepts the arguments given there, every attribute read exists;
- the router: `eplb_map_to_physical_and_record` is a module global of base_router called by
  its bare name, with the parameters of vllm-eplb's torch version; every attribute the router
  reads from a layer's EPLB state is set by the model (`set_eplb_state`) or by VllmEplbState;
- the model interface (`MixtureOfExperts`) has every attribute VllmEplbState.add_model uses;
- EPLBConfig: every field is honoured or refused by eplb.json (integration/config.UPSTREAM),
  every communicator name is known;
- every vLLM name vllm-eplb's code imports or reads (tools/vllm_names.py), against each release
  its line runs on (the guards of compat/guards.py): `file:line: module:name is missing in vLLM V`;
- every guard holds where its difference shows in the source, and only there.

Every vLLM module and qualname checked here comes from the one table the hooks read too
(compat/places.py), under the name each release gives it.

Gaps already known and owned elsewhere are listed in KNOWN_GAPS with the reason; they are
printed, not failed on, and a gap that disappears must be removed from the list.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import sys
from pathlib import Path
from types import SimpleNamespace

from vllm_eplb.compat import places as at
from vllm_eplb.compat.guards import GUARDS
from vllm_eplb.compat.places import Place
from vllm_eplb.compat.sdist import fetch_sdist
from vllm_eplb.compat.source import bindings
from vllm_eplb.compat.versions import RELEASES, SEAM_CHECKED
from vllm_eplb.tools.vllm_names import check_names

ROOT = Path(__file__).resolve().parents[2]

# (release, problem prefix) -> why it is tolerated for now. Matched on the start of the line.
# Elastic EP's update_mapping: each release declares the files that call it (versions.py).
KNOWN_GAPS: dict[tuple[str, str], str] = {
    (r.version, f"EplbState API: {f} calls update_mapping("): (
        "elastic EP only (setup_eplb_from_mapping); vllm-eplb refuses --enable-elastic-ep at start-up (check_shapes)"
    )
    for r in RELEASES
    for f in r.elastic_callers
}


class Tree:
    """One release's source, parsed on demand."""

    def __init__(self, root: Path, version: str):
        self.root, self.version = root, version
        self._parsed: dict[str, ast.Module | None] = {}

    def module(self, rel: str) -> ast.Module | None:
        if rel not in self._parsed:
            p = self.root / rel
            self._parsed[rel] = ast.parse(p.read_text()) if p.exists() else None
        return self._parsed[rel]

    def text(self, node) -> str:
        return ast.unparse(node)


def find(tree: ast.Module | None, qualname: str):
    """The node(s) defining qualname ('Class.method', 'name'); [] if missing."""
    if tree is None:
        return []
    nodes = [tree]
    for part in qualname.split("."):
        found = []
        for n in nodes:
            body = n.body if isinstance(n, (ast.Module, ast.ClassDef)) else []
            found += bindings(body).get(part, [])
        nodes = found
        if not nodes:
            return []
    return nodes


def _calls(node, name: str) -> bool:
    """Does node's code call `name` (a bare name or an attribute ending in it)?"""
    for n in ast.walk(node):
        if isinstance(n, ast.Call):
            f = n.func
            if (isinstance(f, ast.Name) and f.id == name) or (isinstance(f, ast.Attribute) and f.attr == name):
                return True
    return False


# --------------------------------------------------------------------------- hooks


def check_hooks(t: Tree) -> list[str]:
    from vllm_eplb.integration.hooks import HOOKS

    problems = []
    for h in HOOKS:
        if t.version not in h.versions:
            continue  # a CPU-only hook on a GPU-only release: nothing of it runs there
        if h.target.module.split(".")[0] == "vllm":
            rel, qualname = h.target.file, h.target.qualname_in(t.version)
            if t.module(rel) is None:
                problems.append(f"hook {h.name}: module {rel} is missing")
                continue
            if not find(t.module(rel), qualname):
                problems.append(f"hook {h.name}: {rel} has no {qualname}")
        if h.changes_for(t.version):
            rel, qn = h.changes_for(t.version)
            if not find(t.module(rel), qn):
                problems.append(f"hook {h.name}: {rel} has no {qn} (the definition it changes)")
    return problems + check_hook_assumptions(t)


def _one(t: Tree, rel: str, qualname: str):
    nodes = find(t.module(rel), qualname)
    return nodes[-1] if nodes else None


def _at(t: Tree, place: Place):
    """The definition of `place` in release t (its last binding), or None."""
    return _one(t, place.file, place.qualname_in(t.version))


def check_hook_assumptions(t: Tree) -> list[str]:
    """How each hook takes effect; a change here would make a hook a silent no-op."""
    problems = []

    def need(ok: bool, what: str) -> None:
        if not ok:
            problems.append(what)

    add = _at(t, at.ADD_CLI_ARGS)
    if add is not None:
        src = t.text(add)
        need(
            "get_kwargs(ParallelConfig)" in src and "'--eplb-config'" in src and "parallel_kwargs['eplb_config']" in src,
            "hook cli_config: EngineArgs.add_cli_args no longer builds --eplb-config from get_kwargs(ParallelConfig)",
        )
    gate = _at(t, at.VALIDATE_PARALLEL)
    if gate is not None:
        src = t.text(gate)
        need(
            "self.enable_eplb" in src and "current_platform.is_cuda_alike()" in src,
            "hook platform_gate: ParallelConfig._validate_parallel_config no longer gates EPLB on current_platform.is_cuda_alike()",
        )
    upstream = at.UPSTREAM_EPLB_STATE
    for global_ in (at.V1_EPLB_STATE, at.V2_EPLB_STATE):
        rel, tree = global_.file, t.module(global_.file)
        if tree is None:
            continue
        need(_imports(tree, upstream), f"hook runner_state: {rel} no longer imports {upstream.qualname} from {upstream.module} at module level")
        need(_calls(tree, global_.qualname), f"hook runner_state: {rel} no longer builds {global_.qualname}(...)")
    v1 = _at(t, at.V1_DUMMY_RUN)
    if v1 is not None:
        need(_calls(v1, "eplb_step"), "hook v1_dummy_runs: GPUModelRunner._dummy_run (V1) no longer calls eplb_step")
    v2 = _at(t, at.V2_DUMMY_RUN)
    if v2 is not None:
        decorators = [t.text(d) for d in v2.decorator_list]
        need(
            "step_eplb_after(is_dummy=True)" in decorators,
            "hook v2_dummy_runs: GPUModelRunner._dummy_run (V2) is no longer decorated with step_eplb_after(is_dummy=True)",
        )
    problems += check_moe_adapter(t)
    return problems


def _imports(tree: ast.Module, place: Place) -> bool:
    """Does the module import place's name from its module, under that name, at its top level?"""
    return any(
        isinstance(n, ast.ImportFrom) and n.module == place.module
        and any(a.name == place.qualname and a.asname is None for a in n.names)
        for n in tree.body
    )


def _params(fn) -> dict[str, str | None]:
    """name -> default's source (None: no default) of a function definition."""
    args = fn.args
    positional = args.posonlyargs + args.args
    defaults = [None] * (len(positional) - len(args.defaults)) + [ast.unparse(d) for d in args.defaults]
    out = {a.arg: d for a, d in zip(positional, defaults)}
    out.update({a.arg: (ast.unparse(d) if d is not None else None) for a, d in zip(args.kwonlyargs, args.kw_defaults)})
    return out


def check_moe_adapter(t: Tree) -> list[str]:
    """What the model_builder hook and moe_adapter rely on (a change would adapt no model)."""
    problems = []

    def need(ok: bool, what: str) -> None:
        if not ok:
            problems.append(what)

    loader, init_global = at.BASE_MODEL_LOADER.file, at.LOADER_INITIALIZE_MODEL.qualname
    tree = t.module(loader)
    if tree is not None:
        need(_imports(tree, at.INITIALIZE_MODEL),
             f"hook model_builder: {loader} no longer imports {init_global} from model_loader.utils")
        base = _at(t, at.BASE_MODEL_LOADER)  # from create_model (0.30+) or load_model (0.26)
        need(base is not None and any(
            isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == init_global for n in ast.walk(base)
        ), f"hook model_builder: BaseModelLoader no longer calls {init_global} by its module-global name")
    init = _at(t, at.INITIALIZE_MODEL)
    need(init is not None and {"model_class", "model_config"} <= set(_params(init)),
         "moe_adapter: model_loader.utils.initialize_model no longer takes model_class and model_config")
    factory_name = at.FUSED_MOE_FACTORY.qualname_in(t.version)
    factory = _at(t, at.FUSED_MOE_FACTORY)
    params = _params(factory) if isinstance(factory, ast.FunctionDef) else {}
    need(params.get("enable_eplb") == "False" and params.get("num_redundant_experts") == "0",
         f"moe_adapter: fused_moe/layer.py {factory_name} no longer has enable_eplb=False and num_redundant_experts=0")
    runner = at.MOE_RUNNER.file
    for member in ("get_expert_weights", "eplb_state", "set_eplb_state"):
        need(_at(t, at.MOE_RUNNER.member(member)) is not None, f"moe_adapter: {runner} MoERunner has no {member}")
    need(_at(t, at.MOE_INTERFACE.member("set_eplb_state")) is not None,
         "moe_adapter: MixtureOfExperts has no set_eplb_state to give an adapted model")
    apply = _at(t, at.CPU_EXPERTS_APPLY)
    if apply is not None:
        need(list(_params(apply))[-1] == "apply_router_weight_on_input",
             "hook cpu_fused_moe: CPUUnquantizedExperts.apply no longer ends with apply_router_weight_on_input")
    return problems


# --------------------------------------------------------------------------- EplbState API

def _state_uses(tree: ast.Module, rel: str):
    """(attribute, Call node or None) for every use of the runner's EPLB state:
    `eplb_state.X`, `self.eplb_state.X`, and in EPLBController `self.state.X`."""
    calls = {id(n.func): n for n in ast.walk(tree) if isinstance(n, ast.Call)}
    decorators = {id(d) for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) for d in n.decorator_list}
    for n in ast.walk(tree):
        if not isinstance(n, ast.Attribute) or id(n) in decorators:
            continue
        v = n.value
        is_state = (isinstance(v, ast.Name) and v.id == "eplb_state") or (
            isinstance(v, ast.Attribute) and isinstance(v.value, ast.Name) and v.value.id == "self"
            and (v.attr == "eplb_state" or (v.attr == "state" and rel == at.V2_EPLB_STATE.file))
        )
        if is_state and isinstance(n.ctx, ast.Load):
            yield n.attr, calls.get(id(n))


def check_state_api(t: Tree) -> list[str]:
    import torch

    from vllm_eplb.integration.runner_state import VllmEplbState

    instance = VllmEplbState(SimpleNamespace(), torch.device("cpu"))
    problems = []
    for rel in (p.file for p in at.STATE_USERS):
        tree = t.module(rel)
        if tree is None:  # moved: the calls it made are somewhere this list does not look
            problems.append(f"EplbState API: {rel} is missing (places.STATE_USERS names every file that uses the EPLB state)")
            continue
        for attr, call in sorted(set(_state_uses(tree, rel)), key=lambda x: (x[0], id(x[1]))):
            if not hasattr(instance, attr):
                kind = "calls" if call is not None else "reads"
                problems.append(f"EplbState API: {rel} {kind} {attr}{'(' if call is not None else ''} "
                                f"which VllmEplbState does not have")
                continue
            if call is None:
                continue
            fn = getattr(instance, attr)
            args = [None] * sum(not isinstance(a, ast.Starred) for a in call.args)
            kwargs = {k.arg: None for k in call.keywords if k.arg is not None}
            try:
                inspect.signature(fn).bind(*args, **kwargs)
            except TypeError as exc:
                problems.append(f"EplbState API: {rel} calls {attr}({t.text(call)[len(t.text(call.func)) + 1:]} "
                                f"which VllmEplbState.{attr} does not accept: {exc}")
    return sorted(set(problems))


# --------------------------------------------------------------------------- router and model interface

MODEL_SET = {"expert_load_view", "logical_to_physical_map", "logical_replica_count"}  # by model.set_eplb_state


def _runner_state_tree() -> ast.Module:
    return ast.parse((ROOT / "vllm_eplb" / "integration" / "runner_state.py").read_text())


def check_router(t: Tree) -> list[str]:
    from vllm_eplb.kernels.replica_dispatch import torch_map_to_physical_and_record

    problems = []
    router_file, map_and_record = at.MAP_AND_RECORD.file, at.MAP_AND_RECORD.qualname
    tree = t.module(router_file)
    if tree is None:
        return [f"router: {router_file} is missing"]
    defs = [n for n in find(tree, map_and_record) if isinstance(n, ast.FunctionDef)]
    if not defs:
        return [f"router: {router_file} defines no module-level {map_and_record}"]
    ours = list(inspect.signature(torch_map_to_physical_and_record).parameters)
    for d in defs:
        theirs = [a.arg for a in d.args.args]
        if theirs != ours:
            problems.append(f"router: {map_and_record} takes {theirs}; vllm-eplb's torch version takes {ours}")
    router = _at(t, at.BASE_ROUTER_CLASS)
    if router is None or not _calls(router, map_and_record):
        problems.append(f"router: BaseRouter no longer calls {map_and_record} by its module-global name")
    # what the router reads from a layer's EPLB state must be set by the model or by us
    ours_set = {
        n.attr for n in ast.walk(_runner_state_tree())
        if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store) and isinstance(n.value, ast.Name) and n.value.id == "ls"
    }
    read = {
        n.attr for n in ast.walk(router or tree)
        if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "eplb_state"
    }
    for attr in sorted(read - MODEL_SET - ours_set):
        problems.append(f"router: BaseRouter reads the layer's eplb_state.{attr}, which neither the model nor VllmEplbState sets")
    return problems


def check_model_interface(t: Tree) -> list[str]:
    moe = _at(t, at.MOE_INTERFACE)
    if moe is None:
        return [f"model interface: {at.MOE_INTERFACE.file} has no MixtureOfExperts"]
    have = set(bindings(moe.body))
    add_model = _one_local(_runner_state_tree(), "VllmEplbState.add_model")
    used = {
        n.attr for n in ast.walk(add_model)
        if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "model"
    }
    return [f"model interface: VllmEplbState.add_model uses model.{a}, which MixtureOfExperts does not define"
            for a in sorted(used - have)]


def _one_local(tree: ast.Module, qualname: str):
    nodes = find(tree, qualname)
    assert nodes, qualname
    return nodes[-1]


# --------------------------------------------------------------------------- EPLBConfig


def check_eplb_config(t: Tree) -> list[str]:
    from vllm_eplb.integration.config import UPSTREAM, EplbConfig

    cls = _at(t, at.EPLB_CONFIG)
    if cls is None:
        return [f"EPLBConfig: {at.EPLB_CONFIG.file} has no EPLBConfig"]
    fields = [n.target.id for n in cls.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)]
    problems = [
        f"EPLBConfig: vLLM {t.version}'s field {f!r} is neither honoured nor refused by eplb.json (integration/config.UPSTREAM)"
        for f in fields if f not in UPSTREAM or f not in EplbConfig.model_fields
    ]
    lit = _at(t, at.EPLB_COMMUNICATORS)
    if lit is not None:
        theirs = {n.value for n in ast.walk(lit) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
        ours = set(str(a) for a in _literal_values(EplbConfig.model_fields["communicator"].annotation))
        for name in sorted(theirs - ours):
            problems.append(f"EPLBConfig: communicator {name!r} of vLLM {t.version} is unknown to eplb.json")
    return problems


def _literal_values(annotation) -> list:
    from typing import get_args

    out = []
    for a in get_args(annotation):
        out += list(get_args(a)) if get_args(a) else ([a] if isinstance(a, str) else [])
    return out


# --------------------------------------------------------------------------- guards


def check_guards(t: Tree) -> list[str]:
    """Each guard's `seen` text is in this release's source exactly where the guard holds
    (compat/guards.py): a rule that misjudges a release is named before code runs on it."""
    problems = []
    for key, guard in GUARDS.items():
        if guard.seen is None:
            continue
        rel, text = guard.seen
        tree = t.module(rel)
        found = tree is not None and text in t.text(tree)
        holds = t.version in guard.releases()
        if found != holds:
            problems.append(f"guard {key}: {rel} {'has' if found else 'lacks'} {text!r}, "
                            f"but the guard {'holds' if holds else 'does not hold'} for vLLM {t.version}")
    return problems


# --------------------------------------------------------------------------- all


CHECKS = (check_hooks, check_state_api, check_router, check_model_interface, check_eplb_config, check_guards, check_names)


def check(root: Path, version: str) -> tuple[list[str], list[str]]:
    """(problems, known gaps found) for one release's source tree."""
    t = Tree(root, version)
    found = [p for c in CHECKS for p in c(t)]
    known = [p for p in found if _known(version, p)]
    return [p for p in found if p not in known], known


def _known(version: str, problem: str) -> str | None:
    for (v, prefix), why in KNOWN_GAPS.items():
        if v == version and problem.startswith(prefix):
            return why
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", action="append", help="vLLM release (repeatable; default: %s)" % ", ".join(SEAM_CHECKED))
    args = ap.parse_args(argv)
    bad = 0
    for v in args.version or SEAM_CHECKED:
        problems, known = check(fetch_sdist(v), v)
        for p in problems:
            print(f"vLLM {v}: MISSING SEAM: {p}")
        for p in known:
            print(f"vLLM {v}: known gap: {p} -- {_known(v, p)}")
        print(f"vLLM {v}: {'every seam fits' if not problems else f'{len(problems)} seam(s) missing'}"
              f"{f' ({len(known)} known gap(s))' if known else ''}")
        bad += bool(problems)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
