"""Weight updates under a moving placement: new weights land in every slot of each expert.

RL trainers push new weights into a live server every few steps (vLLM's `reload_weights`
RPC, the weight-transfer API `start_weight_update` / `update_weights` /
`finish_weight_update`, `LLM.collective_rpc`). vLLM's loaders assume the start-up layout:
the checkpoint's expert e goes to the physical slots that held e at start-up (slot p holds
p % num_logical). Once vllm-eplb has moved experts, that writes e into slots that now hold
other experts, and a transfer in flight could land the old weights it staged after the
new ones. Two seams handle it (hooks.py, `moe_weight_loader` and the `weight_update_*`
hooks):

- The fused-MoE weight loader (`RoutedExperts.weight_loader`, every model whose experts
  are vLLM FusedMoE layers goes through it, subclasses calling it included): on a balanced
  layer, the call for logical expert e writes e's weights (and scales, biases: any
  tensor with one row per slot) into every local slot that holds e under the placement in
  force, and nowhere else. vLLM's loaders visit an expert once per start-up replica; the
  first visit (its logical id) writes every slot of it, the others write nothing, so each
  slot is written once per update, as vLLM's layerwise reload counts on. At start-up
  placement it loads as vLLM does.
- The worker's update RPCs (`weight_update_begins` / `weight_update_ends`, through the
  `UpdateGuard` the worker's runner state owns: no module state): before an update writes
  anything, the balancer is told (`Balancer.weights_changed`: a cycle in flight ends on
  every rank at the same pass and commits nothing more), or the update is refused in one
  line when it cannot be placed (below); after a reload or the last chunk, `verify_slots`
  takes its reference fingerprints again, from the new weights.

Refused once experts moved from the start-up layout (before anything is written; nothing
is refused while the placement is the start-up one): a kernel-format reload
(`is_checkpoint_format=False`, tensors copied as given), a weight-transfer engine that
writes parameter memory directly instead of through the model's `load_weights` (every
engine but nccl and ipc), and a model whose loader writes a layer's experts another way
than one expert at a time through the fused-MoE loader (seen while its weights first load:
GPT-OSS copies its stacked experts itself, Llama-4 loads a stacked tensor of the rank's
start-up experts).

Every rank of the expert-parallel group must apply an update between the same two
forward passes: one engine's workers do (they take every call from one queue, in one
order); several engines (data parallel) must pause generation around it. The balancer
checks it at its next vote.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

log = logging.getLogger("vllm.eplb")

SLOTS = "_vllm_eplb_slots"  # on a balanced layer's RoutedExperts: its ExpertSlots
SEEN = "_vllm_eplb_loads"  # on every RoutedExperts: how its first load wrote it

# Weight-transfer engines that hand what they receive to the model's load_weights (checkpoint
# format, through the fused-MoE loader): the others write parameter memory by a fixed layout.
ENGINES_THROUGH_LOAD_WEIGHTS = ("NCCLWeightTransferEngine", "IPCWeightTransferEngine")


class WeightUpdateRefused(RuntimeError):
    """A weight update vllm-eplb cannot write into the placement in force (one line: why, what to do)."""


@dataclass
class LoadsSeen:
    """How a layer's loader wrote its experts while the model first loaded."""

    per_expert: int = 0  # calls with one expert's tensor
    whole_layer: int = 0  # calls with a stacked tensor of the rank's experts


def _whole_layer(experts, loaded_weight) -> bool:
    """A call that loads every local slot of the parameter at once, in the start-up layout
    (vLLM's loader takes a 3-D tensor whole; GPT-OSS mxfp4 copies the combined experts)."""
    quant = getattr(experts, "quant_config", None)
    return loaded_weight.dim() == 3 or bool(quant and quant.get_name() == "gpt_oss_mxfp4")


def _per_slot(experts, param) -> bool:
    """A parameter with one row per local slot (weights, per-expert scales, biases)."""
    return param.dim() > 0 and param.shape[0] == experts.local_num_experts


def placed_load(load_into_slot, experts, param, loaded_weight, weight_name, shard_id, expert_id, return_success=False):
    """`RoutedExperts.weight_loader` on a balanced layer: `load_into_slot` is vLLM's loader,
    `expert_id` the start-up physical id vLLM's mapping gives."""
    slots: ExpertSlots | None = getattr(experts, SLOTS, None)
    if slots is None:  # the model's first load (or a layer vllm-eplb does not balance)
        if _per_slot(experts, param):
            seen = experts.__dict__.setdefault(SEEN, LoadsSeen())
            if _whole_layer(experts, loaded_weight):
                seen.whole_layer += 1
            else:
                seen.per_expert += 1
        return load_into_slot(experts, param, loaded_weight, weight_name, shard_id, expert_id, return_success)
    return slots.load(load_into_slot, experts, param, loaded_weight, weight_name, shard_id, expert_id, return_success)


