"""The GPU rebalance benchmark's runs: one rebalance per run, the balancer driven as vLLM's
runner drives it (harness/driver.py) while the loop keeps decoding, every pass timed; the
strategies' runs interleaved on every rank (`rank_main`, what the launcher starts)."""

from __future__ import annotations

import gc
import gzip
import os
import time

import torch
import torch.distributed as dist

from vllm_eplb.core import Balancer, BalancerConfig, Comm, MoELayout
from vllm_eplb.core.policies import get_policy
from vllm_eplb.core.transfer import DelegatingBackend, TransferBackend
from vllm_eplb.core.transfer.backend import expert_nbytes
from vllm_eplb.harness import stop_the_world
from vllm_eplb.harness.driver import Driver
from vllm_eplb.harness.launcher import checkpoint

from .model import Rank


class RecordingBackend(DelegatingBackend):
    """Keeps every step's handle and jobs, for per-step bytes and device time. With
    `order="sorted"` it hands the inner backend each rank's transfers in (src, dst)
    order, as plans were before peers were rotated (an A/B of the transfer order)."""

    def __init__(self, inner: TransferBackend, order: str = "plan"):
        super().__init__(inner)
        self.order = order
        self.rows: list[dict] = []
        self._open: list = []  # (row, handle) of steps whose device time is not read yet

    def start(self, jobs, rank):
        if self.order == "sorted":
            for j in jobs:
                for part in j.plan.parts:
                    part.recvs.sort(key=lambda t: (t.src, t.dst))
                    part.sends.sort(key=lambda t: (t.src, t.dst))
        self._close()  # a step starts after the previous one committed: its copies are done
        handle = self.inner.start(jobs, rank)
        recv = sum(len(t.experts) * expert_nbytes(j.weights) for j in jobs for t in j.plan.part(rank).recvs)
        row = {"layers": [j.plan.layer for j in jobs], "bytes_received": recv, "device_s": None,
               "staging": handle.staging_bytes}
        self.rows.append(row)
        self._open.append((row, handle))
        return handle

    def close(self) -> None:
        """The balancer's shutdown after a run closes nothing: the inner backend serves every
        run of this rank (one set-up: IPC handles mapped, NCCL pairs connected)."""

    def _close(self) -> None:
        # keep figures, not handles: a handle holds its step's staging (hundreds of MB)
        for row, handle in self._open:
            row["device_s"] = handle.device_seconds()
        self._open.clear()

    def figures(self, rank: int) -> list[dict]:
        self._close()
        return self.rows


def rebalance(r: Rank, name: str, mode: str, profile_dir: str | None = None) -> dict:
    """One rebalance with strategy `name`. mode: "timed" (checks only in the warm-up
    and after the stall window) or "checked" (after every commit too)."""
    args, model, cuda = r.args, r.model, r.cuda
    t_run = time.perf_counter()
    model.reset()
    if cuda:
        torch.cuda.synchronize()
    base, _, per_step = name.partition(":")
    rec = RecordingBackend(r.backends[base], args.plan_order)
    stw = base == "stop-the-world"
    warm, window = args.warmup, args.window
    window_end_at = warm + window
    cfg = BalancerConfig(
        window_size=window,
        step_interval=window_end_at if not stw else 10**9,
        layers_per_pass=int(per_step or args.layers_per_pass),
        improvement_threshold=0.05,
        policy=args.policy,
        agreement_lag=args.agreement_lag,
        planner=args.planner,
    )
    # every rank routes (and records) the whole batch: the window counts a token once per rank
    layout = MoELayout(r.topo, args.layers, model.pass_load, model.maps, model.weights_of, model.record_flag,
                       load_copies=r.world)
    driver = Driver()
    balancer = driver.balancer = Balancer(cfg, layout, Comm(r.rank, r.world, r.cpu_group, rec),
                                          get_policy(args.policy), clock=driver.clock(model.pass_counter))
    balancer.planner.ready.result()  # the planner process starts with the server, not in the loop
    dist.barrier(group=r.cpu_group)
    setup_s = time.perf_counter() - t_run
    checker = r.checker()
    times, ticks, states, committed_in = [], [], [], []
    checked_after: list[int] = []
    window_end = live = None
    stop_at = None
    last_committed = 0
    if stw:
        model.record_flag.fill_(True)
    combine = r.combine if r.model_group is not None else None

    def stop_the_world_rebalance() -> None:
        # stop the world: load all-reduce, plan, every layer moved, in this pass's EPLB step
        stop_the_world.rebalance(balancer, get_policy(args.policy), r.cpu_group)
        if cuda:
            torch.cuda.current_stream().synchronize()

    prof = None
    limit = window_end_at + args.max_stall_passes + args.after_passes
    p = 0
    while True:
        p += 1
        if stop_at is not None and p > stop_at or p > limit:
            break
        if profile_dir and prof is None and p == window_end_at - 2:
            prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]
                                          + ([torch.profiler.ProfilerActivity.CUDA] if cuda else []))
            prof.start()
        t0 = time.perf_counter()
        with torch.profiler.record_function(f"pass {p}") if prof else _null():
            # catch_up() before the pass, the pass counted as it starts (vLLM: prepare_forward), tick() after
            with driver.forward_pass(profile=bool(prof)):
                model.forward(r.load.x0, r.load.routing_of(p), combine, args.depth)
                if cuda:
                    # the pass's sampled tokens reach the CPU, then vLLM steps EPLB
                    torch.cuda.current_stream().synchronize()
                if stw and p == window_end_at:
                    driver.before_tick(stop_the_world_rebalance)
            if r.world > 1 and combine is None:
                dist.barrier(group=r.cpu_group)  # ranks advance in lock-step, as EP's all-to-all makes them
        times.append(time.perf_counter() - t0)
        ticks.append(driver.spent_ns / 1e9)
        state = balancer.state
        states.append(state)
        committed = balancer.stats.layers_committed
        committed_in.append(committed != last_committed or stw and p == window_end_at)
        if window_end is None and (state == "planning" or stw and p == window_end_at):
            window_end = p
        if live is None and window_end is not None and (stw or balancer.stats.cycles_completed >= 1
                                                        or balancer.stats.cycles_skipped or balancer.stats.cycles_aborted):
            live = p
            stop_at = p + args.tail + args.after_passes
        if prof and (live is not None and p >= live + 3 or p >= limit):
            prof.stop()
            _profile_summary(r, prof, profile_dir, name)
            prof = False  # done
        do_check = (p == args.skip // 2 or live is not None and p == live + args.tail
                    or mode == "checked" and committed != last_committed)
        last_committed = committed
        if do_check:
            r.check(checker, p, fault=args.fault and mode == "checked" and live is not None)
            checked_after.append(p)
    out = {
        "name": name, "mode": mode, "backend": rec.name, "times": times, "ticks": ticks, "states": states,
        "committed": committed_in, "checked_after": checked_after, "window_end": window_end, "live": live,
        "steps": rec.figures(r.rank),
        "mismatch": {"slots": len(checker.slot_errors), "maps": len(checker.map_disagreements),
                     "outputs": len(checker.output_changes), "checks": checker.checks},
        "completed": balancer.stats.cycles_completed if not stw else 1,
        "skipped": dict(balancer.stats.cycles_skipped), "aborted": dict(balancer.stats.cycles_aborted),
        "observed": [b for _, b in balancer.stats.observed_history],
        "moved_slots": balancer.stats.last_plan_moved_slots,
        "agreement_late": balancer.agreement.stats.late_rounds,
        "agreement_wait_max_ms": balancer.agreement.stats.wait_seconds_max * 1e3,
    }
    balancer.shutdown()
    del balancer, rec, layout
    gc.collect()  # the state machine holds reference cycles
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # each run starts with the same free memory
    dist.barrier(group=r.cpu_group)
    out["setup_s"], out["wall_s"] = setup_s, time.perf_counter() - t_run
    return out


