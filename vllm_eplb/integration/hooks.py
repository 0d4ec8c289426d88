"""The changes vllm-eplb makes to vLLM 0.30, applied at plugin load.

Each function here is one change, idempotent, and mirrored by a patch file in
`patches/` for those who prefer a fork. Every process of a server loads the
plugin (API server, engine core, workers), so each hook is installed everywhere.

  hook_cli_config        --eplb-config accepts a file path; our keys are validated
  hook_engine_config     --eplb-config turns EPLB on; shapes checked before load
  hook_platform_gate     EPLB allowed on CPU when vllm-eplb balances
  hook_runner_state      the runners build VllmEplbState instead of EplbState
  hook_cpu_runner        the CPU runner attaches EPLB state after loading
  hook_dummy_runs        dummy passes tick but record no load
  hook_cpu_router        torch map-and-record where the Triton kernel is missing
  hook_cpu_fused_moe     the CPU fused-MoE kernel gets local expert ids
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sys

import torch

from .config import EplbConfig, EplbConfigError, load_eplb_config, publish, published

log = logging.getLogger("vllm.eplb")

_MARK = "_vllm_eplb_hooked"


def _once(obj, name: str) -> bool:
    """True the first time for (obj, name): lets each hook install itself once."""
    fn = getattr(obj, name)
    if getattr(fn, _MARK, False):
        return False
    return True


def _mark(fn):
    setattr(fn, _MARK, True)
    return fn


# --------------------------------------------------------------------------- CLI


def parse_eplb_config_arg(value: str):
    """argparse `type` of --eplb-config: a path or inline JSON, our keys included.
    A bad value ends the command with one line on stderr, before anything loads."""
    from vllm.config import EPLBConfig

    try:
        cfg = load_eplb_config(value)
    except EplbConfigError as exc:
        print(f"error: argument --eplb-config: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    publish(cfg)
    return EPLBConfig(**cfg.upstream_kwargs())


def hook_cli_config() -> None:
    from vllm.engine.arg_utils import EngineArgs

    if not _once(EngineArgs, "add_cli_args"):
        return
    original = EngineArgs.add_cli_args

    @_mark
    @functools.wraps(original)
    def add_cli_args(parser, *args, **kwargs):
        parser = original(parser, *args, **kwargs)
        for action in parser._actions:
            if "--eplb-config" in action.option_strings:
                action.type = parse_eplb_config_arg
                action.help = (
                    "Expert-parallel load balancer config (vllm-eplb): a path to a JSON file or an "
                    "inline JSON object; see vllm-eplb's docs/configuration.md for every key."
                )
        return parser

    EngineArgs.add_cli_args = staticmethod(add_cli_args)


# --------------------------------------------------------------------------- engine config


def _num_experts(hf_config) -> int | None:
    for key in ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"):
        n = getattr(hf_config, key, None)
        if isinstance(n, int) and n > 0:
            return n
    text = getattr(hf_config, "text_config", None)
    return _num_experts(text) if text is not None and text is not hf_config else None


def check_shapes(cfg: EplbConfig, vllm_config) -> None:
    """Fail before the model loads if the expert slots cannot be laid out."""
    pc = vllm_config.parallel_config
    ep = pc.tensor_parallel_size * pc.data_parallel_size * getattr(pc, "prefill_context_parallel_size", 1)
    n = _num_experts(vllm_config.model_config.hf_config)
    if n is None:
        raise EplbConfigError(f"--eplb-config: model {vllm_config.model_config.model!r} has no routed experts to balance")
    physical = n + cfg.num_redundant_experts
    if physical % ep:
        raise EplbConfigError(
            f"--eplb-config: 'num_redundant_experts' ({cfg.num_redundant_experts}) + {n} experts = {physical} slots "
            f"do not divide over {ep} expert-parallel ranks; choose num_redundant_experts so the sum is a multiple of {ep}"
        )
    if cfg.initial_placement_path:
        from vllm_eplb.core import records

        try:
            rec = records.load(cfg.initial_placement_path)
            records.check_matches(rec, cfg.initial_placement_path, None, n, physical, ep)
        except records.RecordError as exc:
            raise EplbConfigError(f"--eplb-config: 'initial_placement_path': {exc}") from None


def prepare_engine_args(engine_args) -> EplbConfig | None:
    """Before vLLM builds its config: if vllm-eplb is to balance (--eplb-config given, or
    plain --enable-eplb, or a path/dict from the Python API), publish its config for the
    other processes, turn EPLB on and give vLLM its own keys."""
    from vllm.config import EPLBConfig

    cfg = published()
    if cfg is None and isinstance(engine_args.eplb_config, (str, dict)):
        cfg = load_eplb_config(engine_args.eplb_config)
        publish(cfg)
    if cfg is None and engine_args.enable_eplb:
        ec = engine_args.eplb_config
        cfg = EplbConfig(window_size=ec.window_size, step_interval=ec.step_interval, num_redundant_experts=ec.num_redundant_experts)
        publish(cfg)
    if cfg is not None:
        if not engine_args.enable_expert_parallel:
            raise EplbConfigError("--eplb-config needs --enable-expert-parallel")
        engine_args.enable_eplb = True
        engine_args.eplb_config = EPLBConfig(**cfg.upstream_kwargs())
    return cfg


def hook_engine_config() -> None:
    from vllm.engine.arg_utils import EngineArgs

    if not _once(EngineArgs, "create_engine_config"):
        return
    original = EngineArgs.create_engine_config

    @_mark
    @functools.wraps(original)
    def create_engine_config(self, *args, **kwargs):
        cfg = prepare_engine_args(self)
        vllm_config = original(self, *args, **kwargs)
        if cfg is not None:
            check_shapes(cfg, vllm_config)
        return vllm_config

    EngineArgs.create_engine_config = create_engine_config


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
        parallel.current_platform = _PlatformWithCpuEplb(parallel.current_platform)


# --------------------------------------------------------------------------- runners


def hook_runner_state() -> None:
    from .runner_state import VllmEplbState

    import vllm.v1.worker.gpu_model_runner as v1

    v1.EplbState = VllmEplbState
    try:
        import vllm.v1.worker.gpu.eplb_utils as v2

        v2.EplbState = VllmEplbState
    except Exception:  # the V2 runner is optional on some builds
        pass


def attach_eplb_state(runner) -> None:
    """What GPUModelRunner.load_model does for EPLB and the CPU runner's load_model lacks."""
    from vllm.model_executor.models.interfaces import get_mixture_of_experts_model

    from .runner_state import VllmEplbState

    if not runner.parallel_config.enable_eplb:
        return
    runner._moe_model = get_mixture_of_experts_model(runner.model)
    if runner._moe_model is None:
        return
    runner.eplb_state = VllmEplbState(runner.parallel_config, runner.device)
    runner.eplb_state.add_model(runner._moe_model, runner.model_config)


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

    CPUModelRunner.load_model = load_model


