"""MoE models whose class lacks vLLM's `MixtureOfExperts` interface, balanced anyway.

vLLM's runners (CPU, V1 GPU, V2 GPU) balance a model only if
`get_mixture_of_experts_model(model)` finds the interface: the MoE layers in order, the
expert counts, `set_eplb_state` (maps and load view in, expert weights out). Many model
classes build their routed experts as the same FusedMoE layers (`MoERunner`) as the
classes that implement it, but pass neither `enable_eplb` nor `num_redundant_experts` to
`FusedMoEFactory` and expose no interface (vLLM 0.32: Qwen2-MoE, OLMoE, GPT-OSS, ...).

While vllm-eplb balances, the model loader's `initialize_model` goes through `build_model`
(hook `model_builder`). For a class without the interface:

1. During construction, `FusedMoEFactory`'s defaults are `enable_eplb=True` and
   `num_redundant_experts=N` (eplb.json), so each layer built without those arguments gets
   what a layer of an interface model gets: its EPLB layer state (the router maps ids and
   records load through it), the redundant slots, the expert map over them. Arguments a
   model passes are its own and kept.
2. After construction, the model gets the interface: `moe_layers` (every `MoERunner` in
   module order), the counts, and the interface's own `set_eplb_state`, which collects
   each layer's expert weights once they are loaded and processed. Every runner then finds
   it through `get_mixture_of_experts_model`, the seam it already uses: nothing else of a
   runner changes.
3. Around weight loading, with redundant slots, for every MoE model (with the interface or
   adapted): every expert slot is marked first (NaN's bytes in its format) and checked after; a loader that
   fails on the redundant slots' shape, or leaves them unfilled (one written for the
   logical experts only), refuses the model instead of serving garbage from them.

A class that declares the interface is built under the same defaults (step 1): vLLM's own
classes pass both arguments and keep theirs, but some (vLLM 0.32: Gemma 4's MoE, Param2MoE,
Sarvam) pass neither and hard-code their counts without redundant slots, and others build a
block whose own `enable_eplb` defaults to False without passing it (GLM-4.7-Flash), so their
layers would route without EPLB and the balancer would wait forever for load that is never
recorded (or vLLM asserts, with redundant slots): those blocks default to True too. Where
the interface's slot count is not its layers', step 2 reads the counts off the layers as for an
adapted class; a layer built with EPLB outside the interface's `moe_layers` is refused.

Only routed experts are in `moe_layers`: a shared expert is a submodule of the runner
outside its routed experts (not among `get_expert_weights()`), a dense MLP is no runner,
so dense layers interleaved with MoE layers and shared experts stay where they are.

Whatever cannot be balanced is refused in one line naming the architecture, what is
missing and how to proceed (`refusal.refuse`), on every rank alike, while the model loads:
before the server reports healthy.
"""

from __future__ import annotations

import contextlib
import logging
import types

import torch

from .config import published
from .refusal import refuse

log = logging.getLogger("vllm.eplb")


def has_interface(model_class: type) -> bool:
    """The class implements MixtureOfExperts itself (vLLM's own EPLB path)."""
    from vllm.model_executor.models.interfaces import MixtureOfExperts

    return MixtureOfExperts in model_class.__mro__


def _is_multimodal(model_class: type) -> bool:
    from vllm.model_executor.models.interfaces import SupportsMultiModal

    return SupportsMultiModal in model_class.__mro__


@contextlib.contextmanager
def eplb_layer_defaults(num_redundant_experts: int):
    """FusedMoEFactory builds EPLB layers unless told otherwise, and so does every MoE block of
    vLLM's loaded model modules whose `enable_eplb` parameter defaults to False (a subclass that
    does not pass it on, as GLM-4.7-Flash's does not to GLM-4.5's block, would otherwise build its
    layers without EPLB, and with redundant slots fail vLLM's assertion), for the block's
    duration. Model construction runs on one thread per process, so nothing else builds
    meanwhile."""
    from vllm.model_executor.layers.fused_moe import layer

    from vllm_eplb.compat.guards import running_release
    from vllm_eplb.compat.places import FUSED_MOE_FACTORY

    factory = getattr(layer, FUSED_MOE_FACTORY.qualname_in(running_release()))  # 0.26 names it FusedMoE
    changed = [_set_defaults(factory, {"enable_eplb": True, "num_redundant_experts": num_redundant_experts})]
    changed += [_set_defaults(init, {"enable_eplb": True}) for init in _blocks_defaulting_eplb_off()]
    try:
        yield
    finally:
        for fn, old in changed:
            fn.__defaults__, fn.__kwdefaults__ = old


def _set_defaults(fn, want: dict) -> tuple:
    """Give fn's parameters in `want` those defaults; returns (fn, its old defaults)."""
    old_pos, old_kw = fn.__defaults__, fn.__kwdefaults__
    code = fn.__code__
    positional = code.co_varnames[: code.co_argcount]
    first_default = len(positional) - len(old_pos or ())
    pos, kw = list(old_pos or ()), dict(old_kw or {})
    for name, value in want.items():
        if name in kw:
            kw[name] = value
        else:
            pos[positional.index(name) - first_default] = value  # ValueError if fn lost it
    fn.__defaults__, fn.__kwdefaults__ = tuple(pos) or None, kw or None
    return fn, (old_pos, old_kw)


