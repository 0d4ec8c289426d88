"""The router's map-and-record on a GPU: vllm-eplb's balanced dispatch kernel against
upstream vLLM's hash kernel, at decode and prefill shapes.

    python benchmarks/router_dispatch.py                    # GPU: every shape, table of ratios
    python benchmarks/router_dispatch.py --device cpu       # smoke: torch versions + Triton's interpreter

Shapes: 1 to 8,192 tokens x top-8 of 256 logical experts in 256 + 32 physical slots on
8 ranks (DeepSeek-V3's router; the 32 redundant slots hold replicas of the hottest
experts of a Zipf load). Per shape, interleaved (each rep times every kernel once, in
an order rotated by rep):

  graph  one CUDA graph replaying the call `--graph-calls` times, timed with CUDA events:
         what a decode pass under CUDA graphs pays (no Python, no launch gaps)
  eager  triton.testing.do_bench of one call (Python wrapper + launches included)

Median [min-max] over `--reps` reps, the ratio ours/upstream per rep (median [min-max]),
and what the dispatch buys at that size: balancedness (mean/max tokens per rank) with
the hash and with the balanced dispatch, mean over `--batches` batches. Needs only torch, triton and numpy, plus an
installed vLLM for upstream's kernel (vLLM 0.26.0 on the GPU machines): without vLLM it
says so and times only vllm-eplb's kernel.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
SMOKE_TOKENS = (1, 7, 64, 300)


def placement(experts: int, redundant: int, ranks: int, load: np.ndarray) -> np.ndarray:
    """phy2log (physical,): every expert once, the `redundant` slots to the experts with the
    most load per replica (greedy), slots then dealt so each rank's load is about even."""
    replicas = np.ones(experts, dtype=np.int64)
    for _ in range(redundant):
        replicas[np.argmax(load / replicas)] += 1
    items = sorted(((load[e] / replicas[e], e) for e in range(experts) for _ in range(replicas[e])), reverse=True)
    per_rank = (experts + redundant) // ranks
    rank_load = np.zeros(ranks)
    slots: list[list[int]] = [[] for _ in range(ranks)]
    for w, e in items:  # heaviest first onto the lightest rank with room and without this expert
        order = np.argsort(rank_load, kind="stable")
        r = next((r for r in order if len(slots[r]) < per_rank and e not in slots[r]),
                 next(r for r in order if len(slots[r]) < per_rank))
        slots[r].append(e)
        rank_load[r] += w
    return np.array([e for r in range(ranks) for e in slots[r]], dtype=np.int64)


def maps(phy2log: np.ndarray, experts: int, max_replicas: int):
    """(logical_to_physical (experts, max_replicas) -1 padded, replica_count (experts,))."""
    l2p = np.full((experts, max_replicas), -1, dtype=np.int64)
    count = np.zeros(experts, dtype=np.int64)
    for slot, e in enumerate(phy2log):
        l2p[e, count[e]] = slot
        count[e] += 1
    return l2p, count


def zipf_topk(tokens: int, experts: int, k: int, zipf: float, seed: int) -> np.ndarray:
    """(tokens, k) distinct experts per token; expert popularity Zipf, the same hot experts
    for every seed (the placement is planned on one draw, batches are other draws)."""
    p = 1.0 / np.arange(1, experts + 1) ** zipf
    p = p[np.random.default_rng(0).permutation(experts)]
    p /= p.sum()
    rng = np.random.default_rng(seed)
    # top-k without replacement: Gumbel trick, vectorised
    g = np.log(p)[None, :] - np.log(-np.log(rng.random((tokens, experts))))
    return np.argsort(-g, axis=1)[:, :k]


def load_upstream():
    """(upstream's eplb_map_to_physical_and_record, where from) or (None, why not)."""
    try:
        import vllm
        from vllm.model_executor.layers.fused_moe.router import base_router
    except Exception as exc:  # vLLM absent or not importable here
        return None, f"vLLM not importable ({type(exc).__name__}: {exc})"
    fn = base_router.eplb_map_to_physical_and_record
    if fn.__module__ != base_router.__name__:
        return None, f"base_router's map-and-record is {fn.__module__}.{fn.__name__}, not upstream's (vllm-eplb patched in?)"
    return fn, f"vLLM {getattr(vllm, '__version__', '?')} {base_router.__file__}"


