"""`VllmEplbState`: stands in for vLLM's `EplbState` inside the model runner.

vLLM's runners (V1 GPU, the CPU runner that subclasses it, and the V2 runner's
EPLBController) all go through the same seam: `EplbState(parallel_config,
device)`, then `add_model(model, model_config)` after the weights are loaded,
`prepare_forward(...)` before each forward pass and `step(is_dummy, is_profile,
log_stats)` after each pass, dummy passes included. This class keeps that
interface and drives the vllm-eplb `Balancer` instead: `step` is one `tick()`.
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from vllm_eplb.core import Balancer, Comm, MoELayout, RoutingMaps, Topology, default_placement, new_gloo_group
from vllm_eplb.core import records
from vllm_eplb.core.transfer.select import make_backend

from .config import EplbConfig, published

log = logging.getLogger("vllm.eplb")


def _ep_subgroups(timeout_s: float, count: int, backend: str = "gloo"):
    """`count` new groups (gloo by default) over this rank's expert-parallel group.

    torch.distributed.new_group is collective over the whole world, so every
    process creates the groups of every EP group, in the same order."""
    from vllm.distributed.parallel_state import get_ep_group, get_world_group

    ep = get_ep_group()
    world = get_world_group()
    everyone: list = [None] * world.world_size
    dist.all_gather_object(everyone, list(ep.ranks), group=world.cpu_group)
    all_groups = sorted({tuple(r) for r in everyone})
    mine = []
    for _ in range(count):
        for ranks in all_groups:
            g = (
                new_gloo_group(list(ranks), timeout_s)
                if backend == "gloo"
                else dist.new_group(list(ranks), backend=backend, timeout=timedelta(seconds=timeout_s))
            )
            if tuple(ep.ranks) == ranks:
                mine.append(g)
    return ep, mine


class VllmEplbState:
    """The subset of vllm.distributed.eplb.eplb_state.EplbState the runners call."""

    def __init__(self, parallel_config, device: torch.device):
        self.parallel_config = parallel_config
        self.device = torch.device(device)
        self.balancer: Balancer | None = None
        self.metrics = None
        self.is_async = False  # the runners start upstream's async thread when True
        self.model_states: dict = {}
        self.num_unpadded_tokens: list[torch.Tensor] = []
        self.should_record: torch.Tensor | None = None
        self._model_hash = None
        self.step_ns = 0  # time spent in step() (tick + metrics), for the overhead figures

    # ---- called by the runner once the weights are loaded
    def add_model(self, model, model_config) -> None:
        if self.balancer is not None:
            log.warning("vllm-eplb balances the main model only; %s is served without rebalancing", type(model).__name__)
            return
        cfg = self.config = self._resolve_config()
        bcfg = cfg.balancer_config()
        ep, (agreement_group, transfer_group) = _ep_subgroups(max(bcfg.agreement_timeout_s, bcfg.transfer_timeout_s), 2)
        layers = model.num_moe_layers
        topo = Topology(ep.world_size, model.num_logical_experts, model.num_physical_experts, _ranks_per_node(ep))
        placement = default_placement(topo, layers)
        maps = RoutingMaps.allocate(placement, topo, self.device)
        pass_load = torch.zeros((layers, topo.num_physical), dtype=torch.int32, device=self.device)
        model.set_eplb_state(pass_load, maps.log2phy, maps.replica_count)
        self._share_layer_tensors(model)

        weights = model.expert_weights  # [layer][tensor], each (local slots, -1), aliasing the parameters
        layout = MoELayout(topo, layers, pass_load, maps, lambda layer: list(weights[layer]), record_flag=self.should_record)
        backend = make_backend(
            cfg.resolved_backend(), self.device, topo, ep.rank_in_group, layout.weights_of, layers,
            gloo_group=transfer_group, cpu_group=agreement_group,
            nccl_group=lambda: _ep_subgroups(bcfg.transfer_timeout_s, 1, backend="nccl")[1][0],
        )
        self.balancer = Balancer(bcfg, layout, Comm(ep.rank_in_group, ep.world_size, agreement_group, backend))
        if cfg.initial_placement_path:
            rec = records.load(cfg.initial_placement_path)
            records.check_matches(rec, cfg.initial_placement_path, layers, topo.num_logical, topo.num_physical, topo.num_ranks)
            moved = self.balancer.rebalance_now(rec.placement)
            log.info("vllm-eplb: started on the placement of %s (%d layers moved)", cfg.initial_placement_path, moved)
        self._model_hash = model_config.compute_hash() if model_config is not None else None
        if cfg.metrics:
            from .metrics import BalancerMetrics

            self.metrics = BalancerMetrics(ep.rank_in_group, self)
            self.metrics.update(self.balancer)
        log.info(
            "vllm-eplb: EP rank %d/%d, %d MoE layers, %d logical experts in %d slots (%d per rank), policy %s, "
            "window %d passes every %d, backend %s",
            ep.rank_in_group,
            ep.world_size,
            layers,
            topo.num_logical,
            topo.num_physical,
            topo.slots_per_rank,
            bcfg.policy,
            bcfg.window_size,
            bcfg.step_interval,
            backend.name,
        )

    def _resolve_config(self) -> EplbConfig:
        """The config the serving process published (--eplb-config), else vLLM's own keys."""
        cfg = published()
        if cfg is not None:
            return cfg
        ec = self.parallel_config.eplb_config
        return EplbConfig(window_size=ec.window_size, step_interval=ec.step_interval, num_redundant_experts=ec.num_redundant_experts)

    @classmethod
    def from_mapping(cls, **kwargs):
        raise NotImplementedError(
            "vllm-eplb does not support elastic expert parallelism (rebuilding EPLB state from a mapping)"
        )

    def _share_layer_tensors(self, model) -> None:
        """Give every MoE layer the shared record flag and unpadded-token counters, as
        upstream's EplbState does; the router reads both."""
        ubatches = max(1, getattr(self.parallel_config, "num_ubatches", 1) or 1)
        self.num_unpadded_tokens = [torch.tensor(0, dtype=torch.int32, device=self.device) for _ in range(ubatches)]
        self.should_record = torch.zeros((), dtype=torch.bool, device=self.device)
        for layer in model.moe_layers:
            ls = getattr(layer, "eplb_state", None)
            if ls is not None:
                ls.should_record_tensor = self.should_record
                ls.num_unpadded_tokens_tensors = self.num_unpadded_tokens

    # ---- called around every forward pass
    def prepare_forward(self, model_config, num_unpadded_tokens: int, ubatch_slices=None) -> None:
        if not self.num_unpadded_tokens:
            return
        if ubatch_slices is None:
            self.num_unpadded_tokens[0].fill_(num_unpadded_tokens)
            return
        for t, sl in zip(self.num_unpadded_tokens, ubatch_slices):
            ts = sl.token_slice
            t.fill_(max(0, min(num_unpadded_tokens, ts.stop) - ts.start))

    def step(self, is_dummy: bool = False, is_profile: bool = False, log_stats: bool = False) -> None:
        # The profiling pass at start-up is not a serving pass; every rank skips it alike.
        if self.balancer is None or is_profile:
            return
        n = self.balancer.transitions_total
        t0 = time.perf_counter_ns()
        self.balancer.tick()
        if self.metrics is not None:
            self.metrics.update(self.balancer, transitioned=self.balancer.transitions_total != n)
        self.step_ns += time.perf_counter_ns() - t0

    # ---- parts of upstream's interface vllm-eplb has no use for
    def start_async_loop(self, *args, **kwargs) -> None:
        pass

    def drain_async(self, *args, **kwargs) -> None:
        pass

    def rearrange(self, *args, **kwargs):
        return None

    def shutdown(self) -> None:
        if self.balancer is not None:
            self.balancer.shutdown()


def _ranks_per_node(ep) -> int:
    try:
        from vllm.distributed.parallel_state import get_node_count

        nodes = get_node_count()
    except Exception:
        nodes = 1
    if nodes <= 1 or ep.world_size % nodes:
        return 0
    return ep.world_size // nodes