def _profile_summary(r: Rank, prof, outdir: str, name: str) -> None:
    """Rank 0 writes: ops by device time, ops by CPU time, CPU ops under eplb.tick per
    pass, and the chrome trace (gzip)."""
    if r.rank != 0:
        return
    os.makedirs(outdir, exist_ok=True)
    ka = prof.key_averages()
    sort_dev = "cuda_time_total" if r.cuda else "cpu_time_total"
    lines = [f"# profile of one {name} rebalance, rank 0, passes from 2 before the window's end to 3 after live",
             "## by device time", ka.table(sort_by=sort_dev, row_limit=25, max_name_column_width=60),
             "## by CPU time", ka.table(sort_by="cpu_time_total", row_limit=25, max_name_column_width=60)]
    # what eplb.tick's time goes to, per pass: its CPU children by self time
    per_pass = []
    for ev in prof.events():
        if ev.name != "eplb.tick":
            continue
        agg: dict[str, float] = {}
        stack = list(ev.cpu_children)
        while stack:
            c = stack.pop()
            agg[c.name] = agg.get(c.name, 0.0) + c.self_cpu_time_total
            stack.extend(c.cpu_children)
        top = sorted(agg.items(), key=lambda kv: -kv[1])[:6]
        parent = ev.cpu_parent.name if ev.cpu_parent is not None else "?"
        per_pass.append(f"{parent}: tick {ev.cpu_time_total / 1e3:.2f} ms; " + ", ".join(f"{k} {v / 1e3:.2f}" for k, v in top))
    lines += ["## eplb.tick per pass (CPU ms; top self-time ops inside)", *per_pass]
    with open(os.path.join(outdir, f"profile_{name}.txt"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    if not r.args.profile_trace:
        return
    tmp = os.path.join(outdir, f".trace_{name}.json")
    prof.export_chrome_trace(tmp)
    with open(tmp, "rb") as src, gzip.open(os.path.join(outdir, f"trace_{name}.json.gz"), "wb") as dst:
        dst.write(src.read())
    os.remove(tmp)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def rank_main(rank: int, world: int, args) -> dict:
    """One rank, in a process the rig's launcher started: every run, each checkpointed
    (the runs done survive a deadline)."""
    result = {"rank": rank, "runs": []}
    r = Rank(rank, world, args)
    result.update(r.info)
    t_start = time.perf_counter()
    plan = [(name, "checked") for name in r.strategies if name in args.checked]
    for rep in range(args.reps):
        k = rep % max(1, len(r.strategies))
        plan += [(name, "timed") for name in r.strategies[k:] + r.strategies[:k]]
    for name, mode in plan:
        # every rank stops at the same run when the time budget is spent
        go = [time.perf_counter() - t_start < args.time_budget]
        dist.broadcast_object_list(go, src=0, group=r.cpu_group)
        if not go[0]:
            result["budget_stopped"] = True
            break
        result["runs"].append(rebalance(r, name, mode))
        checkpoint(result)
    for name in args.profile:
        if name in r.strategies:
            result.setdefault("profiled", []).append(rebalance(r, name, "profiled", profile_dir=args.profile_dir))
    return result