class no_load_recording:
    """Context around a runner's dummy pass (DP padding, warm-up): it counts on the pass
    clock like any pass, so ranks stay in step, but its made-up tokens are no load
    (VllmEplbState.dummy_pass)."""

    def __init__(self, runner):
        from .runner_state import VllmEplbState

        state = getattr(runner, "eplb_state", None)
        self._ctx = state.dummy_pass() if isinstance(state, VllmEplbState) else contextlib.nullcontext()

    def __enter__(self):
        return self._ctx.__enter__()

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


def hook_dummy_runs() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if not _once(GPUModelRunner, "_dummy_run"):
        return
    original = GPUModelRunner._dummy_run

    @_mark
    @functools.wraps(original)
    def _dummy_run(self, *args, **kwargs):
        with no_load_recording(self):
            return original(self, *args, **kwargs)

    GPUModelRunner._dummy_run = _dummy_run


# --------------------------------------------------------------------------- CPU kernels


class _RouterConstants:
    """Tensors that depend only on the batch size, cached across calls: the Knuth hash of
    each token index (as the Triton kernel computes it) and a row of ones to add as load.
    One tensor each, grown to the largest batch seen."""

    hashed = torch.empty((0, 1), dtype=torch.int64)
    ones = torch.empty(0, dtype=torch.int32)

    @classmethod
    def get(cls, tokens: int, width: int, device, dtype):
        if cls.hashed.shape[0] < tokens or cls.hashed.device != torch.device(device):
            size = max(tokens, 2 * cls.hashed.shape[0], 256)
            cls.hashed = ((torch.arange(size, dtype=torch.int64, device=device) * 2654435769) & 0xFFFFFFFF)[:, None]
        if cls.ones.numel() < tokens * width or cls.ones.dtype != dtype or cls.ones.device != torch.device(device):
            cls.ones = torch.ones(max(tokens * width, 2 * cls.ones.numel(), 1024), dtype=dtype, device=device)
        return cls.hashed[:tokens], cls.ones