def _blocks_defaulting_eplb_off() -> list:
    """The __init__ of every class in vLLM's loaded model modules (the model's module and what
    it imports) with an `enable_eplb` parameter whose default is False."""
    import inspect
    import sys

    found = []
    for name, module in list(sys.modules.items()):
        if not name.startswith("vllm.model_executor.models.") or module is None:
            continue
        for obj in list(vars(module).values()):
            init = obj.__dict__.get("__init__") if isinstance(obj, type) and obj.__module__ == name else None
            if not inspect.isfunction(init):
                continue
            param = inspect.signature(init, follow_wrapped=False).parameters.get("enable_eplb")  # its own, not a wrapped one
            if param is not None and param.default is False:
                found.append(init)
    return found


def build_model(initialize_model, vllm_config, **kwargs):
    """`initialize_model` as the model loader calls it, while vllm-eplb balances: a model
    without the interface is adapted; every model with redundant slots has its weight
    loading checked; a model that cannot be balanced is refused."""
    cfg = published()
    if cfg is None or not vllm_config.parallel_config.enable_eplb:
        return initialize_model(vllm_config, **kwargs)
    from vllm.model_executor.model_loader.utils import get_model_architecture

    from .moe_model import mixture_of_experts_model as get_mixture_of_experts_model  # 0.26.0 lacks vLLM's

    model_config = kwargs.get("model_config") or vllm_config.model_config
    if kwargs.get("model_class") is None:
        kwargs["model_class"] = get_model_architecture(model_config)[0]
    cls = kwargs["model_class"]
    arch = cls.__name__
    if has_interface(cls) or _is_multimodal(cls):
        # vLLM's own path (a multimodal model's language model may have the interface). A class
        # may declare the interface and still build its layers without EPLB and without redundant
        # slots (vLLM 0.32: Gemma 4's MoE, Param2MoE, Sarvam): built under the same defaults as an
        # adapted class (arguments a model passes are kept), its counts are then read off its layers.
        model = _build_with_eplb_layers(initialize_model, vllm_config, kwargs, cfg, arch)
        moe = get_mixture_of_experts_model(model)
        if moe is None:
            raise refuse(arch, "its MoE layers are not reachable through vLLM's MixtureOfExperts interface "
                               "(a multimodal model whose language model lacks it, or no MoE layer built)")
        if not _interface_fits_layers(moe):
            moe = adapt(moe, arch, "declares vLLM's MixtureOfExperts interface but builds its MoE layers without EPLB")
        _check_every_eplb_layer_placed(moe, arch)
    else:
        model = _build_with_eplb_layers(initialize_model, vllm_config, kwargs, cfg, arch)
        moe = adapt(model, arch, "lacks vLLM's MixtureOfExperts interface")
    if moe.num_physical_experts > moe.num_logical_experts:
        _check_slots_loaded(model, arch, list(moe.moe_layers))
    return model


def _build_with_eplb_layers(initialize_model, vllm_config, kwargs, cfg, arch: str):
    try:
        with eplb_layer_defaults(cfg.num_redundant_experts):
            return initialize_model(vllm_config, **kwargs)
    except (AssertionError, NotImplementedError, ValueError) as exc:
        # e.g. a layer built with enable_eplb=False given explicitly, a quantization
        # method without EPLB support: what vLLM raised goes with it (the exception chain)
        raise refuse(arch, f"its MoE layers cannot be built with EPLB ({type(exc).__name__}: {exc})") from exc


def _moe_runners(model) -> list:
    from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner

    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoERunner)]


def _interface_fits_layers(moe) -> bool:
    """The interface's slot count is its layers' and every layer routes through EPLB."""
    layers = list(moe.moe_layers)
    return bool(layers) and all(
        getattr(r, "eplb_state", None) is not None and r.moe_config.num_experts == moe.num_physical_experts for r in layers
    )


def _check_every_eplb_layer_placed(moe, arch: str) -> None:
    """A FusedMoE layer built with EPLB outside the interface's layers would route through maps
    nobody sets: refused, never a dead engine."""
    placed = {id(r) for r in moe.moe_layers}
    stray = [name for name, r in _moe_runners(moe) if r.eplb_state is not None and id(r) not in placed]
    if stray:
        raise refuse(arch, f"{len(stray)} of its EPLB MoE layers ({stray[0]}, ...) are outside its MixtureOfExperts "
                           "interface's moe_layers")


