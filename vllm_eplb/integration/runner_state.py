"""`VllmEplbState`: stands in for vLLM's `EplbState` inside the model runner.

vLLM's runners (V1 GPU, the CPU runner that subclasses it, and the V2 runner's
EPLBController) all go through the same seam: `EplbState(parallel_config,
device)`, then `add_model(model, model_config)` after the weights are loaded,
`prepare_forward(...)` before each forward pass and `step(is_dummy, is_profile,
log_stats)` after each pass, dummy passes included. This class keeps that
interface and drives the vllm-eplb `Balancer` instead: `step` is one `tick()`.

The pass clock (core/pass_clock.py) has two counts. The runner's: forward passes
this runner started, counted where they start: `prepare_forward` (every real pass of
the V1 runner, generate, pooling and every pipeline stage alike) and `dummy_pass`
(the runner's dummy passes: DP padding on idle ranks, warm-up). The MoE layers': the
first balanced layer's router advances a ForwardCounter every time it runs
(`advance_if_first_layer`, called by vllm-eplb's torch map-and-record). The MoE
collectives pair the k-th forward pass of every rank of the EP group, so the layers'
count is the same on every rank at the same pass whatever path ran it. On CPU
(vllm-eplb's torch router, host memory) the layers' count is the schedule and the
runner's checks it; on GPU (vllm-eplb's wrapper around vLLM's Triton kernel advances a
device counter, recorded into CUDA graphs) the runner's count is the schedule and the
device count checks it, one vote late. Before each pass the balancer catches up
on passes whose `step` never came (pooling models and non-last pipeline stages never
call it), so what was decided for pass p is in force before pass p + 1 on every rank.

At start-up every rank compares the protocol's fields with its peers (the core's, plus
this integration's: the eplb.json keys behind the topology and the backend, and the
placement of `initial_placement_path`); on a difference none balances
(`config_mismatch`) and serving goes on.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from vllm_eplb.compat.guards import only_where
from vllm_eplb.core import (
    Balancer, Comm, ForwardCounter, MoELayout, PassClock, RoutingMaps, Topology, default_placement, new_gloo_group,
)
from vllm_eplb.core import records
from vllm_eplb.core.faults import Fault
from vllm_eplb.core.protocol import short_digest
from vllm_eplb.core.slot_check import SlotVerifier
from vllm_eplb.core.transfer import DeferredBackend
from vllm_eplb.core.transfer.select import make_backend
from vllm_eplb.kernels import replica_dispatch

from . import weight_updates
from .config import EplbConfig, published

log = logging.getLogger("vllm.eplb")


def _ep_subgroups(timeouts_s: list[float], backend: str = "gloo"):
    """One new group (gloo by default) over this rank's expert-parallel group per timeout.

    torch.distributed.new_group is collective over the whole world, so every
    process creates the groups of every EP group, in the same order."""
    from vllm.distributed.parallel_state import get_ep_group, get_world_group

    ep = get_ep_group()
    world = get_world_group()
    everyone: list = [None] * world.world_size
    dist.all_gather_object(everyone, list(ep.ranks), group=world.cpu_group)
    all_groups = sorted({tuple(r) for r in everyone})
    mine = []
    for timeout_s in timeouts_s:
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
        self.forwards = 0  # the pass clock: forward passes started
        self._counts_forwards = False  # set by the first prepare_forward/dummy_pass
        self._dummy_counted = False  # inside a dummy pass, already on the clock
        self._metrics_failures = 0
        self.layer_counter: ForwardCounter | None = None
        self.relay = None  # MetricsRelay: every rank's metrics to the front end (rank 0)
        self.guard: weight_updates.UpdateGuard | None = None  # weight updates into the slots; verify_slots

    # ---- called by the runner once the weights are loaded
    def add_model(self, model, model_config, model_name: str | None = None, **_) -> None:
        """model_name (where guard add_model_name holds, compat/guards.py): set for a
        speculative-decoding draft MoE model, which comes second; only the first (main)
        model is balanced."""
        if self.balancer is not None:
            log.warning("vllm-eplb balances the main model only; %s is served without rebalancing", type(model).__name__)
            return
        cfg = self.config = self._resolve_config()
        bcfg = cfg.balancer_config()
        # Each group times out on its own bound: a round wait is agreement_timeout_s at most.
        # The third carries every rank's metrics to rank 0 (metrics_relay.py): never waited on.
        ep, (agreement_group, transfer_group, relay_group) = _ep_subgroups(
            [bcfg.agreement_timeout_s, bcfg.transfer_timeout_s, bcfg.agreement_timeout_s]
        )
        layers = model.num_moe_layers
        topo = Topology(ep.world_size, model.num_logical_experts, model.num_physical_experts, _ranks_per_node(ep))
        placement = default_placement(topo, layers)
        maps = RoutingMaps.allocate(placement, topo, self.device)
        pass_load = torch.zeros((layers, topo.num_physical), dtype=torch.int32, device=self.device)
        model.set_eplb_state(pass_load, maps.log2phy, maps.replica_count)
        ubatches = self._share_layer_tensors(model)
        clock = self._pass_clock(pass_load, ubatches)

        weights = model.expert_weights  # [layer][tensor], each (local slots, -1), aliasing the parameters
        layout = MoELayout(
            topo, layers, pass_load, maps, lambda layer: list(weights[layer]),
            record_flag=self.should_record, max_pass_tokens=_max_pass_tokens(model_config),
            load_copies=_tensor_parallel_size(),
        )
        # built by the balancer once every rank agreed on it: its set-up is collective
        backend = DeferredBackend(cfg.resolved_backend(), lambda: make_backend(
            cfg.resolved_backend(), self.device, topo, ep.rank_in_group, layout.weights_of, layers,
            gloo_group=transfer_group, cpu_group=agreement_group,
            nccl_group=lambda: _ep_subgroups([bcfg.transfer_timeout_s], backend="nccl")[1][0],
        ))
        rec = None
        if cfg.initial_placement_path:
            rec = records.load(cfg.initial_placement_path)
            records.check_matches(rec, cfg.initial_placement_path, layers, topo.num_logical, topo.num_physical, topo.num_ranks)
        # what the core cannot see: eplb.json's keys as this host read them (the rest it compares itself)
        shared = dict(
            num_redundant_experts=cfg.num_redundant_experts,
            initial_placement=short_digest(rec.placement.tobytes()) if rec is not None else "none",
            # every rank must pick a token's replica alike, and the verifier's start-up gather is collective
            replica_dispatch=cfg.replica_dispatch,
            verify_slots=cfg.verify_slots,
        )
        self.balancer = Balancer(
            bcfg, layout, Comm(ep.rank_in_group, ep.world_size, agreement_group, backend), clock=clock, shared=shared
        )
        atexit.register(self.shutdown)  # the planner process and the backend's threads
        balancer = self.balancer
        placed = weight_updates.attach(
            model, type(model).__name__, topo, ep.rank_in_group, lambda: balancer.placement, placement,
            balancer.weights_changed, _dummy_load(),
        )
        # Before the first forward pass (and any graph capture). Every rank must route a token to
        # the same replica: where the start-up check found configs that differ, every rank (it
        # fails alike everywhere) keeps vLLM's own hash dispatch.
        replica_dispatch.select(cfg.replica_dispatch if self.balancer.enabled else "hash")
        verifier = None
        if cfg.verify_slots and self.balancer.enabled:  # enabled alike on every rank: the start-up check passed
            verifier = SlotVerifier(layout.weights_of, layers, self.balancer.placement, topo, ep.rank_in_group, agreement_group)
            if verifier.replicas_disagreeing:
                log.error("vllm-eplb: verify_slots: replicas already differ at start-up (layer, expert): %s",
                          verifier.replicas_disagreeing[:8])
        self.guard = weight_updates.UpdateGuard(placed, balancer.weights_changed, lambda: balancer.placement, verifier,
                                                 settle=balancer.settle)
        if rec is not None and self.balancer.enabled:  # every rank holds the same record (checked above)
            moved = self.balancer.rebalance_now(rec.placement)
            log.info("vllm-eplb: started on the placement of %s (%d layers moved)", cfg.initial_placement_path, moved)
            if verifier is not None:
                self.guard.check_commits(self.balancer.pass_no)
        self._model_hash = model_config.compute_hash() if model_config is not None else None
        # prometheus_client is imported here, in the worker, not when the hooks load: its
        # multiprocess mode is chosen at import (metrics.py)
        from .metrics import BalancerMetrics, RelayedRanks, snapshot
        from .metrics_relay import MetricsRelay

        if cfg.metrics:
            self.metrics = BalancerMetrics(ep.rank_in_group, self)
            self.metrics.update(self.balancer)
        # every rank posts the relay's gathers (whether or not it exports metrics itself);
        # rank 0 writes there the series of ranks whose host's /metrics is another
        relayed = RelayedRanks() if self.metrics is not None and ep.rank_in_group == 0 else None
        self.relay = MetricsRelay(
            ep.rank_in_group, ep.world_size, relay_group, lambda: snapshot(balancer, self),
            relayed.apply if relayed is not None else (lambda rank, snap: None),
        )
        log.info(
            "vllm-eplb: EP rank %d/%d, %d MoE layers, %d logical experts in %d slots (%d per rank), policy %s, "
            "window %d passes every %d, backend %s, replica dispatch %s, pass clock %s",
            ep.rank_in_group,
            ep.world_size,
            layers,
            topo.num_logical,
            topo.num_physical,
            topo.slots_per_rank,
            bcfg.policy,
            bcfg.window_size,
            bcfg.step_interval,
            self.balancer.comm.backend.name,
            cfg.replica_dispatch,
            clock.source,
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

    def _pass_clock(self, pass_load: torch.Tensor, ubatches: int) -> PassClock:
        """The runner's count, checked by (on CPU: checking) the first MoE layer's. Both of
        vllm-eplb's routers advance that count: the torch one (CPU) and the GPU one around
        vLLM's Triton kernel (hook gpu_router). A router that is neither (the hook not
        installed) advances nothing: the runner's count is then unchecked."""
        from vllm.model_executor.layers.fused_moe.router import base_router

        from vllm_eplb.kernels.replica_dispatch import torch_map_to_physical_and_record

        router = base_router.eplb_map_to_physical_and_record
        if router is torch_map_to_physical_and_record or getattr(router, "upstream", None) is not None:
            self.layer_counter = ForwardCounter(self.device)
            self.layer_counter.watch(pass_load[0])
        return PassClock(lambda: self.forwards, self.layer_counter, layer_runs_per_pass=ubatches)

    def _share_layer_tensors(self, model) -> int:
        """Give every MoE layer the shared record flag and unpadded-token counters, as
        upstream's EplbState does; the router reads both. Returns the micro-batches per pass."""
        ubatches = max(1, getattr(self.parallel_config, "num_ubatches", 1) or 1)
        self.num_unpadded_tokens = [torch.tensor(0, dtype=torch.int32, device=self.device) for _ in range(ubatches)]
        self.should_record = torch.zeros((), dtype=torch.bool, device=self.device)
        for layer in model.moe_layers:
            ls = getattr(layer, "eplb_state", None)
            if ls is not None:
                ls.should_record_tensor = self.should_record
                ls.num_unpadded_tokens_tensors = self.num_unpadded_tokens
        return ubatches

    @property
    @only_where("should_record_tensor")
    def should_record_tensor(self):
        """0.33's EPLBController.suppress() (V2 warm-up) reads the record flag by this name."""
        return self.should_record

    # ---- called around every forward pass
    def _forward_starts(self) -> None:
        """A forward pass is about to run: catch up on passes whose step never came,
        then advance the clock."""
        self._counts_forwards = True
        if self.balancer is not None:
            t0 = time.perf_counter_ns()
            self.balancer.catch_up()
            self.step_ns += time.perf_counter_ns() - t0
        self.forwards += 1

    @contextlib.contextmanager
    def dummy_pass(self, stepped: bool = True):
        """Around a dummy forward pass (DP padding, warm-up): it counts on the pass clock,
        like any pass every rank runs in step, but its made-up tokens are no load. The
        suppression is its own bit of the record gate, so a tick inside the dummy pass
        that opens or closes the window is not undone when the pass ends.

        stepped=False: the runner will not step this pass (vLLM's compile warm-up and graph
        capture call `_dummy_run(skip_eplb=True)`): it is ticked here once it ran, so a
        pass every rank runs alike is not reported as a missed tick."""
        gate = self.balancer.window.gate if self.balancer is not None else None
        if gate is not None:
            gate.suppress()
        try:
            self._forward_starts()
            # The V2 runner's dummy run goes through execute_model, which calls
            # prepare_forward: the same pass, already counted here.
            self._dummy_counted = True
            yield
        finally:
            self._dummy_counted = False
            if gate is not None:
                gate.release()
        if not stepped:
            self.step(is_dummy=True)

    def prepare_forward(self, model_config, num_unpadded_tokens: int, ubatch_slices=None) -> None:
        if self._dummy_counted:
            self._dummy_counted = False
        else:
            self._forward_starts()
        if num_unpadded_tokens > 0 and self.balancer is not None:
            self.balancer.window.note_routed_pass()  # a dummy pass's gate is off: not counted
        if not self.num_unpadded_tokens:
            return
        if ubatch_slices is None:
            self.num_unpadded_tokens[0].fill_(num_unpadded_tokens)
            return
        for t, sl in zip(self.num_unpadded_tokens, ubatch_slices):
            ts = sl.token_slice
            t.fill_(max(0, min(num_unpadded_tokens, ts.stop) - ts.start))

    def step(self, is_dummy: bool = False, is_profile: bool = False, log_stats: bool = False) -> None:
        # The profiling pass at start-up ran the MoE layers on every rank like any dummy pass
        # and was counted where it started: it is ticked too, or the next pass would report
        # its tick as missed.
        if self.balancer is None:
            return
        if not self._counts_forwards:
            # This runner reports no forward passes (a path without prepare_forward or a
            # wrapped dummy run): the clock follows its steps, as upstream's EPLB does.
            self.forwards += 1
        n = self.balancer.transitions_total
        t0 = time.perf_counter_ns()
        self.balancer.tick()
        t1 = time.perf_counter_ns()
        if self.guard.verifier is not None:
            self.guard.check_commits(self.balancer.pass_no)  # a test instrument, not the balancer's cost: not in step_ns
        t2 = time.perf_counter_ns()
        if self.metrics is not None:
            try:
                self.metrics.update(self.balancer, transitioned=self.balancer.transitions_total != n)
            except Exception as exc:  # an exporter bug must not stop serving; the cycle ends by vote
                self._metrics_failures += 1
                if self._metrics_failures == 1:
                    log.exception("vllm-eplb: metrics update failed")
                self.balancer.report_fault(Fault.METRICS_ERROR, exc)
        if self.relay is not None:
            self.relay.step(self.balancer.pass_no)
        self.step_ns += (t1 - t0) + (time.perf_counter_ns() - t2)

    @property
    def verifier(self):
        """verify_slots' SlotVerifier (its counts on /metrics), held by the guard; None without it."""
        return self.guard.verifier if self.guard is not None else None

    # ---- parts of upstream's interface vllm-eplb has no use for
    def start_async_loop(self, *args, **kwargs) -> None:
        pass

    def drain_async(self, *args, **kwargs) -> None:
        pass

    def rearrange(self, *args, **kwargs):
        return None

    def shutdown(self) -> None:
        balancer, self.balancer = self.balancer, None
        if balancer is not None:
            balancer.shutdown()
        if self.layer_counter is not None:
            self.layer_counter.unwatch()


