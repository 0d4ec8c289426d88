"""Rebalance stall on GPUs: what moving experts costs the decode loop, per strategy.

N ranks (one process each) run a synthetic expert-parallel MoE decode loop: every
layer routes a skewed batch of tokens (top-k of E logical experts) through the
routing maps, and each rank computes its local slots' tokens with one grouped GEMM
(DeepSeek-V3 expert shapes in bf16: hidden 7168, expert intermediate 2048, 88 MB per
expert; layer count scaled to fit memory). The vllm-eplb state machine ticks once per
pass. Each strategy starts from the same placement and load, goes through one
rebalance, and the loop keeps running:

  stop-the-world   the load all-reduce, the plan and all layers' transfers in one pass
                   (upstream vLLM's synchronous EPLB), over the fastest GPU backend here
  gloo             vllm-eplb's machine, one layer per step through pinned host staging
                   over gloo (upstream's async EPLB without NIXL moves data this way)
  cuda_ipc         vllm-eplb, one layer per step, pulled over CUDA IPC on a side stream
  nccl             vllm-eplb, one layer per step, NCCL isend/irecv on a side stream
                   (needs one GPU per rank: NCCL refuses two ranks on one GPU)

Printed, in one run: pass time p50/p99/max in steady state (the placement in force
before the rebalance) and while transferring, their ratios (targets: p99 <= 1.10x,
max <= 1.25x steady p99), per-layer transfer throughput (device time of the copies)
against the peer-copy limit measured in the same run (target >= 250 GB/s per
direction for layers of 256 MB or more), passes from the window's end to the new
placement fully live, staging memory, and the correctness checks (every slot's
weights match the map after each commit, maps equal on every rank, probe outputs
bit-identical to those before any rebalance).

    python benchmarks/gpu_rebalance.py                      # one rank per GPU, all GPUs
    python benchmarks/gpu_rebalance.py --ranks 2 --layers 8 --json out.json --plot out.png
    python benchmarks/gpu_rebalance.py --device cpu --tiny  # logic check without a GPU

With fewer GPUs than ranks, ranks share GPUs (timings then include the other rank's
work on the same GPU, and the peer copy is a copy within one GPU's memory): the
table says so on its first line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import sys
import tempfile
import time
import traceback

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from vllm_eplb.core import Balancer, BalancerConfig, Comm, MoELayout, RoutingMaps, Topology, default_placement, new_gloo_group  # noqa: E402
from vllm_eplb.core.placement import physical_to_logical_load  # noqa: E402
from vllm_eplb.core.planner import make_plan  # noqa: E402
from vllm_eplb.core.policies import get_policy  # noqa: E402
from vllm_eplb.core.transfer import TransferBackend  # noqa: E402
from vllm_eplb.core.transfer.select import make_backend  # noqa: E402
from vllm_eplb.core.transfer.backend import expert_nbytes  # noqa: E402
from vllm_eplb.harness.runner import free_port  # noqa: E402

STRATEGIES = ["stop-the-world", "gloo", "cuda_ipc", "nccl"]


# --------------------------------------------------------------------------- model


_GROUPED_MM_OK = hasattr(torch, "_grouped_mm")


def grouped_mm(x: torch.Tensor, w_t: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Rows of x grouped by offs (cumulative ends), group g times w_t[g]. Rows past the
    last group are left unspecified (callers mask them)."""
    global _GROUPED_MM_OK
    if x.is_cuda and _GROUPED_MM_OK:
        try:
            return torch._grouped_mm(x, w_t, offs=offs)
        except Exception as exc:  # older torch or GPU: a loop of matmuls, with a host sync
            print(f"torch._grouped_mm unavailable ({exc}); falling back to a loop", file=sys.stderr)
            _GROUPED_MM_OK = False
    out = torch.zeros((x.shape[0], w_t.shape[-1]), dtype=x.dtype, device=x.device)
    ends = offs.tolist()
    start = 0
    for g, end in enumerate(ends):
        if end > start:
            out[start:end] = x[start:end] @ w_t[g]
        start = end
    return out


