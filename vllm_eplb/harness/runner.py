"""Run the balancer across N processes joined by a real gloo process group.

Each rank drives a ToyMoE through many forward passes, ticking its Balancer once
per pass, and checks on every pass (or every `check_every`):
  - the routing maps are identical on every rank;
  - every local slot holds exactly the weights of the expert the map names;
  - the outputs for a fixed probe batch equal those before any rebalance.
Faults can be injected on one rank to exercise the abort paths.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import socket
import tempfile
import time
import traceback
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vllm_eplb.core import Balancer, BalancerConfig, Comm, MoELayout, Topology, new_gloo_group
from vllm_eplb.core.policies import PlanInput, Policy, get_policy
from vllm_eplb.core.transfer import GlooBackend, TransferBackend, TransferError, TransferHandle
from vllm_eplb.core.transfer.gpu import P2PBackend

from .toy_moe import DriftingWorkload, ToyMoE


@dataclass
class Faults:
    planner_error: tuple[int, int] | None = None  # (rank, cycle): the policy raises on that rank
    transfer_error: tuple[int, int, int] | None = None  # (rank, cycle, step): that step fails on that rank
    slow_planner: tuple[int, float] | None = None  # (rank, seconds): the policy sleeps first
    divergent_plan: int | None = None  # rank whose policy returns a different (valid) plan
    internal_error: tuple[int, str] | None = None  # (rank, state): a bug raises in that state's tick once
    config_override: tuple[int, dict] | None = None  # (rank, BalancerConfig fields) differing on that rank
    slow_transfer: tuple[int, int] | None = None  # (rank, polls): each step reports not done for that many polls


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
    backend: str = "gloo"  # "gloo" (GlooBackend) or "p2p" (the NCCL backend's batched isend/irecv, on gloo)
    balancer: dict = field(default_factory=dict)  # BalancerConfig fields
    faults: Faults = field(default_factory=Faults)
    verbose: bool = False


@dataclass
class RankReport:
    rank: int
    history: list  # TransitionRecord
    stats: dict
    map_disagreements: list[int]  # passes where maps differed across ranks
    slot_mismatches: list[tuple]  # (pass, layer, slot, expert)
    output_mismatches: list[int]  # passes where the probe output differed
    checks: int  # passes checked
    tick_us: dict[str, list[float]]  # state -> tick durations
    placement: np.ndarray
    error: str = ""


class _FailingPolicy(Policy):
    def __init__(self, inner: Policy, fail_on_call: int):
        self.inner, self.fail_on_call, self.calls = inner, fail_on_call, 0
        self.name = inner.name

    def place(self, inp: PlanInput):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise RuntimeError(f"injected planner failure (call {self.calls})")
        return self.inner.place(inp)


class _SlowPolicy(Policy):
    def __init__(self, inner: Policy, seconds: float):
        self.inner, self.seconds, self.name = inner, seconds, inner.name

    def place(self, inp: PlanInput):
        time.sleep(self.seconds)
        return self.inner.place(inp)


class _DivergentPolicy(Policy):
    """Swaps the experts of the first two ranks' first slots: valid, balanced the same, different."""

    def __init__(self, inner: Policy):
        self.inner, self.name = inner, inner.name

    def place(self, inp: PlanInput):
        out = self.inner.place(inp).copy()
        s = inp.topo.slots_per_rank
        out[:, [0, s]] = out[:, [s, 0]]
        return out


class _FailingHandle(TransferHandle):
    def __init__(self, inner: TransferHandle):
        self.inner = inner

    def done(self):
        return self.inner.done()

    def wait(self):
        self.inner.wait()  # complete the real sends/receives so peers are not left hanging
        raise TransferError("injected transfer failure")

    @property
    def staging_bytes(self):
        return self.inner.staging_bytes


class _SlowHandle(TransferHandle):
    """Reports not done for the first `polls` polls, as a copy slower than a pass would."""

    def __init__(self, inner: TransferHandle, polls: int):
        self.inner, self.polls = inner, polls

    def done(self):
        if self.polls > 0:
            self.polls -= 1
            return False
        return self.inner.done()

    def wait(self):
        return self.inner.wait()

    @property
    def staging_bytes(self):
        return self.inner.staging_bytes


class _SlowBackend(TransferBackend):
    def __init__(self, inner: TransferBackend, polls: int):
        self.inner, self.polls, self.name = inner, polls, inner.name

    def start(self, jobs, rank):
        return _SlowHandle(self.inner.start(jobs, rank), self.polls)


class _FailingBackend(TransferBackend):
    def __init__(self, inner: TransferBackend, should_fail):
        self.inner, self.should_fail, self.name = inner, should_fail, inner.name

    def start(self, jobs, rank):
        handle = self.inner.start(jobs, rank)
        return _FailingHandle(handle) if self.should_fail() else handle


def _inject_internal_error(balancer: Balancer, state: str) -> None:
    handler = balancer._handlers[state]
    fired = []

    def broken(p):
        if not fired:
            fired.append(p)
            raise RuntimeError(f"injected bug in {state}")
        handler(p)

    balancer._handlers[state] = broken


def _map_digest(model: ToyMoE) -> torch.Tensor:
    h = hashlib.sha256()
    for t in (model.maps.phy2log, model.maps.log2phy, model.maps.replica_count):
        h.update(t.numpy().tobytes())
    d = h.digest()
    return torch.tensor([int.from_bytes(d[:7], "little"), int.from_bytes(d[7:14], "little")], dtype=torch.int64)