def _max_pass_tokens(model_config) -> int:
    """Most expert-token loads one pass can record (tokens x top-k), for the window's
    overflow check; 0 if vLLM's config does not say."""
    try:
        from vllm.config import get_current_vllm_config

        tokens = get_current_vllm_config().scheduler_config.max_num_batched_tokens
        hf = model_config.hf_text_config if model_config is not None else None
        top_k = next((getattr(hf, k) for k in ("num_experts_per_tok", "moe_topk", "top_k") if getattr(hf, k, None)), 0)
        return int(tokens) * int(top_k)
    except Exception:
        return 0


def _dummy_load() -> bool:
    """The model started with dummy weights (load_format "dummy"): its loader was not seen."""
    try:
        from vllm.config import get_current_vllm_config

        fmt = get_current_vllm_config().load_config.load_format
        return str(getattr(fmt, "value", fmt)) == "dummy"
    except Exception:
        return False


def _tensor_parallel_size() -> int:
    """Ranks that route (and record) each token: every tensor-parallel rank sees the whole batch."""
    from vllm.distributed.parallel_state import get_tensor_model_parallel_world_size

    return get_tensor_model_parallel_world_size()


def _ranks_per_node(ep) -> int:
    try:
        from vllm.distributed.parallel_state import get_node_count

        nodes = get_node_count()
    except Exception:
        nodes = 1
    if nodes <= 1 or ep.world_size % nodes:
        return 0
    return ep.world_size // nodes
