"""Rebalance stall on GPUs: what moving experts costs the decode loop, per strategy.

N ranks (one process each) run a synthetic expert-parallel MoE decode loop: every
layer routes a skewed batch of tokens (top-k of E logical experts) through the
routing maps, and each rank computes its local slots' tokens with one grouped GEMM
(DeepSeek-V3 expert shapes in bf16: hidden 7168, expert intermediate 2048, 88 MB per
expert; `--depth` layers of compute per pass cycle over the resident layers). The
vllm-eplb balancer is driven as vLLM's model runner drives it (harness/driver.py): `catch_up()` before each
pass, the runner's pass count advanced as the pass starts, the pass (its first MoE layer
advances the model's ForwardCounter on the device, the pass clock's check), `tick()`
after the pass's tokens reached the CPU.

Strategies, each starting from the same placement and load and going through one
rebalance while the loop keeps running:

  stop-the-world   at the window's end: load all-reduce, plan, every layer moved in that
                   one pass (upstream vLLM's synchronous EPLB), over the fastest backend here
  gloo             vllm-eplb, one step at a time, through pinned host staging over gloo
  cuda_ipc         vllm-eplb, pulled over CUDA IPC on a side stream
  nccl             vllm-eplb, NCCL isend/irecv on a side stream (one GPU per rank only)

Every strategy runs `--reps` times, interleaved (rep r runs them in an order rotated by
r), in one command, plus one untimed checked run per strategy in `--checked`. Per run:

  steady   passes before the window's end (after `--skip` warm-up passes), the placement
           in force before the rebalance; passes next to a correctness check excluded
  stall    every pass from the window's end until the new placement is live, plus
           `--tail` passes: the window snapshot, the load all-reduce, planning, syncing,
           the first use of a backend's group, every transfer step and commit
  after    passes after the stall window: the balanced placement
Ratios (stall p99 / steady p99, stall max / steady p99, after p50 / steady p50) are taken
within a run; the table gives their median and [min, max] over runs. Timed runs check
correctness once in the warm-up and once after the stall window (never inside steady or
stall passes); the checked run checks after every commit and is not timed.

Checks: every local slot's weight fingerprint equals that of the expert its map names,
the maps are equal on every rank, and a probe batch's expert outputs are bit-identical
to those before any rebalance.

    python benchmarks/gpu_rebalance.py --depth 58 --json out.json --plot out.png   # 1 rank/GPU
    python benchmarks/gpu_rebalance.py --ranks 4 --depth 58     # 4 ranks on 2 GPUs: "shared"
    python benchmarks/gpu_rebalance.py --device cpu --tiny      # logic check, gloo, no GPU

With more ranks than GPUs, rank r runs on GPU r % G: ranks share GPUs (timings include
the other ranks' work on that GPU, NCCL is skipped since it refuses two ranks on one GPU)
and the table's first line says "SHARED".
"""

from __future__ import annotations

import argparse
import gc
import gzip
import json
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from vllm_eplb.core import Balancer, BalancerConfig, Comm, MoELayout, Topology, new_gloo_group  # noqa: E402
from vllm_eplb.core.policies import get_policy  # noqa: E402
from vllm_eplb.core.transfer import DelegatingBackend, TransferBackend  # noqa: E402
from vllm_eplb.core.transfer.backend import expert_nbytes  # noqa: E402
from vllm_eplb.core.transfer.select import make_backend  # noqa: E402
from vllm_eplb.harness import stop_the_world  # noqa: E402
from vllm_eplb.harness.checks import InvariantChecker  # noqa: E402
from vllm_eplb.harness.launcher import RankFailed, TimedOut, checkpoint, launch  # noqa: E402
from vllm_eplb.harness.driver import Driver  # noqa: E402
from vllm_eplb.harness.synthetic_moe import SyntheticMoE, skewed_routing  # noqa: E402

STRATEGIES = ["stop-the-world", "gloo", "cuda_ipc", "nccl"]


# --------------------------------------------------------------------------- ranks


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