def torch_map_to_physical_and_record(
    topk_ids: torch.Tensor,
    expert_load_view: torch.Tensor,
    logical_to_physical_map: torch.Tensor,
    logical_replica_count: torch.Tensor,
    record_enabled: torch.Tensor | None,
    num_unpadded_tokens: torch.Tensor | None = None,
) -> torch.Tensor:
    """What vLLM's Triton kernel `_eplb_map_and_record_i32_kernel` computes, in torch:
    logical -> physical expert ids, the replica picked by a hash of the token index, and
    one count per (token, expert) into expert_load_view for unpadded tokens.
    Few ops on purpose: on CPU each costs a microsecond or more, per MoE layer, per pass."""
    tokens, k = topk_ids.shape
    hashed, ones = _RouterConstants.get(tokens, k, topk_ids.device, expert_load_view.dtype)
    ids = topk_ids.long()
    replica = hashed % torch.take(logical_replica_count, ids)
    physical = logical_to_physical_map[ids, replica]
    if record_enabled is None or bool(record_enabled):
        rows = physical if num_unpadded_tokens is None else physical[: int(num_unpadded_tokens)]
        flat = rows.reshape(-1)
        # Every id the maps hold for replica < count is a valid slot: no bounds filter
        # needed (the kernel's guards the -1 padding, which this never reaches).
        expert_load_view.index_add_(0, flat, ones[: flat.numel()])
    return physical.to(topk_ids.dtype)


def hook_cpu_router() -> None:
    from vllm.platforms import current_platform

    if current_platform.is_cuda_alike():
        return  # the Triton kernel is there
    import vllm.model_executor.layers.fused_moe.router.base_router as base_router

    base_router.eplb_map_to_physical_and_record = torch_map_to_physical_and_record


def local_expert_ids(topk_weights, topk_ids, expert_map):
    """Global physical expert ids -> this rank's slot ids; experts held elsewhere get slot 0
    with routing weight 0, so they add nothing."""
    local = expert_map[topk_ids.long()]
    remote = local < 0
    return topk_weights.masked_fill(remote, 0.0), local.masked_fill(remote, 0).to(topk_ids.dtype)


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
        if expert_map is not None:
            topk_weights, topk_ids = local_expert_ids(topk_weights, topk_ids, expert_map)
        return original(self, output, hidden_states, w1, w2, topk_weights, topk_ids, activation, global_num_experts, expert_map, *rest, **kw)

    CPUUnquantizedExperts.apply = apply


def install_all() -> None:
    hook_cli_config()
    hook_engine_config()
    hook_platform_gate()
    hook_runner_state()
    hook_dummy_runs()
    hook_cpu_router()
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        hook_cpu_runner()
        hook_cpu_fused_moe()
        from .cpu_dp import install_cpu_dp_collectives; install_cpu_dp_collectives()  # noqa: E702 (DP + EP on CPU)