def adapt(model, arch: str, why: str):
    """Give `model` the MixtureOfExperts interface over its FusedMoE layers (and return it),
    or refuse it. why: what the class lacks, for the log."""
    from vllm.model_executor.models.interfaces import MixtureOfExperts

    runners = _moe_runners(model)
    if not runners:
        raise refuse(arch, "its experts are not vLLM FusedMoE layers, the only ones vllm-eplb can move")
    off = [name for name, r in runners if r.eplb_state is None]
    if off:
        raise refuse(arch, f"{len(off)} of its {len(runners)} FusedMoE layers ({off[0]}, ...) route without EPLB "
                                 "(the model builds them with enable_eplb=False or its own router)")
    shapes = {(r.moe_config.num_experts, r.moe_config.num_logical_experts, r.moe_config.num_local_experts) for _, r in runners}
    if len(shapes) > 1:
        raise refuse(arch, f"its MoE layers differ in expert counts {sorted(shapes)}: one placement shape is balanced")
    fused = {r.routed_experts.expert_map_manager.num_fused_shared_experts for _, r in runners}
    if fused != {0}:
        raise refuse(arch, "its shared experts are fused into the routed experts' slots")
    (physical, logical, local), = shapes
    layers = [r for _, r in runners]
    model.moe_layers = layers
    model.num_moe_layers = len(layers)
    model.num_expert_groups = 1
    model.num_logical_experts = model.num_routed_experts = logical
    model.num_physical_experts = physical
    model.num_local_physical_experts = local
    model.num_redundant_experts = physical - logical
    model.num_shared_experts = 0
    model.expert_weights = []
    model.set_eplb_state = types.MethodType(MixtureOfExperts.set_eplb_state, model)
    model.update_physical_experts_metadata = types.MethodType(_no_elastic_ep, model)
    log.info(
        "vllm-eplb: %s %s: balancing its %d FusedMoE layers (%d logical experts in %d slots) through "
        "vllm-eplb's adapter",
        arch, why, len(layers), logical, physical,
    )
    return model


def _no_elastic_ep(self, num_physical_experts: int, num_local_physical_experts: int) -> None:
    raise NotImplementedError("vllm-eplb does not support elastic expert parallelism")


def _check_slots_loaded(model, arch: str, layers: list) -> None:
    """Wrap the model's load_weights for its first call (the model loading): every expert
    slot marked with a sentinel before, none left after (core/slot_fill.py: NaN's bytes in
    the tensor's own format, fp8 and scales included, so a quantized model is checked as
    bytes). A loader written for the logical experts only either leaves the redundant slots
    unfilled or fails on their shape; both refuse the model on every rank alike, with the
    same line (what each rank found is gathered over the expert-parallel group, so a rank
    whose own slots were all filled refuses with the others instead of waiting for them).
    Tensors that online quantization builds on the meta device and replaces while loading
    cannot be marked: they are not checked (and logged), never refused. Later calls are
    weight updates, which may bring some weights only: they load as the model's own
    load_weights does."""
    from vllm_eplb.core.slot_fill import Marks

    original = model.load_weights

    def load_weights(weights, *args, **kwargs):
        from vllm.distributed.parallel_state import get_ep_group

        model.load_weights = original  # the first load only

        marks = _guarded(lambda: Marks.mark([list(r.get_expert_weights()) for r in layers]), arch)
        loaded, failure, unwritten, unchecked = None, None, 0, 0
        try:
            loaded = original(weights, *args, **kwargs)
        except (RuntimeError, ValueError, IndexError, AssertionError) as exc:  # a shape the loader did not expect
            failure = exc
        if failure is None and marks is not None:
            # after loading: the tensors the model uses now (online quantization replaced some)
            found_here = _guarded(lambda: marks.unwritten([list(r.get_expert_weights()) for r in layers]), arch)
            unwritten, unchecked = found_here or (0, 0)
        group = get_ep_group()
        found: list = [None] * group.world_size
        torch.distributed.all_gather_object(
            found, (unwritten, f"{type(failure).__name__}: {failure}" if failure else None), group=group.cpu_group
        )
        unwritten = sum(n for n, _ in found)
        causes = [c for _, c in found if c]
        fix = 'set "num_redundant_experts": 0 in --eplb-config, or serve it without --eplb-config'
        if causes:  # the same line on every rank: the first rank's failure
            raise refuse(arch, f"its weight loader fails with redundant expert slots ({causes[0]})", fix) from failure
        if unwritten:
            slots = layers[0].moe_config.num_experts * len(layers)
            raise refuse(arch, f"its weight loader left {unwritten} of {slots} expert slots unfilled (it loads no redundant experts)", fix)
        if unchecked:
            log.info("vllm-eplb: %d expert tensor(s) of %s were built while loading (online quantization): "
                     "the check that every slot was loaded covers the others", unchecked, arch)
        return loaded

    model.load_weights = load_weights


def _guarded(fn, arch: str):
    """The slot-load check's own work: a tensor it cannot read (a layout no release had yet)
    leaves the model unchecked, never refused and never a dead engine."""
    try:
        return fn()
    except Exception:
        log.warning("vllm-eplb: could not check that %s's weight loader fills every expert slot", arch, exc_info=True)
        return None