@dataclass
class ExpertSlots:
    """One balanced layer, as its loader sees it."""

    layer: int  # MoE layer index (the balancer's)
    row: Callable[[], np.ndarray]  # physical slot -> logical expert in force (every slot of the layer)
    start: np.ndarray  # the same at start-up: what vLLM's loaders assume
    local_slots: list[int]  # this rank's physical slots, in local order
    num_logical: int
    placeable: bool  # its loader writes one expert at a time through this seam
    on_write: Callable[[], None]  # the balancer hears of the update (idempotent per pass)
    refuse: Callable[[list[int]], str]  # the line refusing an update that cannot be placed

    def moved(self) -> bool:
        return not np.array_equal(self.row(), self.start)

    def load(self, load_into_slot, experts, param, loaded_weight, weight_name, shard_id, expert_id, return_success):
        self.on_write()
        if not _per_slot(experts, param):
            # a layer-wide value (a global scale): no slot to place
            return load_into_slot(experts, param, loaded_weight, weight_name, shard_id, expert_id, return_success)
        row = self.row()
        if np.array_equal(row, self.start):  # what vLLM's loaders assume: load as they do
            return load_into_slot(experts, param, loaded_weight, weight_name, shard_id, expert_id, return_success)
        if not self.placeable or _whole_layer(experts, loaded_weight):
            raise WeightUpdateRefused(self.refuse([self.layer]))
        if not 0 <= expert_id < self.num_logical:
            # a start-up replica's id: the call with the expert's own id wrote every slot of it
            return False if return_success else None
        written = False
        for slot in self.local_slots:
            if row[slot] == expert_id:
                written = bool(load_into_slot(experts, param, loaded_weight, weight_name, shard_id, slot, True)) or written
        return written if return_success else None


@dataclass
class PlacedModel:
    """Every balanced layer of the model this worker serves, and what updates it refuses."""

    arch: str
    layers: list[ExpertSlots] = field(default_factory=list)

    def moved_layers(self) -> list[int]:
        return [s.layer for s in self.layers if s.moved()]

    def loader_refusal(self, moved: list[int]) -> str:
        return (
            f"vllm-eplb: {self.arch}'s weight loader writes a layer's experts in the start-up layout (not one "
            f"expert at a time through the fused-MoE weight loader), and experts of MoE layers {_few(moved)} moved "
            "since start-up: this update would land in the wrong slots; serve it without --eplb-config to update "
            "its weights in place"
        )

    def refusal(self, kind: str, checkpoint_format: bool = True, engine: str | None = None) -> str:
        """Why this update cannot be placed ('' if it can)."""
        moved = self.moved_layers()
        if not moved:
            return ""
        if kind == "reload" and not checkpoint_format:
            return (
                "vllm-eplb: reload_weights(is_checkpoint_format=False) copies expert tensors as given, and experts "
                f"of MoE layers {_few(moved)} moved since start-up: reload in checkpoint format "
                "(is_checkpoint_format=True), which vllm-eplb writes into every slot of each expert"
            )
        if engine is not None and engine not in ENGINES_THROUGH_LOAD_WEIGHTS:
            return (
                f"vllm-eplb: the weight transfer engine {engine} writes parameter memory directly, and experts of MoE "
                f"layers {_few(moved)} moved since start-up: use the nccl or ipc engine (they load through the "
                "model's weight loader, which vllm-eplb places), or serve without --eplb-config"
            )
        stuck = [s.layer for s in self.layers if s.layer in moved and not s.placeable]
        return self.loader_refusal(stuck) if stuck else ""


def _few(layers: list[int]) -> str:
    return ", ".join(map(str, layers[:6])) + (", ..." if len(layers) > 6 else "")


def attach(model, arch: str, topo, rank: int, placement: Callable[[], np.ndarray], start: np.ndarray,
           on_write: Callable[[], None], dummy_load: bool) -> PlacedModel:
    """Give every balanced layer of `model` (vLLM's MixtureOfExperts interface) its slots.
    `placement()` is the balancer's (layers, physical) placement in force."""
    from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts

    placed = PlacedModel(arch)
    local = list(topo.rank_slots(rank))
    for i, layer in enumerate(model.moe_layers):
        experts = getattr(layer, "routed_experts", layer)
        seen = getattr(experts, SEEN, LoadsSeen())
        # a subclass with its own weight_loader (GPT-OSS) loads its own way; fused shared
        # experts take slots the placement does not know
        own_loader = type(experts).weight_loader is RoutedExperts.weight_loader
        fused_shared = getattr(getattr(experts, "expert_map_manager", None), "num_fused_shared_experts", 0)
        placeable = own_loader and not fused_shared and seen.whole_layer == 0 and (seen.per_expert > 0 or dummy_load)
        slots = ExpertSlots(
            i, (lambda i=i: placement()[i]), start[i].copy(), local, topo.num_logical, placeable, on_write,
            placed.loader_refusal,
        )
        setattr(experts, SLOTS, slots)
        placed.layers.append(slots)
    stuck = [s.layer for s in placed.layers if not s.placeable]
    if stuck:
        log.info(
            "vllm-eplb: %s loads the experts of %d MoE layers in the start-up layout: weight updates are refused "
            "once their experts moved", arch, len(stuck),
        )
    return placed


