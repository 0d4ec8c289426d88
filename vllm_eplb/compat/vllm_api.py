"""Upstream vLLM EPLB function signatures (0.26-0.32), backed by vllm-eplb.

vLLM's own EPLB tests call these names (`DefaultEplbPolicy.rebalance_experts`,
`compute_logical_maps`, `_commit_eplb_maps`, `rearrange_expert_weights_inplace`,
`transfer_layer`/`move_from_buffer`, `create_eplb_communicator`, ...). The patches in
patches/tests/ import them from here instead of from vLLM, so upstream's assertions
run against vllm-eplb's policy, map commit and transfer engine. Each function keeps
upstream's contract (argument order, return types, AssertionError on bad input) and
does its work with vllm-eplb's code; where releases differ (the map commit's elastic-EP
path), it follows the state it is given. No vLLM import.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from vllm_eplb.core.placement import Topology, load_stats, logical_to_physical, replica_counts
from vllm_eplb.core.routing_maps import RoutingMaps
from vllm_eplb.core.policies import keep_in_place
from vllm_eplb.core.policies.deepseek import deepseek_placement
from vllm_eplb.core.transfer import GlooBackend, InFlightStep, TransferBackend, TransferEngine, plan_layer


# --------------------------------------------------------------------------- policy


class VllmEplbPolicy:
    """vllm-eplb's `deepseek` policy behind vLLM's AbstractEplbPolicy interface."""

    @classmethod
    def rebalance_experts(
        cls,
        weight: torch.Tensor,
        num_replicas: int,
        num_groups: int,
        num_nodes: int,
        num_ranks: int,
        old_global_expert_indices: torch.Tensor | None = None,
    ) -> torch.Tensor:
        try:
            new = deepseek_placement(weight.float().cpu().numpy(), num_replicas, num_groups, num_nodes, num_ranks)
        except ValueError as exc:  # upstream's contract: invalid shapes are assertion errors
            raise AssertionError(str(exc)) from exc
        if old_global_expert_indices is not None:
            new = cls.preserve_intragpu_slots(new, num_ranks, old_global_expert_indices.cpu().numpy())
        return torch.from_numpy(new)

    @classmethod
    def preserve_intragpu_slots(cls, phy2log: np.ndarray, num_ranks: int, old_phy2log: np.ndarray) -> np.ndarray:
        num_physical = phy2log.shape[1]
        if num_ranks <= 0 or num_physical % num_ranks:
            return phy2log
        return keep_in_place(phy2log, old_phy2log, num_physical // num_ranks)


# --------------------------------------------------------------------------- maps


def compute_logical_maps(physical_to_logical: torch.Tensor, num_logical_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(logical->physical padded with -1 to the largest replica count, replica counts).
    Slots holding -1 are unused and ignored."""
    p2l = physical_to_logical.cpu().numpy().astype(np.int64)
    squeeze = p2l.ndim == 1
    if squeeze:
        p2l = p2l[None]
    # unused slots go to a scratch expert past the end, dropped afterwards
    p2l = np.where(p2l < 0, num_logical_experts, p2l)
    counts = replica_counts(p2l, num_logical_experts + 1)[:, :num_logical_experts]
    width = max(1, int(counts.max(initial=1)))
    l2p = logical_to_physical(p2l, num_logical_experts + 1, int(replica_counts(p2l, num_logical_experts + 1).max()))
    l2p = l2p[:, :num_logical_experts, :width]
    out_l2p = torch.from_numpy(l2p).to(physical_to_logical.dtype)
    out_cnt = torch.from_numpy(counts).to(physical_to_logical.dtype)
    if squeeze:
        return out_l2p[0], out_cnt[0]
    return out_l2p, out_cnt