def peer_copy_limit(cpu_group, rank: int, world: int, device, nbytes: int) -> dict:
    """GB/s of one rank pulling a peer's buffer over CUDA IPC (one direction), and of
    every rank pulling at once (per rank): the interconnect's limit, measured here."""
    from torch.multiprocessing.reductions import reduce_tensor

    buf = torch.ones(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(buf)
    handles: list = [None] * world
    dist.all_gather_object(handles, reduce_tensor(buf), group=cpu_group)
    fn, args = handles[(rank + 1) % world]
    src = fn(*args)
    result = {}
    for mode in ("one", "all"):
        samples = []
        for _ in range(5):
            dist.barrier(group=cpu_group)
            if mode == "all" or rank == 0:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                dst.copy_(src, non_blocking=True)
                end.record()
                end.synchronize()
                samples.append(nbytes / (start.elapsed_time(end) / 1e3) / 1e9)
            dist.barrier(group=cpu_group)
        result[mode] = max(samples) if samples else 0.0
    vals: list = [None] * world
    dist.all_gather_object(vals, result["all"], group=cpu_group)
    result["all"] = min(vals)  # the slowest rank's, when all pull at once
    del src
    torch.cuda.synchronize()
    return result


class Rank:
    """One process's model, groups, backends and checks."""

    def __init__(self, rank: int, world: int, args):
        self.rank, self.world, self.args = rank, world, args
        self.cuda = args.device == "cuda"
        self.ngpu = torch.cuda.device_count() if self.cuda else 0
        self.shared_gpu = self.cuda and self.ngpu < world
        self.device = f"cuda:{rank % self.ngpu}" if self.cuda else "cpu"
        if self.cuda:
            torch.cuda.set_device(self.device)
        else:
            torch.set_num_threads(1)
        ranks = list(range(world))  # the launcher's default group is gloo; NCCL groups follow the device pin
        self.cpu_group = new_gloo_group(ranks, 300)
        self.model_group = self.nccl_group = None
        if self.cuda and not self.shared_gpu:
            self.model_group = dist.new_group(ranks, backend="nccl")
            self.nccl_group = dist.new_group(ranks, backend="nccl")
        self.topo = Topology(world, args.experts, args.experts + args.redundant, ranks_per_node=args.ranks_per_node)
        dtype = torch.bfloat16 if self.cuda else torch.float32
        self.model = SyntheticMoE.gated_model(self.topo, args.layers, args.hidden, args.inter, rank, self.device, dtype, args.seed)
        self.model.dispatch = args.dispatch
        self.routing = skewed_routing(args.layers, args.experts, args.tokens, args.top_k, args.zipf, 32, args.seed, self.device)
        self.x0 = (torch.randn((args.tokens, args.hidden), generator=torch.Generator().manual_seed(1)) * 0.1).to(self.device, dtype)
        self.probe_routing = self.routing[0, :, : args.probe_tokens, :2].cpu()
        self.probe_x = self.x0[: args.probe_tokens]
        self.reference = self._probe()  # before any rebalance: every run's checks compare with it
        self.info = {"rank": rank, "shared_gpu": self.shared_gpu, "ngpu": self.ngpu, "skipped": {}}
        if self.cuda:
            self.info["device_name"] = torch.cuda.get_device_name()
            self.info["peer_copy_gbps"] = peer_copy_limit(self.cpu_group, rank, world, self.device, args.peer_copy_mb << 20)
        self._backends()

    def _backends(self) -> None:
        args, ranks = self.args, list(range(self.world))

        def backend(name):  # the same selector the vLLM integration uses
            return make_backend(name, torch.device(self.device), self.topo, self.rank, self.model.weights_of, args.layers,
                                gloo_group=new_gloo_group(ranks, 300), cpu_group=self.cpu_group, nccl_group=lambda: self.nccl_group)

        ipc = backend("cuda_ipc") if self.cuda and self.topo.num_nodes == 1 else None
        p2p = backend("nccl") if self.nccl_group is not None else None
        gloo = backend("gloo")
        self.strategies = []
        for name in args.strategies:
            base = name.split(":")[0]
            if base == "cuda_ipc" and ipc is None:
                self.info["skipped"][name] = "needs CUDA"
            elif base == "nccl" and p2p is None:
                self.info["skipped"][name] = "NCCL refuses two ranks on one GPU" if self.cuda else "needs CUDA"
            else:
                self.strategies.append(name)
        fastest = ipc or p2p or gloo
        self.backends = {"stop-the-world": fastest, "gloo": gloo, "cuda_ipc": ipc, "nccl": p2p}
        self.info["stop_the_world_backend"] = fastest.name

    def combine(self, t):
        dist.all_reduce(t, group=self.model_group)

    def _probe(self) -> torch.Tensor:
        out = self.model.probe(self.probe_x, self.probe_routing)
        dist.all_reduce(out, group=self.cpu_group)
        return out

    def checker(self) -> InvariantChecker:
        """The rig's invariant checks: weights match the map, maps equal everywhere, probe
        outputs unchanged since before any rebalance."""
        return InvariantChecker(self.model.maps, self.model.slot_mismatches, self._probe, self.world, self.reference)

    def check(self, checker: InvariantChecker, p: int, fault: bool = False) -> None:
        if fault and self.rank == 0:  # the smoke test's proof that the checks see a wrong slot
            self.model.weights[0][0][0].add_(1.0)
        if self.cuda:
            torch.cuda.synchronize()
        checker.check(p)

    def run(self, name: str, mode: str, profile_dir: str | None = None) -> dict:
        """One rebalance with strategy `name`. mode: "timed" (checks only in the warm-up
        and after the stall window) or "checked" (after every commit too)."""
        args, model, cuda = self.args, self.model, self.cuda
        t_run = time.perf_counter()
        model.reset()
        if cuda:
            torch.cuda.synchronize()
        base, _, per_step = name.partition(":")
        rec = RecordingBackend(self.backends[base], args.plan_order)
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
        layout = MoELayout(self.topo, args.layers, model.pass_load, model.maps, model.weights_of, model.record_flag,
                           load_copies=self.world)
        driver = Driver()
        balancer = driver.balancer = Balancer(cfg, layout, Comm(self.rank, self.world, self.cpu_group, rec),
                                              get_policy(args.policy), clock=driver.clock(model.pass_counter))
        balancer.planner.ready.result()  # the planner process starts with the server, not in the loop
        dist.barrier(group=self.cpu_group)
        setup_s = time.perf_counter() - t_run
        checker = self.checker()
        times, ticks, states, committed_in = [], [], [], []
        checked_after: list[int] = []
        window_end = live = None
        stop_at = None
        last_committed = 0
        if stw:
            model.record_flag.fill_(True)
        combine = self.combine if self.model_group is not None else None

        def stop_the_world_rebalance() -> None:
            # stop the world: load all-reduce, plan, every layer moved, in this pass's EPLB step
            stop_the_world.rebalance(balancer, get_policy(args.policy), self.cpu_group)
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
                    model.forward(self.x0, self.routing[p % self.routing.shape[0]], combine, args.depth)
                    if cuda:
                        # the pass's sampled tokens reach the CPU, then vLLM steps EPLB
                        torch.cuda.current_stream().synchronize()
                    if stw and p == window_end_at:
                        driver.before_tick(stop_the_world_rebalance)
                if self.world > 1 and combine is None:
                    dist.barrier(group=self.cpu_group)  # ranks advance in lock-step, as EP's all-to-all makes them
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
                self._profile_summary(prof, profile_dir, name)
                prof = False  # done
            do_check = (p == args.skip // 2 or live is not None and p == live + args.tail
                        or mode == "checked" and committed != last_committed)
            last_committed = committed
            if do_check:
                self.check(checker, p, fault=args.fault and mode == "checked" and live is not None)
                checked_after.append(p)
        out = {
            "name": name, "mode": mode, "backend": rec.name, "times": times, "ticks": ticks, "states": states,
            "committed": committed_in, "checked_after": checked_after, "window_end": window_end, "live": live,
            "steps": rec.figures(self.rank),
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
        dist.barrier(group=self.cpu_group)
        out["setup_s"], out["wall_s"] = setup_s, time.perf_counter() - t_run
        return out

    def _profile_summary(self, prof, outdir: str, name: str) -> None:
        """Rank 0 writes: ops by device time, ops by CPU time, CPU ops under eplb.tick per
        pass, and the chrome trace (gzip)."""
        if self.rank != 0:
            return
        os.makedirs(outdir, exist_ok=True)
        ka = prof.key_averages()
        sort_dev = "cuda_time_total" if self.cuda else "cpu_time_total"
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
        if not self.args.profile_trace:
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
        result["runs"].append(r.run(name, mode))
        checkpoint(result)
    for name in args.profile:
        if name in r.strategies:
            result.setdefault("profiled", []).append(r.run(name, "profiled", profile_dir=args.profile_dir))
    return result


# --------------------------------------------------------------------------- report


def _pct(xs, q) -> float:
    return float(np.percentile(np.asarray(xs) * 1e3, q)) if len(xs) else float("nan")


def run_figures(runs: list[dict], args, peer: dict | None) -> dict:
    """One run's figures from its per-rank records (a pass takes its slowest rank's time)."""
    r0 = runs[0]
    times = np.max(np.array([r["times"] for r in runs]), axis=0)
    ticks = np.max(np.array([r["ticks"] for r in runs]), axis=0)
    n = len(times)
    passes = np.arange(1, n + 1)
    near_check = set()
    for c in r0["checked_after"]:
        near_check |= {c, c + 1}
    we, live = r0["window_end"], r0["live"]
    if we is None or live is None:
        return {"ok": False, "why": "no window end" if we is None else "never live"}
    stall_end = live + args.tail
    steady_m = np.array([args.skip < p < we and p not in near_check for p in passes])
    stall_m = (passes >= we) & (passes <= stall_end)
    after_m = np.array([p > stall_end and p not in near_check for p in passes])
    steady, stall, after = times[steady_m], times[stall_m], times[after_m]
    s50, s99 = _pct(steady, 50), _pct(steady, 99)
    commit_m = np.array([any(r["committed"][i] for r in runs) for i in range(n)]) & stall_m
    if commit_m.sum() and (~commit_m & stall_m).sum():
        # against the passes between commits: the placement improves layer by layer, so
        # steady p50 would flatter the committing passes
        first, last = np.flatnonzero(commit_m)[[0, -1]]
        between = times[max(first - 3, 0) : last + 1][~commit_m[max(first - 3, 0) : last + 1]]
        base = float(np.median(between)) * 1e3 if len(between) else s50
    else:
        base = s50
    commit_cost = [t * 1e3 - base for t in times[commit_m]]
    # GB/s per step: bytes a rank received / device time of the step's copies
    gbps, big_gbps, layer_mb = [], [], 0.0
    for r in runs:
        for st in r["steps"]:
            layer_mb = max(layer_mb, st["bytes_received"] / 2**20)
            if st["device_s"] and st["bytes_received"] > 0:
                g = st["bytes_received"] / st["device_s"] / 1e9
                gbps.append(g)
                if st["bytes_received"] >= args.big_layer_mb * 2**20:
                    big_gbps.append(g)
    a50 = _pct(after, 50)
    extra_ms = float(np.sum(stall * 1e3 - s50))
    gain_ms = s50 - a50
    mm = {k: sum(r["mismatch"][k] for r in runs) for k in ("slots", "maps", "outputs", "checks")}
    return {
        "ok": True, "steady_p50": s50, "steady_p99": s99, "stall_p50": _pct(stall, 50), "stall_p99": _pct(stall, 99),
        "stall_max": float(stall.max() * 1e3), "after_p50": a50,
        "p99_ratio": _pct(stall, 99) / s99, "max_ratio": float(stall.max() * 1e3) / s99, "after_ratio": a50 / s50,
        "stall_passes": int(stall_m.sum()), "passes_to_live": live - we,
        "commit_cost_ms": float(np.median(commit_cost)) if commit_cost else float("nan"),
        "commit_passes": int(commit_m.sum()),
        "tick_max_ms": float(ticks[stall_m].max() * 1e3),
        "gbps": float(np.median(gbps)) if gbps else float("nan"),
        "gbps_big": float(np.median(big_gbps)) if big_gbps else float("nan"),
        "peer_frac": (float(np.median(big_gbps)) / peer["all"]) if big_gbps and peer else float("nan"),
        "layer_mb": layer_mb,
        "staging_mb": max((st["staging"] for r in runs for st in r["steps"]), default=0) / 2**20,
        "extra_ms": extra_ms, "gain_ms": gain_ms,
        "payoff_passes": extra_ms / gain_ms if gain_ms > 0 else float("inf"),
        "checks": mm, "completed": r0["completed"], "skipped": r0["skipped"], "aborted": r0["aborted"],
        "observed": r0["observed"], "agreement_late": max(r["agreement_late"] for r in runs),
        "times_ms": (times * 1e3).tolist(), "states": r0["states"], "window_end": we, "live": live,
    }


def summarize(results: list[dict], args) -> tuple[list[dict], dict]:
    """Rows (one per strategy, in --strategies order) of median and range over timed runs."""
    peer = results[0].get("peer_copy_gbps")
    n_runs = len(results[0]["runs"])
    per_run = []
    for i in range(n_runs):
        runs = [res["runs"][i] for res in results]
        f = run_figures(runs, args, peer)
        f.update(name=runs[0]["name"], mode=runs[0]["mode"], backend=runs[0]["backend"], index=i,
                 setup_s=max(r.get("setup_s", 0) for r in runs), wall_s=max(r.get("wall_s", 0) for r in runs))
        per_run.append(f)
    rows = []
    seen = []
    for f in per_run:
        if f["name"] not in seen:
            seen.append(f["name"])
    seen.sort(key=lambda n: args.strategies.index(n) if n in args.strategies else len(args.strategies))
    for name in seen:
        mine = [f for f in per_run if f["name"] == name]
        timed = [f for f in mine if f["mode"] == "timed" and f["ok"]]
        checks = {k: sum(f["checks"][k] for f in mine if f["ok"]) for k in ("slots", "maps", "outputs", "checks")}
        failed = [f for f in mine if not f["ok"] or f["aborted"] or f["skipped"] or f["completed"] < 1]
        row = {"strategy": name, "backend": mine[0]["backend"], "runs": len(timed), "checks": checks,
               "failed_runs": len(failed), "why_failed": [f.get("why") or f.get("aborted") or f.get("skipped") for f in failed]}
        for key in ("steady_p50", "steady_p99", "stall_p99", "stall_max", "after_p50", "p99_ratio", "max_ratio", "after_ratio",
                    "passes_to_live", "stall_passes", "commit_cost_ms", "tick_max_ms", "gbps", "gbps_big", "peer_frac",
                    "layer_mb", "staging_mb", "extra_ms", "gain_ms", "payoff_passes", "agreement_late"):
            vals = [f[key] for f in timed if f[key] == f[key]]  # drop NaN
            row[key] = (float(np.median(vals)), float(min(vals)), float(max(vals))) if vals else (float("nan"),) * 3
        rows.append(row)
    return rows, {"per_run": per_run}


def _mr(t, fmt="{:.2f}", suffix="") -> str:
    med, lo, hi = t
    if med != med:
        return "n/a"
    if lo == hi:
        return fmt.format(med) + suffix
    return f"{fmt.format(med)}{suffix} [{fmt.format(lo)}-{fmt.format(hi)}]"


def targets(row: dict, args) -> dict:
    """Issue 11's targets, on the medians."""
    budget = args.layers + 4 * args.agreement_lag + 4
    big = row["layer_mb"][0] >= args.big_layer_mb
    return {
        "p99<=1.10": row["p99_ratio"][0] <= 1.10,
        "max<=1.25": row["max_ratio"][0] <= 1.25,
        f"live<={budget}": row["passes_to_live"][0] <= budget,
        ">=80% peer": (row["peer_frac"][0] >= 0.80) if big and row["peer_frac"][0] == row["peer_frac"][0] else None,
    }


def print_table(rows, results, args) -> None:
    r0 = results[0]
    world = len(results)
    hw = r0.get("device_name", "CPU")
    shared = r0.get("shared_gpu")
    gpus = f"{r0.get('ngpu', 0)} x {hw}" if r0.get("ngpu") else "CPU (gloo)"
    print(f"# {world} ranks on {gpus}" + (f"  SHARED: {world // max(1, r0['ngpu'])} ranks per GPU, timings include the other ranks' work" if shared else ""))
    print(f"# {args.layers} MoE layers resident ({args.depth or args.layers} of compute per pass) x {args.experts} experts + "
          f"{args.redundant} redundant, hidden {args.hidden}, expert inter {args.inter}, {args.tokens} tokens x top-{args.top_k}, "
          f"policy {args.policy}, zipf {args.zipf}, layers/step {args.layers_per_pass}, agreement lag {args.agreement_lag}, "
          f"plan order {args.plan_order}")
    if r0.get("peer_copy_gbps"):
        pc = r0["peer_copy_gbps"]
        print(f"# peer-copy limit (CUDA IPC pull of {args.peer_copy_mb} MB, GPU {0} <- GPU {1 % max(1, r0['ngpu'])}): one rank "
              f"{pc['one']:.0f} GB/s, every rank at once {pc['all']:.0f} GB/s per rank (the reference for transfers)")
    for name, why in r0.get("skipped", {}).items():
        print(f"# {name}: not run ({why})")
    print(f"# stop-the-world moves through {r0['stop_the_world_backend']}; runs per strategy: {rows[0]['runs'] if rows else 0} "
          f"timed (interleaved) + 1 checked for {','.join(args.checked) or 'none'}; median [min-max] over timed runs")
    if r0.get("deadline_hit"):
        print(f"# DEADLINE ({args.deadline:.0f} s) hit: ranks stopped, the runs every rank finished are reported")
    if r0.get("budget_stopped"):
        print("# time budget spent: fewer runs than asked")
    hdr = ("strategy", "backend", "runs", "steady p99 ms", "stall p99/steady p99", "stall max/steady p99", "passes to live",
           "commit pass +ms", "GB/s/layer", "of limit", "after/steady p50", "payoff passes", "staging MB", "checks")
    print("| " + " | ".join(hdr) + " |")
    print("|" + "---|" * len(hdr))
    for r in rows:
        c = r["checks"]
        ok = ("ok" if c["slots"] == c["maps"] == c["outputs"] == 0 and c["checks"] > 0 and not r["failed_runs"]
              else f"FAIL {c} failed runs {r['failed_runs']} {r['why_failed']}")
        print("| " + " | ".join([
            r["strategy"], r["backend"], str(r["runs"]), _mr(r["steady_p99"]), _mr(r["p99_ratio"], suffix="x"),
            _mr(r["max_ratio"], suffix="x"), _mr(r["passes_to_live"], "{:.0f}"), _mr(r["commit_cost_ms"]),
            _mr(r["gbps_big"] if r["gbps_big"][0] == r["gbps_big"][0] else r["gbps"], "{:.0f}"),
            _mr(r["peer_frac"], "{:.0%}"), _mr(r["after_ratio"], "{:.3f}"), _mr(r["payoff_passes"], "{:.0f}"),
            f"{r['staging_mb'][2]:.0f}", f"{ok} ({c['checks']})",
        ]) + " |")
    print(f"stall = every pass from the window's end to live + {args.tail}; steady = passes {args.skip + 1} to the window's "
          "end, check passes excluded; commit pass +ms = median of (a committing pass - median of the non-committing passes among the commits); GB/s/layer = bytes a "
          f"rank received in a step / device time of its copies, steps of >= {args.big_layer_mb} MB (gloo: not timed on "
          "the device); of limit = that / every-rank-at-once peer-copy limit; payoff = passes until the stall's extra time "
          "is repaid by the balanced placement's faster passes")
    print("targets (on medians): " + "; ".join(
        f"{r['strategy']}: " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in targets(r, args).items() if v is not None)
        for r in rows if r["strategy"] != "stop-the-world"))


def plot(per_run, path: str, args, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    for f in per_run:
        if f["name"] not in names:
            names.append(f["name"])
    names.sort(key=lambda n: args.strategies.index(n) if n in args.strategies else len(args.strategies))
    fig, axes = plt.subplots(len(names), 1, figsize=(10, 2.4 * len(names)), sharex=True)
    axes = np.atleast_1d(axes)
    for ax, name in zip(axes, names):
        runs = [f for f in per_run if f["name"] == name and f["mode"] == "timed" and f["ok"]]
        ymax = 0.0
        for f in runs:
            t = np.asarray(f["times_ms"])
            xs = np.arange(1, len(t) + 1) - f["window_end"]  # 0 = the window's end
            ax.plot(xs, t, lw=0.7, alpha=0.8)
            ymax = max(ymax, t.max())
        if runs:
            ax.axvspan(0, float(np.median([f["live"] - f["window_end"] for f in runs])) + args.tail, color="red", alpha=0.08,
                       label="stall window (median)")
        ax.set_ylabel("pass ms")
        ax.set_ylim(0, ymax * 1.05 if ymax else 1)
        ax.set_title(f"{name} ({runs[0]['backend'] if runs else '-'}), {len(runs)} runs", fontsize=9)
        ax.legend(loc="lower left", fontsize=7)
    axes[-1].set_xlabel("forward pass, 0 = the load window's end")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--ranks", type=int, default=0, help="default: number of GPUs (at least 2)")
    ap.add_argument("--ranks-per-node", type=int, default=0)
    ap.add_argument("--layers", type=int, default=8, help="resident MoE layers (weights in memory, rebalanced)")
    ap.add_argument("--depth", type=int, default=0, help="MoE layers of compute per pass, cycling the resident "
                    "layers' weights (58 for DeepSeek-V3's pass time); default: --layers")
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--redundant", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=7168)
    ap.add_argument("--inter", type=int, default=2048)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--zipf", type=float, default=1.2)
    ap.add_argument("--policy", default="deepseek", help="deepseek moves more than min-move: a harder test of the transfer")
    ap.add_argument("--warmup", type=int, default=30, help="passes before the load window opens")
    ap.add_argument("--window", type=int, default=30)
    ap.add_argument("--skip", type=int, default=10, help="first passes left out of steady (warm-up)")
    ap.add_argument("--tail", type=int, default=4, help="passes after live still counted in the stall window")
    ap.add_argument("--after-passes", type=int, default=30)
    ap.add_argument("--max-stall-passes", type=int, default=400)
    ap.add_argument("--agreement-lag", type=int, default=2)
    ap.add_argument("--layers-per-pass", type=int, default=1)
    ap.add_argument("--plan-order", choices=["plan", "sorted"], default="plan",
                    help="sorted: hand backends each rank's transfers in (src, dst) order (A/B of the plan's rotated order)")
    ap.add_argument("--planner", choices=["process", "thread"], default="process")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--checked", default="all", help="strategies with one untimed run checked after every commit "
                    "(comma-separated, 'all' or 'none')")
    ap.add_argument("--time-budget", type=float, default=0, help="seconds after set-up; no new run starts after this "
                    "(default: deadline - 60)")
    ap.add_argument("--deadline", type=float, default=1e9, help="seconds; the ranks are stopped then and the runs done reported")
    ap.add_argument("--probe-tokens", type=int, default=4)
    ap.add_argument("--peer-copy-mb", type=int, default=1024)
    ap.add_argument("--big-layer-mb", type=float, default=256)
    ap.add_argument("--strategies", default=",".join(STRATEGIES),
                    help="comma-separated; NAME:N moves N layers per step (default --layers-per-pass)")
    ap.add_argument("--profile", default="", help="strategies to run once more under torch.profiler (rank 0)")
    ap.add_argument("--profile-dir", default="profile")
    ap.add_argument("--profile-trace", action="store_true", help="also write the chrome trace (large)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dispatch", choices=["hash", "balanced"], default="hash",
                    help="the router's replica choice (vllm_eplb/kernels/replica_dispatch.py)")
    ap.add_argument("--tiny", action="store_true", help="small shapes (hidden 64, inter 32, 64 tokens, 4 layers)")
    ap.add_argument("--fault", action="store_true", help=argparse.SUPPRESS)  # corrupt a slot in the checked run
    ap.add_argument("--json", help="write the summary rows and per-run figures here")
    ap.add_argument("--plot", help="write a PNG of pass time around the rebalance, every timed run")
    args = ap.parse_args()
    if args.tiny:
        args.hidden, args.inter, args.tokens, args.layers, args.experts, args.redundant = 64, 32, 64, 4, 16, 4
        args.peer_copy_mb = 16
    args.strategies = [s for s in args.strategies.split(",") if s]
    args.profile = [s for s in args.profile.split(",") if s]
    args.checked = (args.strategies if args.checked == "all" else [] if args.checked == "none"
                    else [s for s in args.checked.split(",") if s])
    if not args.time_budget:
        args.time_budget = max(1.0, args.deadline - 60)
    bad = [s for s in args.strategies + args.profile if s.split(":")[0] not in STRATEGIES]
    if bad:
        ap.error(f"unknown strategies {bad}; choose from {STRATEGIES}")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no GPU here; use --device cpu for a logic check")
    world = args.ranks or max(2, torch.cuda.device_count() if args.device == "cuda" else 2)
    # the planner process imports vllm_eplb too
    root = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
    os.environ["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])

    t0 = time.time()
    try:
        results = launch(rank_main, world, (args,), timeout_s=max(1.0, args.deadline))
    except RankFailed as exc:
        sys.exit(str(exc))
    except TimedOut as exc:  # report the runs every rank finished
        if any(res is None for res in exc.partial):
            sys.exit(f"{exc}; rank(s) {[r for r, res in enumerate(exc.partial) if res is None]} finished no run")
        results = exc.partial
        for res in results:
            res["deadline_hit"] = True
    n_done = min(len(res["runs"]) for res in results)
    for res in results:
        res["runs"] = res["runs"][:n_done]
    rows, extra = summarize(results, args)
    print_table(rows, results, args)
    print(f"# wall time {time.time() - t0:.0f} s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "peer_copy_gbps": results[0].get("peer_copy_gbps"), "device": results[0].get("device_name"),
                       "ngpu": results[0].get("ngpu"), "shared_gpu": results[0].get("shared_gpu"), "rows": rows,
                       "targets": {r["strategy"]: targets(r, args) for r in rows},
                       "per_run": [{k: v for k, v in f.items()} for f in extra["per_run"]]}, fh)
    if args.plot:
        try:
            plot(extra["per_run"], args.plot, args, f"{len(results)} ranks on {results[0].get('ngpu') or 'CPU'} x "
                 f"{results[0].get('device_name', '')}" + (" (shared)" if results[0].get("shared_gpu") else ""))
        except ImportError:
            print("(matplotlib not installed: no plot)")
    failed = [r["strategy"] for r in rows if r["checks"]["slots"] or r["checks"]["maps"] or r["checks"]["outputs"]
              or r["failed_runs"] or not r["checks"]["checks"]]
    if failed:
        sys.exit(f"correctness checks failed for {failed}")


if __name__ == "__main__":
    main()