# ---- one owner: the guard of the slots, held by the runner state

class UpdateGuard:
    """What keeps the expert slots right while weights change, in one object the runner state
    owns (`VllmEplbState.guard`): the placed model (where an update's tensors go, and what
    cannot be placed), the balancer's `weights_changed` (a cycle in flight ends on every rank)
    and, with verify_slots, the slot verifier (core/slot_check.py: its reference bytes taken
    again once an update is in, every commit checked against them). A worker's update RPCs
    find it through the worker's model runner (`guard_of`)."""

    def __init__(self, placed: PlacedModel, weights_changed: Callable[[], None], placement: Callable[[], np.ndarray],
                 verifier=None, *, settle: Callable[[], None] | None = None):
        self.placed = placed
        self.weights_changed = weights_changed
        self.settle = settle  # the balancer's settle(): a late tick's pass processed before deciding
        self.placement = placement  # the balancer's (layers, physical) placement in force
        self.verifier = verifier  # SlotVerifier, or None without verify_slots
        self._verified = placement().copy() if verifier is not None else None  # the placement last checked

    def begin(self, kind: str, checkpoint_format: bool = True, engine: str | None = None) -> None:
        """Before an update writes anything: refuse it if it cannot be placed (the same line
        on every rank: the placement is the same everywhere), else tell the balancer. The
        balancer first processes a pass whose tick is late (`settle`): every rank decides
        from the placement of the pass its clock is at, so none refuses what a peer accepts."""
        if self.settle is not None:
            self.settle()
        problem = self.placed.refusal(kind, checkpoint_format, engine)
        if problem:
            log.error("%s", problem)
            raise WeightUpdateRefused(problem)
        self.weights_changed()

    def end(self) -> None:
        """The new weights are in: verify_slots' reference fingerprints are theirs from now on."""
        if self.verifier is None:
            return
        placement = self.placement()
        bad = self.verifier.refresh(placement)
        self._verified = placement.copy()
        if bad:
            log.error("vllm-eplb: verify_slots: after a weight update, %d slot(s) hold other bytes than the other "
                      "replicas of their expert (layer, slot, expert): %s", len(bad), bad[:8])

    def check_commits(self, pass_no: int) -> None:
        """verify_slots: every layer whose placement changed since the last check (a commit)
        holds, slot by slot, the bytes of the experts its map names."""
        placement = self.placement()
        for layer in np.nonzero((placement != self._verified).any(axis=1))[0]:
            bad = self.verifier.check(int(layer), placement[layer])
            if bad:
                log.error("vllm-eplb: verify_slots: pass %d layer %d: %d slot(s) hold other bytes than the expert "
                          "their map names (layer, slot, expert): %s", pass_no, layer, len(bad), bad[:8])
            self._verified[layer] = placement[layer]


def guard_of(worker) -> UpdateGuard | None:
    """The guard of the runner state balancing this worker's model (None: nothing balanced
    here, or upstream's own EPLB state). Every runner keeps its EPLB state as `eplb_state`."""
    state = getattr(getattr(worker, "model_runner", None), "eplb_state", None)
    return getattr(state, "guard", None)


# ---- the worker's update RPCs (hooks weight_update_*)


def _checkpoint_format(worker, args, kwargs) -> bool:
    """reload_weights' is_checkpoint_format, as the model runner's signature binds it."""
    try:
        bound = inspect.signature(worker.model_runner.reload_weights).bind_partial(*args, **(kwargs or {}))
    except (TypeError, ValueError, AttributeError):
        return True
    return bool(bound.arguments.get("is_checkpoint_format", True))


def weight_update_begins(worker, kind: str, args=(), kwargs=None) -> bool:
    """Before one update RPC of the worker (kind: reload, start, update or finish) writes
    anything: the balancer hears of it, or the update is refused. Returns False where the
    RPC must not run.

    A refused update is refused by every rank alike (the placement is the same
    everywhere), but only the executor's last worker raises: vLLM's multiprocess executor
    stops reading replies at the first failure and would read the others' as the replies
    of the next RPC. The others log the same line and skip the update."""
    guard = guard_of(worker)
    draft = getattr(worker, "_weight_update_is_draft", False) and kind in ("update", "finish")
    if guard is None or draft:  # a draft model is not balanced
        return True
    engine = getattr(worker, "weight_transfer_engine", None) if kind in ("start", "update") else None
    try:
        guard.begin(
            kind, _checkpoint_format(worker, args, kwargs) if kind == "reload" else True,
            type(engine).__name__ if engine is not None else None,
        )
    except WeightUpdateRefused:
        if getattr(worker, "rank", 0) == worker.parallel_config.world_size - 1:
            raise
        return False
    return True


def weight_update_ends(worker, kind: str) -> None:
    """After a reload, or the last chunk's finish: the new weights are in."""
    guard = guard_of(worker)
    if guard is None or kind not in ("reload", "finish"):
        return
    if kind == "finish" and getattr(worker, "_weight_update_is_draft", False):
        return
    guard.end()
