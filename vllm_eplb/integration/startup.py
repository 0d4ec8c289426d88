"""Start-up checks: what vllm-eplb reads and refuses before vLLM builds its config and
before any model loads. A bad value is one line naming the key and how to fix it (under the
`vllm` command: on stderr, exit status 2; from the Python API: `EplbConfigError`).

Called by the hooks (integration/hooks.py: `cli_config`, `engine_config`) and by the patch
files that make the same changes to vLLM's source (patches/vllm/series).
"""

from __future__ import annotations

import logging
import sys

from pydantic import ValidationError

from vllm_eplb.core.transfer.select import CUDA_ONLY

from .config import UPSTREAM, EplbConfig, EplbConfigError, _format_error, load_eplb_config, publish, published

log = logging.getLogger("vllm.eplb")


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



def _num_experts(hf_config) -> int | None:
    for key in ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"):
        n = getattr(hf_config, key, None)
        if isinstance(n, int) and n > 0:
            return n
    text = getattr(hf_config, "text_config", None)
    return _num_experts(text) if text is not None and text is not hf_config else None


def _ep_size(pc) -> int:
    """Ranks of the expert-parallel group, from a ParallelConfig or from EngineArgs."""
    return (pc.tensor_parallel_size or 1) * (pc.data_parallel_size or 1) * (getattr(pc, "prefill_context_parallel_size", 1) or 1)


def check_deployment(pc) -> None:
    """The deployment shapes vllm-eplb refuses, from EngineArgs or a ParallelConfig: run before
    vLLM validates its own config, so the operator reads vllm-eplb's one line, not vLLM's
    traceback for the same cause."""
    if getattr(pc, "enable_elastic_ep", False):
        raise EplbConfigError("--eplb-config: vllm-eplb does not support elastic expert parallelism: drop --enable-elastic-ep")
    if (pc.pipeline_parallel_size or 1) > 1:
        # Each stage would balance its own MoE layers on a pass clock of its own, with
        # several batches in flight between stages: not validated, so not started.
        raise EplbConfigError(
            f"--eplb-config: vllm-eplb does not support pipeline parallelism yet "
            f"(--pipeline-parallel-size {pc.pipeline_parallel_size}): use --pipeline-parallel-size 1"
        )
    ep = _ep_size(pc)
    if ep < 2:
        raise EplbConfigError(
            f"--eplb-config: {ep} expert-parallel rank: nothing to balance; use --tensor-parallel-size or "
            "--data-parallel-size of 2 or more with --enable-expert-parallel, or drop --eplb-config"
        )