def _compute_eplb_load_stats(num_tokens_per_rank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over layers of the mean per-rank load, sum over layers of the max)."""
    mean, top = load_stats(num_tokens_per_rank.double().cpu().numpy())
    return torch.tensor(mean, dtype=num_tokens_per_rank.dtype), torch.tensor(top, dtype=num_tokens_per_rank.dtype)


def _maps_of(model_state) -> RoutingMaps:
    return RoutingMaps(
        model_state.physical_to_logical_map, model_state.logical_to_physical_map, model_state.logical_replica_count
    )


def _commit_eplb_maps_for_layer(model_state, new_physical_to_logical_map: torch.Tensor, layer: int) -> None:
    """Commit one layer's maps in place (vllm-eplb's RoutingMaps.write_layer)."""
    current = model_state.physical_to_logical_map[layer]
    assert new_physical_to_logical_map.shape == current.shape, (
        f"the number of physical experts must stay {current.shape[0]}, got {new_physical_to_logical_map.shape[0]}"
    )
    num_logical = model_state.logical_to_physical_map.shape[1]
    topo = _logical_topology(num_logical, current.shape[0])
    _maps_of(model_state).write_layer(layer, new_physical_to_logical_map.cpu().numpy(), topo)


def _commit_eplb_maps(model_state, new_physical_to_logical_map: torch.Tensor) -> None:
    """Commit every layer's maps in place. A different slot count (elastic EP) takes a
    view of that width of the preallocated map storage, as upstream 0.30+ does; a state
    without that storage (0.26's) gets a new map of the new width, as 0.26 does."""
    new = new_physical_to_logical_map
    current = model_state.physical_to_logical_map
    if new.shape[1] != current.shape[1]:
        storage = getattr(model_state, "physical_to_logical_map_buffer", None)
        if isinstance(storage, torch.Tensor):
            view = storage[:, : new.shape[1]]
            assert view.shape == new.shape
            model_state.physical_to_logical_map = view
        else:
            model_state.physical_to_logical_map = torch.empty(new.shape, dtype=current.dtype, device=current.device)
    for layer in range(new.shape[0]):
        _commit_eplb_maps_for_layer(model_state, new[layer], layer)


@dataclass(frozen=True)
class _LogicalTopology(Topology):
    """A topology for map writes only: replica counts are what they are, so the
    physical >= logical check of placement planning does not apply."""

    def __post_init__(self) -> None:
        pass


def _logical_topology(num_logical: int, num_physical: int) -> Topology:
    return _LogicalTopology(num_ranks=1, num_logical=num_logical, num_physical=num_physical)


# --------------------------------------------------------------------------- transfer


@dataclass
class Communicator:
    """What `create_eplb_communicator` returns: the vllm-eplb transfer backend for the
    group, whatever upstream communicator name was asked for."""

    backend: TransferBackend
    requested: str

    def set_stream(self, stream) -> None:  # upstream API; vllm-eplb's gloo path has no stream
        self.stream = stream


def create_eplb_communicator(group_coordinator, backend: str | None, expert_weights, expert_buffer=None) -> Communicator:
    """vllm-eplb moves CPU tensors over gloo on the group's CPU group, for any backend name."""
    return Communicator(GlooBackend(group_coordinator.cpu_group), backend or "")


def _engine(backend: TransferBackend, group, layer_weights) -> tuple[TransferEngine, int, int]:
    rank = dist.get_rank(group)
    world = dist.get_world_size(group)
    return TransferEngine(backend, lambda layer: list(layer_weights), rank), rank, world


def _backend_for(communicator, ep_group) -> TransferBackend:
    if isinstance(communicator, Communicator):
        return communicator.backend
    return GlooBackend(ep_group)


def _layer_plan(layer: int, old: torch.Tensor, new: torch.Tensor, world: int):
    old_np = old.cpu().numpy().astype(np.int64)
    new_np = new.cpu().numpy().astype(np.int64)
    num_physical = old_np.shape[0]
    num_logical = int(max(old_np.max(), new_np.max())) + 1
    return plan_layer(layer, old_np, new_np, _LogicalTopology(world, num_logical, num_physical))


def rearrange_expert_weights_inplace(
    old_global_expert_indices: torch.Tensor,
    new_global_expert_indices: torch.Tensor,
    expert_weights,
    expert_weights_buffer,
    ep_group,
    communicator=None,
    is_profile: bool = False,
    rank_mapping: dict[int, int] | None = None,
) -> None:
    """Move every layer's experts to the new placement with vllm-eplb's transfer plan and
    engine, one layer at a time (plan, post, wait, commit)."""
    if rank_mapping is not None:
        raise NotImplementedError("vllm-eplb does not support elastic EP rank remapping")
    if is_profile:
        return  # nothing moves while profiling
    backend = _backend_for(communicator, ep_group)
    for layer, weights in enumerate(expert_weights):
        engine, rank, world = _engine(backend, ep_group, weights)
        step = engine.start([_layer_plan(layer, old_global_expert_indices[layer], new_global_expert_indices[layer], world)])
        engine.finish(step)
        engine.commit(step)


@dataclass
class TransferMetadata:
    engine: TransferEngine
    step: InFlightStep


def transfer_layer(
    old_layer_indices: torch.Tensor,
    new_layer_indices: torch.Tensor,
    expert_weights,
    expert_weights_buffer,
    ep_group,
    communicator=None,
    cuda_stream=None,
    layer_idx: int = 0,
    **_,
) -> TransferMetadata:
    """Start and complete one layer's transfers into staging (nothing is written yet)."""
    engine, rank, world = _engine(_backend_for(communicator, ep_group), ep_group, expert_weights)
    step = engine.start([_layer_plan(layer_idx, old_layer_indices, new_layer_indices, world)])
    engine.finish(step)
    return TransferMetadata(engine, step)


def move_from_buffer(expert_weights, expert_weights_buffers, transfer_metadata: TransferMetadata, new_indices, ep_rank: int, **_) -> None:
    """Commit a layer transferred by `transfer_layer`."""
    transfer_metadata.engine.commit(transfer_metadata.step)