def _rank_main(rank: int, cfg: HarnessConfig, port: int, outdir: str) -> None:
    torch.set_num_threads(1)
    report = None
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=cfg.ranks)
        f = cfg.faults
        overrides = f.config_override[1] if f.config_override and f.config_override[0] == rank else {}
        bcfg = BalancerConfig(**{**cfg.balancer, **overrides})
        topo = Topology(cfg.ranks, cfg.logical, cfg.logical + cfg.redundant, cfg.ranks_per_node)
        ranks = list(range(cfg.ranks))
        agreement_group = new_gloo_group(ranks, bcfg.agreement_timeout_s)
        transfer_group = new_gloo_group(ranks, bcfg.transfer_timeout_s)
        model = ToyMoE(topo, cfg.layers, cfg.dim, cfg.top_k, rank, cfg.seed, cfg.topics)
        workload = DriftingWorkload(cfg.dim, cfg.tokens, cfg.topics, cfg.zipf, cfg.drift_every, cfg.seed)

        policy = get_policy(bcfg.policy)
        if f.planner_error and f.planner_error[0] == rank:
            policy = _FailingPolicy(policy, f.planner_error[1])
        if f.slow_planner and f.slow_planner[0] == rank:
            policy = _SlowPolicy(policy, f.slow_planner[1])
        if f.divergent_plan == rank:
            policy = _DivergentPolicy(policy)
        backend: TransferBackend = GlooBackend(transfer_group) if cfg.backend == "gloo" else P2PBackend(transfer_group)
        balancer_ref: list[Balancer] = []
        if f.transfer_error and f.transfer_error[0] == rank:
            steps_in_cycle = {}

            def should_fail():
                b = balancer_ref[0]
                c = b.stats.cycles_started
                steps_in_cycle[c] = steps_in_cycle.get(c, 0) + 1
                return c == f.transfer_error[1] and steps_in_cycle[c] == f.transfer_error[2]

            backend = _FailingBackend(backend, should_fail)
        if f.slow_transfer and f.slow_transfer[0] == rank:
            backend = _SlowBackend(backend, f.slow_transfer[1])

        layout = MoELayout(topo, cfg.layers, model.pass_load, model.maps, model.weights_of)
        balancer = Balancer(bcfg, layout, Comm(rank, cfg.ranks, agreement_group, backend), policy)
        balancer_ref.append(balancer)
        if f.internal_error and f.internal_error[0] == rank:
            _inject_internal_error(balancer, f.internal_error[1])

        # The planner process starts with the server, long before a window ends; here
        # the run is short, so wait for it rather than let start-up time shift the cycles.
        balancer.planner.ready.result()
        dist.barrier()
        probe = workload.probe()
        reference = model.forward(probe, record=False)
        map_bad, slot_bad, out_bad, checks = [], [], [], 0
        tick_us: dict[str, list[float]] = {}
        for p in range(1, cfg.passes + 1):
            model.forward(workload.batch(p))
            state = balancer.state
            t0 = time.perf_counter()
            balancer.tick()
            tick_us.setdefault(state, []).append((time.perf_counter() - t0) * 1e6)
            if p % cfg.check_every == 0:
                checks += 1
                d = _map_digest(model)
                gathered = [torch.empty_like(d) for _ in range(cfg.ranks)]
                dist.all_gather(gathered, d)
                if any(not torch.equal(g, gathered[0]) for g in gathered):
                    map_bad.append(p)
                slot_bad += [(p, *m) for m in model.slot_mismatches()]
                if not torch.equal(model.forward(probe, record=False), reference):
                    out_bad.append(p)
        stats = {k: v for k, v in vars(balancer.stats).items() if k != "history"}
        stats["disabled_reason"] = balancer.disabled_reason
        stats["agreement"] = {
            "rounds": balancer.agreement.stats.rounds,
            "late": balancer.agreement.stats.late_rounds,
            "wait_max_s": balancer.agreement.stats.wait_seconds_max,
        }
        report = RankReport(
            rank,
            list(balancer.stats.history),
            stats,
            map_bad,
            slot_bad,
            out_bad,
            checks,
            tick_us,
            balancer.placement.copy(),
        )
        balancer.shutdown()
        dist.barrier()
    except Exception:
        report = RankReport(rank, [], {}, [], [], [], 0, {}, np.zeros(0), error=traceback.format_exc())
    finally:
        with open(os.path.join(outdir, f"rank{rank}.pkl"), "wb") as fh:
            pickle.dump(report, fh)
        if dist.is_initialized():
            dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_harness(cfg: HarnessConfig, timeout_s: float = 600) -> list[RankReport]:
    """Spawn cfg.ranks processes, run, and return one report per rank (rank order)."""
    with tempfile.TemporaryDirectory() as outdir:
        ctx = mp.get_context("spawn")
        port = free_port()
        procs = [ctx.Process(target=_rank_main, args=(r, cfg, port, outdir)) for r in range(cfg.ranks)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout_s
        for p in procs:
            p.join(max(1.0, deadline - time.monotonic()))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
        if hung:
            raise TimeoutError(f"harness ranks {hung} did not finish within {timeout_s}s")
        reports = []
        for r in range(cfg.ranks):
            path = os.path.join(outdir, f"rank{r}.pkl")
            if not os.path.exists(path):
                raise RuntimeError(f"rank {r} died without a report (exit code {procs[r].exitcode})")
            with open(path, "rb") as fh:
                reports.append(pickle.load(fh))
        errors = [f"rank {r.rank}:\n{r.error}" for r in reports if r.error]
        if errors:
            raise RuntimeError("harness rank failed:\n" + "\n".join(errors))
        return reports