class SynthMoE:
    """Rank r's share of an EP MoE: slots [r*S, (r+1)*S) of every layer."""

    def __init__(self, topo: Topology, layers: int, hidden: int, inter: int, rank: int, device, dtype, seed: int = 0):
        self.topo, self.layers, self.hidden, self.inter = topo, layers, hidden, inter
        self.rank, self.device, self.dtype, self.seed = rank, device, dtype, seed
        s = topo.slots_per_rank
        self.first = rank * s
        self.w13 = [torch.empty((s, 2 * inter, hidden), dtype=dtype, device=device) for _ in range(layers)]
        self.w2 = [torch.empty((s, hidden, inter), dtype=dtype, device=device) for _ in range(layers)]
        self.placement0 = default_placement(topo, layers)
        self.maps = RoutingMaps.allocate(self.placement0, topo, device=device)
        self.pass_load = torch.zeros((layers, topo.num_physical), dtype=torch.int64, device=device)
        self.record_flag = torch.zeros((), dtype=torch.bool, device=device)

    def weights_of(self, layer: int) -> list[torch.Tensor]:
        return [self.w13[layer], self.w2[layer]]

    def expert_weights(self, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator(device=self.device).manual_seed(self.seed * 1_000_003 + layer * 10_007 + expert)
        a = torch.randn((2 * self.inter, self.hidden), generator=g, device=self.device, dtype=torch.float32)
        b = torch.randn((self.hidden, self.inter), generator=g, device=self.device, dtype=torch.float32)
        return (a * 0.02).to(self.dtype), (b * 0.02).to(self.dtype)

    def reset(self) -> None:
        """Back to the initial placement: weights regenerated, maps rewritten."""
        s = self.topo.slots_per_rank
        for layer in range(self.layers):
            for slot in range(s):
                a, b = self.expert_weights(layer, int(self.placement0[layer, self.first + slot]))
                self.w13[layer][slot].copy_(a)
                self.w2[layer][slot].copy_(b)
        self.maps.write_all(self.placement0, self.topo)
        self.pass_load.zero_()

    def fingerprints(self) -> torch.Tensor:
        """(layers, local slots, 2) float64 sums of each slot's weights: equal bits give
        equal sums (same shape, same kernel), distinct experts differ."""
        out = torch.empty((self.layers, self.topo.slots_per_rank, 2), dtype=torch.float64, device=self.device)
        for layer in range(self.layers):
            out[layer, :, 0] = self.w13[layer].sum(dim=(1, 2), dtype=torch.float64)
            out[layer, :, 1] = self.w2[layer].sum(dim=(1, 2), dtype=torch.float64)
        return out.cpu()

    def forward(self, x: torch.Tensor, routing: torch.Tensor, combine=None, depth: int = 0) -> torch.Tensor:
        """x: (T, hidden); routing: (layers, T, k) logical experts. Decode-shaped EP layer:
        every rank sees every token (TP+EP layout) and computes its own slots. `depth`
        layers of compute per pass (default: the resident layers), cycling through the
        resident layers' weights: a deep model's pass time from the layers that fit."""
        s = self.topo.slots_per_rank
        tokens, k = routing.shape[1], routing.shape[2]
        tok = torch.arange(tokens, device=x.device)
        for d in range(depth or self.layers):
            layer = d % self.layers
            ids = routing[layer]
            count = self.maps.replica_count[layer][ids]
            phys = self.maps.log2phy[layer][ids, tok[:, None] % count]  # replica by token index, as vLLM
            if d < self.layers:
                # load for the window, without a branch on the host: add 0 when not recording
                self.pass_load[layer].index_add_(0, phys.flatten(), self.record_flag.expand(phys.numel()).long())
            local = phys - self.first
            is_local = (local >= 0) & (local < s)
            key = torch.where(is_local, local, s).flatten()
            order = torch.argsort(key, stable=True)
            offs = torch.bincount(key, minlength=s + 1)[:s].cumsum(0).to(torch.int32)
            rows = tok.repeat_interleave(k)[order]
            h = grouped_mm(x[rows], self.w13[layer].transpose(-2, -1), offs)
            a = torch.nn.functional.silu(h[:, : self.inter]) * h[:, self.inter :]
            y = grouped_mm(a, self.w2[layer].transpose(-2, -1), offs)
            y = torch.where(is_local.flatten()[order][:, None], y, torch.zeros((), dtype=y.dtype, device=y.device))
            out = torch.zeros_like(x).index_add_(0, rows, y)
            if combine is not None:
                combine(out)
            x = x + out
        return x

    def probe(self, x: torch.Tensor, routing: torch.Tensor) -> torch.Tensor:
        """(layers, T, k, hidden) float32: each (token, choice)'s expert output computed
        alone from whichever slot the map names, zeros where that slot is elsewhere. Summed
        over ranks it is exact (one non-zero per entry) and independent of placement."""
        s = self.topo.slots_per_rank
        layers, tokens, k = routing.shape
        out = torch.zeros((layers, tokens, k, self.hidden), dtype=torch.float32)
        maps_l2p = self.maps.log2phy.cpu()
        counts = self.maps.replica_count.cpu()
        for layer in range(layers):
            for t in range(tokens):
                for j in range(k):
                    e = int(routing[layer, t, j])
                    phys = int(maps_l2p[layer, e, t % int(counts[layer, e])])
                    slot = phys - self.first
                    if 0 <= slot < s:
                        h = x[t : t + 1] @ self.w13[layer][slot].T
                        a = torch.nn.functional.silu(h[:, : self.inter]) * h[:, self.inter :]
                        out[layer, t, j] = (a @ self.w2[layer][slot].T).float().cpu()[0]
        return out


def skewed_routing(layers: int, experts: int, tokens: int, k: int, zipf: float, bank: int, seed: int, device) -> torch.Tensor:
    """(bank, layers, tokens, k): top-k without replacement from a Zipf over experts whose
    hot end sits on the first ranks of the default placement, a different hot order per layer."""
    g = torch.Generator().manual_seed(seed)
    out = torch.empty((bank, layers, tokens, k), dtype=torch.int64)
    for layer in range(layers):
        hot = torch.randperm(experts // 2, generator=g)  # hot experts in the lower half
        order = torch.cat([hot, torch.arange(experts // 2, experts)])
        p = torch.empty(experts)
        p[order] = 1.0 / torch.arange(1, experts + 1, dtype=torch.float64).pow(zipf).float()
        for b in range(bank):
            out[b, layer] = torch.multinomial(p.expand(tokens, experts), k, replacement=False, generator=g)
    return out.to(device)


# --------------------------------------------------------------------------- ranks


class RecordingBackend(TransferBackend):
    """Keeps every step's handle and jobs, for per-step bytes and device time."""

    def __init__(self, inner: TransferBackend):
        self.inner, self.name, self.steps = inner, inner.name, []

    def prepare(self, weights, max_step_bytes):
        self.inner.prepare(weights, max_step_bytes)

    def start(self, jobs, rank):
        handle = self.inner.start(jobs, rank)
        self.steps.append((jobs, handle, time.perf_counter()))
        return handle


def step_figures(rec: RecordingBackend, rank: int) -> list[dict]:
    rows = []
    for jobs, handle, _ in rec.steps:
        recv = sum(len(t.experts) * expert_nbytes(j.weights) for j in jobs for t in j.plan.part(rank).recvs)
        rows.append({"layers": [j.plan.layer for j in jobs], "bytes_received": recv, "device_s": handle.device_seconds(), "staging": handle.staging_bytes})
    return rows


def peer_copy_limit(cpu_group, rank: int, world: int, device, nbytes: int, shared_gpu: bool) -> dict:
    """GB/s of one rank pulling a peer's buffer over CUDA IPC (one direction), and of
    every rank pulling at once (all directions): the interconnect's limit, measured here."""
    from torch.multiprocessing.reductions import reduce_tensor

    buf = torch.ones(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(buf)
    handles: list = [None] * world
    dist.all_gather_object(handles, reduce_tensor(buf), group=cpu_group)
    peer = (rank + 1) % world
    fn, args = handles[peer]
    src = fn(*args)
    result = {}
    for mode in ("one", "all"):
        best = 0.0
        for _ in range(5):
            dist.barrier(group=cpu_group)
            if mode == "all" or rank == 0:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                dst.copy_(src, non_blocking=True)
                end.record()
                end.synchronize()
                best = max(best, nbytes / (start.elapsed_time(end) / 1e3) / 1e9)
            dist.barrier(group=cpu_group)
        result[mode] = best
    del src
    torch.cuda.synchronize()
    return result


def rank_main(rank: int, world: int, args, port: int, outdir: str) -> None:
    result = {"rank": rank}
    try:
        cuda = args.device == "cuda"
        ngpu = torch.cuda.device_count() if cuda else 0
        shared_gpu = cuda and ngpu < world
        device = f"cuda:{rank % ngpu}" if cuda else "cpu"
        if cuda:
            torch.cuda.set_device(device)
        else:
            torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        ranks = list(range(world))
        cpu_group = new_gloo_group(ranks, 120)
        model_group = nccl_group = None
        if cuda and not shared_gpu:
            model_group = dist.new_group(ranks, backend="nccl")
            nccl_group = dist.new_group(ranks, backend="nccl")

        topo = Topology(world, args.experts, args.experts + args.redundant, ranks_per_node=args.ranks_per_node)
        dtype = torch.bfloat16 if cuda else torch.float32
        model = SynthMoE(topo, args.layers, args.hidden, args.inter, rank, device, dtype, args.seed)
        model.reset()
        # fingerprints of every logical expert, from the ranks that hold it initially
        fp_local = model.fingerprints()
        fps: list = [None] * world
        dist.all_gather_object(fps, fp_local, group=cpu_group)
        table = torch.zeros((args.layers, args.experts, 2), dtype=torch.float64)
        s = topo.slots_per_rank
        for r in range(world):
            for layer in range(args.layers):
                for slot in range(s):
                    table[layer, model.placement0[layer, r * s + slot]] = fps[r][layer, slot]

        routing = skewed_routing(args.layers, args.experts, args.tokens, args.top_k, args.zipf, 32, args.seed, device)
        x0 = (torch.randn((args.tokens, args.hidden), generator=torch.Generator().manual_seed(1)) * 0.1).to(device, dtype)
        probe_routing = routing[0, :, : args.probe_tokens, :2].cpu()
        probe_x = x0[: args.probe_tokens]

        def combine(t):
            dist.all_reduce(t, group=model_group)

        def check(mismatch: dict) -> None:
            fp = model.fingerprints()
            placement = model.maps.phy2log.cpu().numpy()
            for layer in range(args.layers):
                for slot in range(s):
                    e = placement[layer, model.first + slot]
                    if not torch.equal(fp[layer, slot], table[layer, e]):
                        mismatch["slots"] += 1
            digest = hashlib.sha256(placement.tobytes() + model.maps.log2phy.cpu().numpy().tobytes()).hexdigest()
            digests: list = [None] * world
            dist.all_gather_object(digests, digest, group=cpu_group)
            if len(set(digests)) != 1:
                mismatch["maps"] += 1
            out = model.probe(probe_x, probe_routing)
            dist.all_reduce(out, group=cpu_group)
            if not torch.equal(out, reference):
                mismatch["outputs"] += 1
            mismatch["checks"] += 1

        reference = model.probe(probe_x, probe_routing)
        dist.all_reduce(reference, group=cpu_group)

        if cuda:
            result["peer_copy_gbps"] = peer_copy_limit(cpu_group, rank, world, device, args.peer_copy_mb << 20, shared_gpu)
            result["device_name"] = torch.cuda.get_device_name()

        # the same selector the vLLM integration uses
        def backend(name):
            return make_backend(name, torch.device(device), topo, rank, model.weights_of, args.layers,
                                gloo_group=new_gloo_group(ranks, 300), cpu_group=cpu_group, nccl_group=lambda: nccl_group)

        ipc = backend("cuda_ipc") if cuda and topo.num_nodes == 1 else None
        p2p = backend("nccl") if nccl_group is not None else None
        gloo_backend = backend("gloo")

        strategies = []
        for name in args.strategies:
            if name == "cuda_ipc" and ipc is None:
                result.setdefault("skipped", {})[name] = "needs CUDA"
            elif name == "nccl" and p2p is None:
                result.setdefault("skipped", {})[name] = "needs one GPU per rank" if cuda else "needs CUDA"
            else:
                strategies.append(name)
        fastest = p2p or ipc or gloo_backend
        backends = {"stop-the-world": fastest, "gloo": gloo_backend, "cuda_ipc": ipc, "nccl": p2p}
        result["stop_the_world_backend"] = fastest.name
        result["strategies"] = {}

        policy = get_policy(args.policy)
        warm, window = args.warmup, args.window
        total = warm + window + args.after_passes + 8 * args.layers + 40
        for name in strategies:
            model.reset()
            torch.cuda.synchronize() if cuda else None
            rec = RecordingBackend(backends[name])
            stw = name == "stop-the-world"
            cfg = BalancerConfig(
                window_size=window,
                step_interval=warm + window if not stw else 10**9,
                layers_per_pass=1,
                improvement_threshold=0.05,  # later cycles find little to gain: one rebalance per strategy
                policy=args.policy,
                agreement_lag=args.agreement_lag,
                planner="process",
            )
            layout = MoELayout(topo, args.layers, model.pass_load, model.maps, model.weights_of, model.record_flag)
            balancer = Balancer(cfg, layout, Comm(rank, world, cpu_group, rec), policy)
            balancer.planner.ready.result()  # the planner process starts with the server, not in the loop
            dist.barrier(group=cpu_group)
            mismatch = {"slots": 0, "maps": 0, "outputs": 0, "checks": 0}
            times, states = [], []
            last_committed, done_at = 0, None
            if stw:
                model.record_flag.fill_(True)
            for p in range(1, total + 1):
                t0 = time.perf_counter()
                model.forward(x0, routing[p % routing.shape[0]], combine if model_group is not None else None, args.depth)
                state = balancer.state
                if stw and p == warm + window:
                    # stop the world: load all-reduce, plan, every layer moved, in this pass
                    model.record_flag.fill_(False)
                    load = model.pass_load.cpu()
                    dist.all_reduce(load, group=cpu_group)
                    logical = physical_to_logical_load(load.numpy().astype(np.float64), balancer.placement, topo.num_logical)
                    plan = make_plan(policy, logical, balancer.placement.copy(), topo)
                    balancer.rebalance_now(plan.placement)
                    state, done_at = "transferring", 0
                balancer.tick()
                if cuda:
                    # the step's sampled tokens go back to the CPU: the main stream syncs,
                    # copies on the balancer's side stream go on across passes
                    torch.cuda.current_stream().synchronize()
                if model_group is None and world > 1:
                    dist.barrier(group=cpu_group)  # ranks advance in lock-step, as EP's all-to-all makes them
                times.append(time.perf_counter() - t0)
                states.append(state)
                committed = balancer.stats.layers_committed
                if committed != last_committed or stw and p == warm + window or p % args.check_every == 0:
                    last_committed = committed
                    check(mismatch)
            if done_at is None:
                done_at = balancer.stats.cycle_passes[0] if balancer.stats.cycle_passes else None
            steps = step_figures(rec, rank)
            result["strategies"][name] = {
                "backend": rec.name,
                "times": times,
                "states": states,
                "passes_to_live": done_at,
                "steps": steps,
                "mismatch": mismatch,
                "cycles_completed": balancer.stats.cycles_completed if not stw else 1,
                "aborted": dict(balancer.stats.cycles_aborted),
                "observed": [b for _, b in balancer.stats.observed_history],
                "moved_slots": balancer.stats.last_plan_moved_slots,
                "max_staging": max([st["staging"] for st in steps], default=0),
            }
            balancer.shutdown()
            dist.barrier(group=cpu_group)
        result["shared_gpu"] = shared_gpu
        result["ngpu"] = ngpu
    except Exception:
        result["error"] = traceback.format_exc()
    with open(os.path.join(outdir, f"rank{rank}.pkl"), "wb") as fh:
        pickle.dump(result, fh)
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:
            pass


# --------------------------------------------------------------------------- report


def pct(xs, q):
    return float(np.percentile(np.asarray(xs) * 1e3, q)) if len(xs) else float("nan")


def summarize(results: list[dict], args) -> list[dict]:
    rows = []
    for name in results[0]["strategies"]:
        per_rank = [r["strategies"][name] for r in results]
        # a pass takes as long as its slowest rank
        times = np.max(np.array([pr["times"] for pr in per_rank]), axis=0)
        states = per_rank[0]["states"]
        n_warm = args.warmup // 2
        steady = [t for i, (t, s) in enumerate(zip(times, states)) if i >= n_warm and i < args.warmup + args.window and s in ("idle", "collecting")]
        xfer = [t for t, s in zip(times, states) if s == "transferring"]
        last_x = max((i for i, s in enumerate(states) if s == "transferring"), default=len(states))
        after = [t for i, (t, s) in enumerate(zip(times, states)) if i > last_x + 2 and s in ("idle", "collecting")]
        big = [st for pr in per_rank for st in pr["steps"] if st["device_s"] and st["bytes_received"] > 0]
        gbps = [st["bytes_received"] / st["device_s"] / 1e9 for st in big]
        layer_mb = max((st["bytes_received"] / 2**20 for pr in per_rank for st in pr["steps"]), default=0)
        mm = {k: sum(pr["mismatch"][k] for pr in per_rank) for k in ("slots", "maps", "outputs", "checks")}
        s99 = pct(steady, 99)
        rows.append({
            "strategy": name,
            "backend": per_rank[0]["backend"],
            "steady_p50_ms": pct(steady, 50), "steady_p99_ms": s99,
            "xfer_passes": len(xfer),
            "xfer_p50_ms": pct(xfer, 50), "xfer_p99_ms": pct(xfer, 99), "xfer_max_ms": max(xfer) * 1e3 if xfer else float("nan"),
            "p99_ratio": pct(xfer, 99) / s99, "max_ratio": (max(xfer) * 1e3 if xfer else float("nan")) / s99,
            "after_p50_ms": pct(after, 50),
            "layer_mb_max": layer_mb,
            "gbps_median": float(np.median(gbps)) if gbps else float("nan"),
            "passes_to_live": per_rank[0]["passes_to_live"],
            "staging_mb": max(pr["max_staging"] for pr in per_rank) / 2**20,
            "checks": mm,
            "aborted": per_rank[0]["aborted"],
            "balancedness": per_rank[0]["observed"],
            "times_ms": [t * 1e3 for t in times],
            "states": states,
        })
    return rows


def print_table(rows, results, args) -> None:
    r0 = results[0]
    world = len(results)
    hw = r0.get("device_name", "CPU")
    print(f"# {world} ranks on {r0.get('ngpu', 0)} x {hw}" + ("  (ranks SHARE GPUs: timings include the other rank's work)" if r0.get("shared_gpu") else ""))
    print(f"# {args.layers} MoE layers resident ({args.depth or args.layers} of compute per pass) x {args.experts} experts + {args.redundant} redundant, hidden {args.hidden}, "
          f"expert inter {args.inter}, {args.tokens} tokens x top-{args.top_k}, policy {args.policy}, zipf {args.zipf}")
    if "peer_copy_gbps" in r0:
        pc = r0["peer_copy_gbps"]
        label = "copy within one GPU" if r0.get("shared_gpu") else "GPU to GPU over IPC"
        print(f"# peer-copy limit ({label}, {args.peer_copy_mb} MB): one direction {pc['one']:.0f} GB/s, every rank at once {pc['all']:.0f} GB/s per rank")
    for name, why in r0.get("skipped", {}).items():
        print(f"# {name}: not run ({why})")
    print(f"# stop-the-world moves through: {r0['stop_the_world_backend']}")
    hdr = ("strategy", "backend", "steady p50", "steady p99", "xfer p50", "xfer p99", "xfer max", "p99/steady", "max/steady",
           "after p50", "max MB/layer", "GB/s/layer", "passes to live", "staging MB", "checks ok")
    print("| " + " | ".join(hdr) + " |")
    print("|" + "---|" * len(hdr))
    for r in rows:
        c = r["checks"]
        ok = "yes" if c["slots"] == c["maps"] == c["outputs"] == 0 and c["checks"] > 0 else f"NO {c}"
        print("| " + " | ".join([
            r["strategy"], r["backend"], f"{r['steady_p50_ms']:.2f}", f"{r['steady_p99_ms']:.2f}",
            f"{r['xfer_p50_ms']:.2f}", f"{r['xfer_p99_ms']:.2f}", f"{r['xfer_max_ms']:.2f}",
            f"{r['p99_ratio']:.2f}x", f"{r['max_ratio']:.2f}x", f"{r['after_p50_ms']:.2f}",
            f"{r['layer_mb_max']:.0f}", f"{r['gbps_median']:.0f}", str(r["passes_to_live"]), f"{r['staging_mb']:.0f}",
            f"{ok} ({c['checks']})",
        ]) + " |")
    print("times in ms per pass (slowest rank); steady = before the rebalance, same placement; xfer = passes "
          "in the transferring state (stop-the-world: its one pass); GB/s = bytes a rank received per step / "
          "device time of the step's copies (median over steps; n/a for gloo)")


def plot(rows, path: str, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), 1, figsize=(10, 2.6 * len(rows)), sharex=True)
    axes = np.atleast_1d(axes)
    for ax, r in zip(axes, rows):
        t = np.asarray(r["times_ms"])
        xs = np.arange(1, len(t) + 1)
        ax.plot(xs, t, lw=0.8, color="black")
        mark = np.array([s == "transferring" for s in r["states"]])
        ax.scatter(xs[mark], t[mark], s=8, color="red", label="transferring", zorder=3)
        ax.set_ylabel("pass ms")
        ax.set_title(f"{r['strategy']} ({r['backend']})", fontsize=9)
        ax.set_ylim(0, max(np.percentile(t, 99.5) * 1.5, t.max() * 1.05) if r["strategy"] != "stop-the-world" else t.max() * 1.05)
        ax.legend(loc="upper right", fontsize=7)
    axes[-1].set_xlabel("forward pass")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


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
    ap.add_argument("--warmup", type=int, default=40)
    ap.add_argument("--window", type=int, default=40)
    ap.add_argument("--after-passes", type=int, default=40)
    ap.add_argument("--agreement-lag", type=int, default=2)
    ap.add_argument("--check-every", type=int, default=50)
    ap.add_argument("--probe-tokens", type=int, default=4)
    ap.add_argument("--peer-copy-mb", type=int, default=1024)
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tiny", action="store_true", help="small shapes (hidden 64, inter 32, 64 tokens, 4 layers)")
    ap.add_argument("--json", help="write the summary rows here")
    ap.add_argument("--plot", help="write a PNG of pass time over passes per strategy")
    args = ap.parse_args()
    if args.tiny:
        args.hidden, args.inter, args.tokens, args.layers, args.experts, args.redundant = 64, 32, 64, 4, 16, 4
        args.warmup, args.window, args.after_passes, args.peer_copy_mb = 20, 20, 20, 16
    args.strategies = [s for s in args.strategies.split(",") if s]
    bad = [s for s in args.strategies if s not in STRATEGIES]
    if bad:
        ap.error(f"--strategies: unknown {bad}; choose from {STRATEGIES}")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no GPU here; use --device cpu for a logic check")
    world = args.ranks or max(2, torch.cuda.device_count() if args.device == "cuda" else 2)
    # the planner process imports vllm_eplb too
    root = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
    os.environ["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])

    with tempfile.TemporaryDirectory() as outdir:
        port = free_port()
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=rank_main, args=(r, world, args, port, outdir)) for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        results = []
        for r in range(world):
            path = os.path.join(outdir, f"rank{r}.pkl")
            if not os.path.exists(path):
                sys.exit(f"rank {r} died without a result (exit code {procs[r].exitcode})")
            with open(path, "rb") as fh:
                results.append(pickle.load(fh))
    errors = [f"rank {r['rank']}:\n{r['error']}" for r in results if "error" in r]
    if errors:
        sys.exit("\n".join(errors))
    rows = summarize(results, args)
    print_table(rows, results, args)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "peer_copy_gbps": results[0].get("peer_copy_gbps"), "device": results[0].get("device_name"),
                       "shared_gpu": results[0].get("shared_gpu"), "rows": rows}, fh)
    if args.plot:
        try:
            plot(rows, args.plot, args)
        except ImportError:
            print("(matplotlib not installed: no plot)")
    failed = [r["strategy"] for r in rows if r["checks"]["slots"] or r["checks"]["maps"] or r["checks"]["outputs"]]
    if failed:
        sys.exit(f"correctness checks failed for {failed}")


if __name__ == "__main__":
    main()