def check_shapes(cfg: EplbConfig, vllm_config) -> None:
    """Fail before the model loads if the config cannot mean anything for this model and
    deployment: slots that cannot be laid out, numbers past what they can reach."""
    pc = vllm_config.parallel_config
    check_deployment(pc)
    ep = _ep_size(pc)
    n = _num_experts(vllm_config.model_config.hf_config)
    if n is None:
        raise EplbConfigError(f"--eplb-config: model {vllm_config.model_config.model!r} has no routed experts to balance")
    physical = n + cfg.num_redundant_experts
    if physical % ep:
        raise EplbConfigError(
            f"--eplb-config: 'num_redundant_experts' ({cfg.num_redundant_experts}) + {n} experts = {physical} slots "
            f"do not divide over {ep} expert-parallel ranks; choose num_redundant_experts so the sum is a multiple of {ep} "
            f"(e.g. {cfg.num_redundant_experts + (-physical) % ep})"
        )
    if cfg.num_redundant_experts > n * (ep - 1):
        raise EplbConfigError(
            f"--eplb-config: 'num_redundant_experts' ({cfg.num_redundant_experts}) is more than {n * (ep - 1)}: "
            f"with {n} experts on {ep} ranks, a replica beyond one per rank adds no capacity"
        )
    # Balancedness (mean/max load per rank) lies in [1/ep, 1]: no plan gains more than ep - 1.
    if cfg.improvement_threshold >= ep - 1:
        raise EplbConfigError(
            f"--eplb-config: 'improvement_threshold' ({cfg.improvement_threshold}) can never be reached on {ep} "
            f"expert-parallel ranks (the largest possible gain is {ep - 1}): choose a value below {ep - 1}"
        )
    # The router counts load in int32 and the window sums it in place: exact while every
    # slot's count stays below 2**31, i.e. window_size * tokens per pass.
    tokens = getattr(vllm_config.scheduler_config, "max_num_batched_tokens", None)
    if isinstance(tokens, int) and cfg.window_size * tokens >= 2**31:
        raise EplbConfigError(
            f"--eplb-config: 'window_size' ({cfg.window_size}) x {tokens} tokens per pass (max_num_batched_tokens) "
            f"can overflow the int32 load counters: choose window_size below {(2**31 - 1) // tokens + 1}"
        )
    layers = getattr(vllm_config.model_config.hf_config, "num_hidden_layers", None)
    if isinstance(layers, int) and cfg.layers_per_pass > layers:
        raise EplbConfigError(
            f"--eplb-config: 'layers_per_pass' ({cfg.layers_per_pass}) is more than the model's {layers} layers"
        )
    from vllm.platforms import current_platform

    backend = cfg.resolved_backend()
    if not current_platform.is_cuda_alike() and backend in CUDA_ONLY:
        key = "communicator" if cfg.transfer_backend == "auto" else "transfer_backend"
        raise EplbConfigError(
            f"--eplb-config: {key!r} selects the {backend} backend, which needs CUDA GPUs; "
            "on this platform use \"transfer_backend\": \"gloo\" (or leave it \"auto\")"
        )
    if cfg.initial_placement_path:
        from vllm_eplb.core import records

        try:
            rec = records.load(cfg.initial_placement_path)
            records.check_matches(rec, cfg.initial_placement_path, None, n, physical, ep)
        except records.RecordError as exc:
            raise EplbConfigError(f"--eplb-config: 'initial_placement_path': {exc}") from None


def _from_upstream(ec) -> EplbConfig:
    """vllm-eplb's config from vLLM's own EPLBConfig (plain --enable-eplb, or the Python
    API): the keys the operator changed from upstream's defaults, as if written in eplb.json."""
    from vllm.config import EPLBConfig

    defaults = EPLBConfig()
    given = {k: getattr(ec, k) for k in UPSTREAM if hasattr(ec, k) and getattr(ec, k) != getattr(defaults, k)}
    try:
        return EplbConfig(**given)
    except ValidationError as exc:
        raise EplbConfigError(_format_error("--enable-eplb with vLLM's EPLBConfig", exc)) from None


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
        cfg = _from_upstream(engine_args.eplb_config)
        publish(cfg)
    if cfg is not None:
        if not engine_args.enable_expert_parallel:
            raise EplbConfigError("--eplb-config needs --enable-expert-parallel")
        check_deployment(engine_args)
        engine_args.enable_eplb = True
        engine_args.eplb_config = EPLBConfig(**cfg.upstream_kwargs())
        for note in cfg.startup_notes():
            log.info("vllm-eplb: %s", note)
    return cfg


def under_vllm_cli() -> bool:
    """Is this process vLLM's `vllm` command (its console script, `python -m`, or the launcher)?"""
    main = getattr(sys.modules.get("__main__"), "__spec__", None)
    return "vllm.entrypoints.cli.main" in sys.modules or getattr(main, "name", "") == "vllm.entrypoints.cli.main"


def refuse_config(exc: EplbConfigError):
    """A config vllm-eplb cannot serve: under the `vllm` command, one line on stderr and exit
    status 2 (what argparse does for a bad --eplb-config), before any model loads; from the
    Python API (LLM(...), AsyncLLMEngine), the exception, for the caller to handle."""
    if under_vllm_cli():
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    raise exc