def rank_balance(physical, slots_per_rank: int, ranks: int) -> float:
    load = np.bincount(physical.reshape(-1), minlength=slots_per_rank * ranks).reshape(ranks, -1).sum(1)
    return float(load.mean() / load.max()) if load.max() else 1.0


def med_range(xs) -> str:
    return f"{statistics.median(xs):.2f} [{min(xs):.2f}-{max(xs):.2f}]"


def time_graph(torch, fn, calls: int) -> float:
    """Microseconds per call: one CUDA graph of `calls` calls, replayed and timed with events."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    g.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / calls


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--tokens", default="", help="comma-separated token counts (default: 1 to 8192, powers of 2)")
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--redundant", type=int, default=32)
    ap.add_argument("--ranks", type=int, default=8)
    ap.add_argument("--zipf", type=float, default=1.0)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--batches", type=int, default=32, help="batches per shape for the balancedness column")
    ap.add_argument("--graph-calls", type=int, default=50)
    ap.add_argument("--variants", action="store_true", help="also time other tile sizes and warp counts")
    args = ap.parse_args()
    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: kernels run in numpy
    import torch

    from vllm_eplb.kernels.replica_dispatch import torch_balanced_map_and_record, torch_hash_map_and_record

    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no GPU here; --device cpu runs the smoke mode")
    from vllm_eplb.kernels import replica_dispatch_triton as tk

    tokens = [int(t) for t in args.tokens.split(",") if t] or list(SMOKE_TOKENS if args.device == "cpu" else TOKENS)
    dev = torch.device(args.device)
    E, P, R, k = args.experts, args.experts + args.redundant, args.ranks, args.top_k
    window = zipf_topk(4096, E, k, args.zipf, seed=1)  # the load the placement was planned for
    phy2log = placement(E, args.redundant, R, np.bincount(window.reshape(-1), minlength=E).astype(np.float64))
    l2p_np, count_np = maps(phy2log, E, args.redundant + 1)
    l2p = torch.tensor(l2p_np, device=dev)
    count = torch.tensor(count_np, device=dev)
    record = torch.ones((), dtype=torch.bool, device=dev)
    upstream, where = load_upstream() if args.device == "cuda" else (None, "CPU smoke mode: upstream's kernel needs a GPU")
    print(f"# {E} experts + {args.redundant} redundant on {R} ranks, top-{k}, zipf {args.zipf}; "
          f"{torch.cuda.get_device_name() if args.device == 'cuda' else 'CPU (Triton interpreter)'}")
    print(f"# upstream: {where}" if upstream else f"# upstream kernel NOT timed: {where}")

    from vllm_eplb.kernels import tiles

    kernels = {"balanced": lambda *a: tk.triton_balanced_map_and_record(*a)}
    if args.variants and args.device == "cuda":
        default_tile = tiles.MAX_TILE

        def variant(tile, warps):
            def call(*a):
                tiles.MAX_TILE = tile  # read when the call picks its tile (at capture, under a graph)
                try:
                    return tk.triton_balanced_map_and_record(*a, num_warps=warps)
                finally:
                    tiles.MAX_TILE = default_tile
            return call

        for tile, warps in ((32, 4), (128, 4), (128, 8), (256, 8)):
            kernels[f"tile {tile} w{warps}"] = variant(tile, warps)
    if upstream is not None:
        kernels["upstream"] = upstream
    rows = []
    failures = 0
    for T in tokens:
        ids_np = zipf_topk(T, E, k, args.zipf, seed=100 + T).astype(np.int32)
        ids = torch.tensor(ids_np, device=dev)
        unpadded = torch.tensor(T, dtype=torch.int32, device=dev)
        # correctness: the kernel equals the torch reference (ids and load)
        ref_load = torch.zeros(P, dtype=torch.int32)
        ref = torch_balanced_map_and_record(ids.cpu(), ref_load, l2p.cpu(), count.cpu(), torch.tensor(True), unpadded.cpu())
        got_load = torch.zeros(P, dtype=torch.int32, device=dev)
        got = tk.triton_balanced_map_and_record(ids, got_load, l2p, count, record, unpadded)
        same = torch.equal(ref, got.cpu()) and torch.equal(ref_load, got_load.cpu())
        failures += not same
        # what the dispatch buys: mean balancedness over `--batches` batches of this size
        bal = [[], []]
        for b in range(args.batches):
            draw = torch.tensor(zipf_topk(T, E, k, args.zipf, seed=10_000 * b + T).astype(np.int32))
            for i, f in enumerate((torch_hash_map_and_record, torch_balanced_map_and_record)):
                phys = f(draw, torch.zeros(P, dtype=torch.int32), l2p.cpu(), count.cpu(), None)
                bal[i].append(rank_balance(phys.numpy(), P // R, R))
        bal = (float(np.mean(bal[0])), float(np.mean(bal[1])))
        row = {"tokens": T, "same": same, "balance": bal, "graph": {n: [] for n in kernels}, "eager": {n: [] for n in kernels}}
        if args.device == "cuda":
            from triton.testing import do_bench

            loads = {n: torch.zeros(P, dtype=torch.int32, device=dev) for n in kernels}
            calls = {n: (lambda f=f, n=n: f(ids, loads[n], l2p, count, record, unpadded)) for n, f in kernels.items()}
            names = list(kernels)
            for rep in range(args.reps):
                for n in names[rep % len(names):] + names[: rep % len(names)]:
                    row["graph"][n].append(time_graph(torch, calls[n], args.graph_calls))
                    row["eager"][n].append(do_bench(calls[n], warmup=5, rep=20, return_mode="median") * 1e3)
        else:
            for n, f in (("torch balanced", torch_balanced_map_and_record), ("torch hash", torch_hash_map_and_record)):
                cpu_ids, cpu_load = ids.cpu(), torch.zeros(P, dtype=torch.int32)
                ts = []
                for _ in range(args.reps):
                    t0 = time.perf_counter()
                    f(cpu_ids, cpu_load, l2p.cpu(), count.cpu(), torch.tensor(True), unpadded.cpu())
                    ts.append((time.perf_counter() - t0) * 1e6)
                row["eager"][n] = ts
                row["graph"][n] = []
        rows.append(row)
        print(f"tokens {T}: kernel == torch reference: {same}", flush=True)

    names = [n for n in rows[0]["eager"] if rows[0]["eager"][n]]
    print()
    print("| tokens | balanced = torch ref | balancedness hash -> balanced | "
          + " | ".join(f"{n} graph us | {n} eager us" if rows[0]["graph"][n] else f"{n} us" for n in names)
          + (" | ratio graph | ratio eager |" if "upstream" in names else " |"))
    print("|" + "---|" * (3 + sum(2 if rows[0]["graph"][n] else 1 for n in names) + (2 if "upstream" in names else 0)))
    for r in rows:
        cells = [str(r["tokens"]), "yes" if r["same"] else "NO", f"{r['balance'][0]:.3f} -> {r['balance'][1]:.3f}"]
        for n in names:
            if r["graph"][n]:
                cells += [med_range(r["graph"][n]), med_range(r["eager"][n])]
            else:
                cells.append(med_range(r["eager"][n]))
        if "upstream" in names:
            for mode in ("graph", "eager"):
                ratios = [a / b for a, b in zip(r[mode]["balanced"], r[mode]["upstream"])]
                cells.append(med_range(ratios) + "x")
        print("| " + " | ".join(cells) + " |")
    print("ratio = balanced / upstream per rep, median [min-max]; graph = per call inside a CUDA graph of "
          f"{args.graph_calls} calls; eager = do_bench median of one call")
    if failures:
        print(f"FAIL: the kernel differs from the torch reference at {failures} shapes")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
