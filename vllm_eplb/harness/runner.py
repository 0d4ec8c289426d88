"""Run the balancer across N processes joined by a real gloo process group.

Each rank drives the exact SyntheticMoE through many forward passes and ticks its Balancer the
way vLLM's model runner does (`driver.Driver`, the rigs' one driver): `catch_up()` before
every forward pass, the runner's pass count advanced as the pass starts (`prepare_forward`'s
place), the pass (whose first MoE layer advances the model's ForwardCounter, the clock's other
count), `tick()` after it. The shared rig does the rest: `launcher` starts the ranks,
`checks.InvariantChecker` checks at every forward pass (or every `check_every`), after
`catch_up()`, so with the maps that pass routes with, that maps agree across ranks, every
slot holds what its map names and the outputs of a probe batch (run inside that pass)
never change; and `faults` injects a failure on one rank.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.distributed as dist

from vllm_eplb.core import Balancer, BalancerConfig, Comm, MoELayout, Topology, new_gloo_group
from vllm_eplb.core.faults import Fault
from vllm_eplb.core.policies import get_policy
from vllm_eplb.core.transfer import DeferredBackend, GlooBackend, TransferBackend
from vllm_eplb.core.transfer.gpu import P2PBackend

from . import faults as fault_doubles
from .checks import InvariantChecker
from .driver import Driver
from .faults import Faults
from .launcher import launch
from .synthetic_moe import DriftingWorkload, SyntheticMoE

@dataclass
class HarnessConfig:
    ranks: int = 2
    layers: int = 4
    logical: int = 16
    redundant: int = 4
    dim: int = 16
    top_k: int = 2
    tokens: int = 64
    passes: int = 300
    zipf: float = 1.2
    drift_every: int = 0
    topics: int = 16
    ranks_per_node: int = 0
    seed: int = 0
    check_every: int = 1
    pass_sleep_s: float = 0.0  # added to every forward pass, as a real model's pass time
    backend: str = "gloo"  # "gloo" (GlooBackend) or "p2p" (the NCCL backend's batched isend/irecv, on gloo)
    cpu_staging: bool = False  # gloo: staging reserved at start-up on CPU too, as on GPU (reuse under the checks)
    balancer: dict = field(default_factory=dict)  # BalancerConfig fields
    faults: Faults = field(default_factory=Faults)
    verbose: bool = False
    record_pass_load: bool = False  # report this rank's routed load of every pass, per layer (benchmarks/adapt.py)


@dataclass
class RankReport:
    rank: int
    history: list  # TransitionRecord
    stats: dict
    map_disagreements: list[int]  # passes where maps differed across ranks
    slot_mismatches: list[tuple]  # (pass, layer, slot, expert)
    output_mismatches: list[int]  # passes where the probe output differed
    checks: int  # passes checked
    tick_us: dict[str, list[float]]  # state -> tick durations (catch_up + tick of a pass)
    placement: np.ndarray
    max_wait_s: float = 0.0  # longest the forward loop spent in the balancer on one pass
    events: dict = field(default_factory=dict)  # what the fault doubles did
    pass_load: np.ndarray | None = None  # (passes, layers) this rank's own slots' tokens per pass, if recorded


def _run_scenario(rank: int, world: int, cfg: HarnessConfig) -> RankReport:
    started = time.monotonic()
    f = cfg.faults
    if fault_doubles.hits(f.setup_override, rank):
        cfg = replace(cfg, **f.setup_override[1])
    overrides = f.config_override[1] if fault_doubles.hits(f.config_override, rank) else {}
    bcfg = BalancerConfig(**{**cfg.balancer, **overrides})
    topo = Topology(world, cfg.logical, cfg.logical + cfg.redundant, cfg.ranks_per_node)
    ranks = list(range(world))
    agreement_group = new_gloo_group(ranks, bcfg.agreement_timeout_s)
    transfer_group = new_gloo_group(ranks, bcfg.transfer_timeout_s)
    model = SyntheticMoE.exact_model(topo, cfg.layers, cfg.dim, cfg.top_k, rank, cfg.seed, cfg.topics)
    workload = DriftingWorkload(cfg.dim, cfg.tokens, cfg.topics, cfg.zipf, cfg.drift_every, cfg.seed)

    policy = fault_doubles.wrap_policy(get_policy(bcfg.policy), f, rank)
    balancer_ref: list[Balancer] = []
    built: dict = {}

    def build_backend() -> TransferBackend:  # once the ranks agreed on it (its set-up is collective)
        raw = GlooBackend(transfer_group, stage_on_cpu=cfg.cpu_staging) if cfg.backend == "gloo" else P2PBackend(transfer_group)
        built.update(raw=raw, log=fault_doubles.StepLog(raw, balancer_ref))
        built["wrapped"] = fault_doubles.wrap_backend(built["log"], f, rank, balancer_ref)
        return built["wrapped"]

    backend = DeferredBackend("gloo" if cfg.backend == "gloo" else P2PBackend.name, build_backend)
    ticks = fault_doubles.TickSchedule(f, rank)
    kill = fault_doubles.PhaseTrigger(f.kill_planner, rank)
    metrics_error = fault_doubles.PhaseTrigger(f.metrics_error, rank)
    uncounted = fault_doubles.PhaseTrigger(f.uncounted_pass, rank)
    slow = fault_doubles.PhaseTrigger(f.slow_pass, rank)
    weight_update = fault_doubles.WeightUpdateTrigger(f.weight_update, rank)
    corrupt = fault_doubles.PhaseTrigger(f.corrupt_maps, rank)
    driver = Driver()
    layout = MoELayout(topo, cfg.layers, model.pass_load, model.maps, model.weights_of)
    balancer = Balancer(bcfg, layout, Comm(rank, world, agreement_group, backend), policy, clock=driver.clock(model.pass_counter))
    driver.balancer = balancer
    balancer_ref.append(balancer)
    late = fault_doubles.install(balancer, f, rank)
    events: dict = {}

    # The planner process starts with the server, long before a window ends; here
    # the run is short, so wait for it rather than let start-up time shift the cycles.
    balancer.planner.ready.result()
    dist.barrier()
    probe = workload.probe()
    # the probe is the rig's instrument, not a pass: it advances no count
    checker = InvariantChecker(model.maps, model.slot_mismatches, lambda: model.probe(probe), world)
    tick_us: dict[str, list[float]] = {}
    max_wait = 0.0
    pass_load = np.zeros((cfg.passes, cfg.layers), dtype=np.int64) if cfg.record_pass_load else None
    unrecorded = rank in f.unrecorded_load  # this rank's layers record no load (record_rows 0)

    def counted() -> bool:  # asked after catch_up(), as the pass starts
        if uncounted.fires(balancer):
            events["uncounted_pass"] = p  # a forward path that bypasses the runner's count
            return False
        return True

    for p in range(1, cfg.passes + 1):
        state = balancer.state
        checking = p % cfg.check_every == 0
        with driver.forward_pass(counted=counted, ticks=lambda: 0 if update_now and rank in f.update_tick_missed else ticks.ticks(balancer)):
            batch = workload.batch(p)
            before = model.pass_load.sum(dim=1) if pass_load is not None else None  # the window may reset in a tick
            if checking:
                # The probe batch rides in this pass (its rows computed independently, its load not
                # recorded): its outputs are those of the maps and weights this pass routes with,
                # at no collective of its own.
                out = model.forward(torch.cat([batch, probe]), record_rows=0 if unrecorded else len(batch))
                checker.check(p, probe_out=out[len(batch):])
            else:
                model.forward(batch, record_rows=0 if unrecorded else None)
            if pass_load is not None:
                pass_load[p - 1] = (model.pass_load.sum(dim=1) - before).numpy()
            if cfg.pass_sleep_s:
                time.sleep(cfg.pass_sleep_s)
            if slow.fires(balancer):
                events["slow_pass"] = p
                time.sleep(f.slow_pass[2])
            if fault_doubles.hits(f.rebuild_pause, rank) and late.get("read_at") == p:
                events["rebuild_pause"] = p  # the pass whose tick reads the failed round and rebuilds
                time.sleep(f.rebuild_pause[1])
            # an update whose pass one rank's driver does not tick: decided before the ticks, alike everywhere
            update_now = bool(f.update_tick_missed) and weight_update.fires(balancer)
        spent = driver.spent_ns / 1e9
        tick_us.setdefault(state, []).append(spent * 1e6)
        max_wait = max(max_wait, spent)
        if kill.fires(balancer):
            events["killed_planner"] = (fault_doubles.kill_planner(balancer), p)
        if metrics_error.fires(balancer):
            balancer.report_fault(Fault.METRICS_ERROR, RuntimeError("injected metrics exporter failure"))
            events["metrics_error"] = p
        if corrupt.fires(balancer):
            events["corrupt_maps"] = (p, *fault_doubles.corrupt_maps(balancer, model, rank, f.corrupt_maps[2]))
        if update_now or (not f.update_tick_missed and weight_update.fires(balancer)):
            # between two passes, as vLLM's workers take an update RPC: the balancer hears of it
            # before anything is written (integration/weight_updates.py)
            balancer.weights_changed()
            if weight_update.rewrite:
                model.update_weights()
            events["weight_update"] = p
            if weight_update.rewrite:
                checker.new_reference()  # every rank updates at this pass (a collective)
    stats = {k: v for k, v in vars(balancer.stats).items() if k != "history"}
    stats["disabled_reason"] = balancer.disabled_reason
    stats["agreement"] = {
        "rounds": balancer.agreement.stats.rounds,
        "late": balancer.agreement.stats.late_rounds,
        "wait_max_s": balancer.agreement.stats.wait_seconds_max,
        "rebuilds": balancer.agreement.rebuilds,
    }
    stats["planner_alive"] = balancer.planner.alive()
    stats["wall_s"] = time.monotonic() - started
    arena = built["raw"].staging if built else None
    if arena is not None and arena.regions:
        stats["staging"] = {"regions": len(arena.regions), "fallbacks": arena.fallbacks, "reserved": arena.reserved_bytes,
                            "reserved_seen": built["wrapped"].reserved_bytes}
    if ticks.trigger.fired_at is not None:
        events["tick_offset"] = ticks.trigger.fired_at
    events["steps"] = built["log"].steps if built else []
    events.update({k: v for k, v in late.items() if k != "read_at"})
    report = RankReport(
        rank,
        list(balancer.stats.history),
        stats,
        checker.map_disagreements,
        checker.slot_errors,
        checker.output_changes,
        checker.checks,
        tick_us,
        balancer.placement.copy(),
        max_wait,
        events,
        pass_load,
    )
    balancer.shutdown()
    dist.barrier()
    return report


def _rank_main(rank: int, world: int, cfgs: list[HarnessConfig]) -> list[RankReport]:
    torch.set_num_threads(1)
    return [_run_scenario(rank, world, cfg) for cfg in cfgs]


def run_harness(cfg: HarnessConfig, timeout_s: float = 600) -> list[RankReport]:
    """Spawn cfg.ranks processes, run, and return one report per rank (rank order)."""
    return [reports[0] for reports in launch(_rank_main, cfg.ranks, ([cfg],), timeout_s)]


def run_scenarios(cfgs: list[HarnessConfig], timeout_s: float = 900) -> list[list[RankReport]]:
    """Run several scenarios one after the other in the same processes (one start-up for
    all; every scenario gets fresh groups, model and balancer). All must have the same
    number of ranks. Returns, per scenario, one report per rank."""
    world = cfgs[0].ranks
    assert all(c.ranks == world for c in cfgs), "one world size per batch"
    per_rank = launch(_rank_main, world, (cfgs,), timeout_s)
    return [[per_rank[r][i] for r in range(world)] for i in range(len(cfgs))]
