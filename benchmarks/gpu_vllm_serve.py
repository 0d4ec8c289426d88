"""Real vLLM serving with and without balancing: EPLB off, vLLM's own EPLB, vllm-eplb, on the
same GPUs, the same model and the same skewed, drifting load.

    python benchmarks/gpu_vllm_serve.py --out runs.jsonl            # every GPU of the machine
    python benchmarks/gpu_vllm_serve.py --report runs.jsonl         # the table again, from the runs
    python benchmarks/gpu_vllm_serve.py --device cpu --smoke        # the whole path on CPU, tiny (CI)

The model is built locally (no hub): a Qwen3-MoE with random weights (`--layers 24 --experts 64
--hidden 2048` by default on GPU: 6 MB per bf16 expert, so a layer's moves cost real time), whose
vocabulary is split into `--groups` topics. Each topic's tokens carry a direction of their own
through the residual stream; the router rows of a few experts per topic are pulled towards it, and
the LM head keeps a topic's generations in the topic. The load walks through the topics over the
run (`--phases`), so the hot experts drift: a placement that suits one phase is wrong for the next.

Configurations (`--configs`), each on each deployment (`--deployments`: tp = TP=N + EP, dp = DP=N
+ EP, N = the GPUs; hosts = N `vllm serve` processes as the N hosts of one DP=N + EP deployment,
`--ranks N` of them on however many GPUs there are, several engines to a GPU where there are
fewer: benchmarks/serving/deploy.py says what such a run can and cannot show), each run `--reps`
times, interleaved (rep r in an order rotated by r):

  off              vLLM, EPLB off, the plugin disabled (EPLB_PLUGIN_DISABLE=1; on CPU loaded without
                   --eplb-config, since vLLM's CPU expert parallelism needs its kernel fixes)
  vllm-sync        vLLM's own EPLB, synchronous (use_async false), same window/interval/redundancy
  vllm-async       vLLM's own EPLB, asynchronous (use_async true)
  vllm-eplb        vllm-eplb, its default backend (auto)
  vllm-eplb:B      vllm-eplb with transfer_backend B (cuda_ipc, nccl, gloo)

Per run, from streamed completions (every token timed on the client): output tokens/s over the
measured span, ITL p50/p99, TTFT p99, and ITL p99 inside rebalances against steady ITL p99. A
rebalance's window runs from its start to its end as the server logs them (vllm-eplb: syncing ->
transferring ... -> idle; vLLM sync: "Rearranging experts" ... "Rearranged experts"; vLLM async:
from "Rearranging experts" for num_layers + 8 passes at the steady median ITL, since its worker
logs no end). Balancedness observed (vllm-eplb's /metrics), cycles and layers moved, failed
requests. The table: median [min-max] over reps of each figure, and of each ratio taken within a
rep against that rep's `off` run.

Correctness (`--correctness`, after the timed runs, its own servers so no check runs inside a
timed pass): fixed prompts, greedy, in float32 where the device serves it (GPU: TRITON_ATTN; CPU),
sent over and over while the balancer cycles quickly, compared with EPLB off; and with
`verify_slots` every rank checks after every commit that each slot holds the bytes of the expert
its map names, weights and scales (`vllm:eplb_slot_checks_total`), in float32 and with
`--quantization fp8`.

On one GPU, `--deployments hosts --ranks 2` (or 4) puts that many engines on it as hosts: a real
expert-parallel group of vLLM engines, so every configuration runs there (the correctness checks
included). There a start-up (torch.compile, CUDA graphs, engines sharing the GPU) takes 100-175 s,
longer than a run: `--resident` starts every configuration's server once, side by side, and
interleaves the reps on them, one under load at a time (an idle data-parallel deployment runs no
passes), so interleaved reps of every configuration fit one call. TP and DP deployments need a GPU per rank: with one GPU and no `hosts`, vLLM refuses
EPLB (it needs TP, DP or PCP > 1) and so does vllm-eplb, and the command runs `--single-gpu`
checks instead: the plugin with EPLB off against the plugin absent (tokens/s,
interleaved), one expert-parallel rank refused in one line by vLLM's own CLI, and a slot swap in a
live engine (CUDA graphs and torch.compile on): two experts' slots exchanged in every layer, every
tensor get_expert_weights() lists (weights and scales) and the router's two columns, must leave
greedy outputs unchanged, while exchanging weights without their scales must change them.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from benchmarks.serving.deploy import DEPLOYMENTS, start_server  # noqa: E402
from benchmarks.serving.load import Load, LogWatch, pct, windows_of  # noqa: E402
from benchmarks.serving.probes import drift, forced_logprobs, probe_prompts, probe_rounds, reference_probes, within_noise  # noqa: E402
from benchmarks.serving.model import build_model  # noqa: E402
from benchmarks.serving.report import report  # noqa: E402
from vllm_eplb.harness.server import metric  # noqa: E402

CONFIGS = ("off", "vllm-sync", "vllm-async", "vllm-eplb")


# --------------------------------------------------------------------------- one run


def run_head(a, deployment: str, config: str, rep: int) -> dict:
    return {"deployment": deployment, "config": config, "rep": rep, "ranks": a.ranks, "device": a.device}


def rotated(configs: list[str], rep: int) -> list[str]:
    """The order rep `rep` runs the configurations in: rotated by rep, so none always goes first."""
    k = rep % len(configs)
    return configs[k:] + configs[:k]


def server_tag(deployment: str, config: str, suffix: str) -> str:
    return f"{deployment}-{config.replace(':', '_')}-{suffix}"


def timed_run(a, workdir: str, model: str, vocab: int, deployment: str, config: str, rep: int) -> dict:
    """One run on a server of its own: start, warm up, measure, stop."""
    res = run_head(a, deployment, config, rep)
    t_start = time.monotonic()
    s = start_server(a, workdir, model, deployment, config, server_tag(deployment, config, f"r{rep}"))
    res["start_s"] = time.monotonic() - t_start
    try:
        res.update(measure(a, s, model, vocab, config, a.warmup))
    finally:
        s.stop()
    return res


def resident_runs(a, workdir: str, model: str, vocab: int, deployment: str, configs: list[str]):
    """Every configuration's server started once, side by side, then the reps interleaved on
    them (rep r in an order rotated by r), one server under load at a time: a start-up per
    configuration instead of per run, so reps fit where start-ups cost minutes (engines sharing
    a GPU). An idle server runs no passes (vLLM's data-parallel engines pause together when no
    request is in flight), so the others take nothing from the run measured; each server warms
    up before its first run only. Yields each run's row."""
    import concurrent.futures as cf

    def start(config: str):
        t0 = time.monotonic()
        return start_server(a, workdir, model, deployment, config, server_tag(deployment, config, "resident")), \
            time.monotonic() - t0

    servers: dict[str, tuple] = {}
    a.side_by_side = len(configs) > 1  # the servers share the GPUs: KV cache sized in bytes
    try:
        with cf.ThreadPoolExecutor(len(configs)) as pool:
            futures = {c: pool.submit(start, c) for c in configs}
            errors = []
            for c, f in futures.items():
                try:
                    servers[c] = f.result()
                except Exception as exc:  # the others still get stopped below
                    errors.append(f"{c}: {exc}")
            if errors:
                raise RuntimeError("resident servers did not start: " + "; ".join(errors))
        for rep in range(a.reps):
            for config in rotated(configs, rep):
                s, start_s = servers[config]
                res = run_head(a, deployment, config, rep)
                res.update(start_s=start_s, resident=True)
                res.update(measure(a, s, model, vocab, config, a.warmup if rep == 0 else 0.0))
                yield res
    finally:
        for s, _ in servers.values():
            s.stop()


def measure(a, s, model: str, vocab: int, config: str, warmup: float) -> dict:
    """Warm-up load, then the measured load on a serving deployment: the run's figures. Counters
    (cycles, layers moved) count from the start of this run's load, warm-up included."""
    kind = "vllm-eplb" if config.startswith("vllm-eplb") else ("vllm-async" if config.startswith("vllm-async") else "vllm")
    before = s.metrics(prefix="vllm:") if kind == "vllm-eplb" else {}
    watch = LogWatch(s.log_path, "vllm-eplb" if kind == "vllm-eplb" else "vllm")
    try:
        if warmup > 0:
            Load(s.port, model, a, vocab, warmup).run()  # compile caches, first cycles of the window
        balancedness, stop = [], threading.Event()

        def scrape():
            while not stop.wait(0.5):
                try:
                    v = metric(s.metrics(), "vllm:eplb_balancedness", rank=0, kind="observed")
                    if v is not None:
                        balancedness.append(v)
                except OSError:
                    pass

        scraper = threading.Thread(target=scrape, daemon=True)
        if kind == "vllm-eplb":
            scraper.start()
        load = Load(s.port, model, a, vocab, a.seconds)
        t0, t1 = load.run()
        stop.set()
        final = s.metrics(prefix="vllm:") if kind == "vllm-eplb" else {}
    finally:
        events = watch.stop()

    def grown(name: str, **labels) -> float:
        return (metric(final, name, **labels) or 0.0) - (metric(before, name, **labels) or 0.0)

    ok = [r for r in load.requests if not r.error and r.first >= t0]
    itls = [(t, t - prev) for r in ok for prev, t in zip(r.times, r.times[1:])]
    steady_med = statistics.median([d for _, d in itls]) if itls else 0.0
    wins = [(b, e) for b, e in windows_of([ev for ev in events if ev[1] >= t0], kind, steady_med, a.layers) if b <= t1]
    inside = [d for t, d in itls if any(b <= t <= e + 2 * steady_med for b, e in wins)]
    steady = [d for t, d in itls if not any(b <= t <= e + 2 * steady_med for b, e in wins)]
    res = dict(
        tokens_per_s=sum(r.tokens for r in ok) / max(1e-9, t1 - t0),
        itl_p50_ms=pct([d for _, d in itls], 50) * 1e3,
        itl_p99_ms=pct([d for _, d in itls], 99) * 1e3,
        ttft_p99_ms=pct([r.first - r.start for r in ok], 99) * 1e3,
        rebalances=len(wins),
        itl_p99_rebalance_ms=pct(inside, 99) * 1e3,
        itl_p99_steady_ms=pct(steady, 99) * 1e3,
        failed=sum(1 for r in load.requests if r.error),
        requests=len(load.requests),
        balancedness=statistics.median(balancedness) if balancedness else float("nan"),
        cycles=grown("vllm:eplb_cycles_total", rank=0, outcome="completed") if kind == "vllm-eplb" else len(wins),
        layers_moved=grown("vllm:eplb_committed_layers_total", rank=0) if kind == "vllm-eplb" else len(wins) * a.layers,
    )
    errors = [r.error for r in load.requests if r.error][:3]
    if errors:
        res["errors"] = errors
    return res


# --------------------------------------------------------------------------- correctness


def correctness(a, workdir: str, model: str, vocab: int, deployment: str, config: str, dtype: str, quant: str | None,
                kind: str = "") -> dict:
    """Outputs against EPLB off (same dtype and quantization) while the balancer cycles fast,
    and every slot's bytes checked after every commit (verify_slots). Outputs are measured as
    benchmarks/serving/probes.py says: greedy and teacher-forced, within the noise a placement
    change alone makes (measured here: the balancer's start-up placement against EPLB off) and
    EPLB off's own repeats under the same traffic. The exact check is verify_slots: bytes."""
    prompts = probe_prompts(a, vocab)
    tag = f"check-{deployment}-{kind or dtype}-{quant or 'none'}"
    s = start_server(a, workdir, model, deployment, "off", tag + "-off", dtype=dtype, quant=quant)
    try:
        ref = reference_probes(s, model, prompts, a.check_tokens)
        traffic = threading.Thread(target=Load(s.port, model, a, vocab, a.check_seconds / 2).run, daemon=True)
        traffic.start()
        repeats = probe_rounds(s, model, prompts, a.check_tokens, ref, a.check_seconds / 2)
        traffic.join()
    finally:
        s.stop()
    res = {"deployment": deployment, "config": config, "dtype": dtype, "quant": quant or ("fp8 checkpoint" if "fp8" in kind else "none"),
           "kind": "correctness", "check": kind or dtype}
    s = start_server(a, workdir, model, deployment, config, tag + "-eplb", verify=True, dtype=dtype, quant=quant,
                     window=a.check_window, interval=2 * a.check_window)
    try:
        static = drift(forced_logprobs(s, model, ref["forced"]), ref["logprobs"])  # nothing moved yet
        traffic = threading.Thread(target=Load(s.port, model, a, vocab, a.check_seconds).run, daemon=True)
        traffic.start()  # other traffic, so the probes' passes include rebalances
        probes = probe_rounds(s, model, prompts, a.check_tokens, ref, a.check_seconds)
        traffic.join()
        final = s.metrics()
    finally:
        s.stop()
    ranks = range(a.ranks)
    ok, bound = within_noise(probes, static, repeats)
    res.update(
        outputs_identical=probes["identical"],
        drift=probes["drift"],
        static_placement_drift=static,
        off_repeats=repeats,
        bound=bound,
        within_noise=ok,
        cycles=metric(final, "vllm:eplb_cycles_total", rank=0, outcome="completed") or 0,
        slot_checks_ok=sum(metric(final, "vllm:eplb_slot_checks_total", rank=r, result="ok") or 0 for r in ranks),
        slot_checks_mismatch=sum(metric(final, "vllm:eplb_slot_checks_total", rank=r, result="mismatch") or 0 for r in ranks),
    )
    return res


# --------------------------------------------------------------------------- one GPU


def swap_slots(worker, a: int, b: int, with_scales: bool) -> dict:
    """In a live engine: exchange slots a and b of every MoE layer (every tensor
    get_expert_weights() lists, or only the weights when with_scales is False) and the router's
    columns a and b, in place (the memory CUDA graphs captured)."""
    import torch

    def raw(t):  # CUDA has no index kernels for fp8: move its bytes
        return t.view(torch.uint8) if t.element_size() == 1 else t

    model = worker.model_runner.model
    layers = list(getattr(model, "moe_layers", []))
    first_dtypes = None
    with torch.no_grad():
        for layer in layers:
            experts = list(layer.get_expert_weights())
            for w in experts:
                if with_scales or w.dtype == experts[0].dtype:  # without scales: the weights' dtype only
                    w = raw(w)
                    w[[a, b]] = w[[b, a]].clone()
            gate = raw(layer.gate.weight)
            dim = 0 if gate.shape[0] == experts[0].shape[0] else 1  # fp8 linears store (in, out)
            pair = torch.tensor([a, b], device=gate.device)
            gate.index_copy_(dim, pair, gate.index_select(dim, pair.flip(0)).clone())
            first_dtypes = first_dtypes or [f"{tuple(w.shape)} {w.dtype}" for w in experts]
    torch.cuda.synchronize()
    return {"layers": len(layers), "expert_tensors": first_dtypes}


def single_gpu_checks(a, workdir: str, model: str, vocab: int) -> list[dict]:
    out = []
    # one EP rank with --eplb-config: refused in one line by vLLM's own CLI
    path = os.path.join(workdir, "tp1.eplb.json")
    json.dump({"window_size": 10, "step_interval": 20}, open(path, "w"))
    r = subprocess.run([sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", model, "-tp", "1", "--enable-expert-parallel",
                        "--eplb-config", path], capture_output=True, text=True, timeout=300)
    last = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ""
    out.append({"kind": "tp1_refused", "rc": r.returncode, "last_line": last, "traceback": "Traceback" in r.stderr,
                "ok": r.returncode == 2 and "nothing to balance" in last and "Traceback" not in r.stderr})
    # plugin overhead and slot swaps, in-process engines (LLM API), interleaved
    script = os.path.join(workdir, "llm_probe.py")
    with open(script, "w") as fh:  # swap_slots by value: the engine's workers unpickle it from __main__
        fh.write(inspect.getsource(swap_slots) + LLM_PROBE)
    modes = a.single_modes.split(",")
    for rep in range(a.reps if "timing" in modes else 0):
        for plugin in (("absent", "loaded") if rep % 2 == 0 else ("loaded", "absent")):
            out.append(_llm_probe(script, model, "timing", plugin, rep))
    for mode in [m for m in ("float32", "bfloat16", "fp8") if m in modes]:
        out.append(_llm_probe(script, model, mode, "loaded", 0))
    return out


def _llm_probe(script: str, model: str, mode: str, plugin: str, rep: int) -> dict:
    env = {**os.environ, "VLLM_ALLOW_INSECURE_SERIALIZATION": "1", "VLLM_USE_FLASHINFER_SAMPLER": "0"}
    if plugin == "absent":
        env["EPLB_PLUGIN_DISABLE"] = "1"
    if mode == "float32":
        env["VLLM_ATTENTION_BACKEND"] = "TRITON_ATTN"
    r = subprocess.run([sys.executable, script, model, mode], capture_output=True, text=True, timeout=400, env=env)
    line = next((x for x in reversed(r.stdout.splitlines()) if x.startswith("RESULT ")), None)
    res = json.loads(line[7:]) if line else {"error": (r.stderr or r.stdout)[-1500:]}
    return {"kind": f"llm_{mode}", "plugin": plugin, "rep": rep, **res}


LLM_PROBE = r'''
import json, sys, time
from vllm import LLM, SamplingParams
model, mode = sys.argv[1], sys.argv[2]
kw = dict(model=model, max_model_len=512, gpu_memory_utilization=0.5, seed=0, enable_prefix_caching=False)
if mode == "fp8":
    kw["quantization"] = "fp8"
elif mode in ("float32", "bfloat16"):
    kw["dtype"] = mode
llm = LLM(**kw)
prompts = [f"the expert model of layer {i} and rank {i % 7} with load" for i in range(128)]
sp = SamplingParams(temperature=0.0, max_tokens=128, ignore_eos=True)
gen = lambda: [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]
ref = gen()
res = {}
if mode == "timing":
    rates = []
    for _ in range(5):
        t0 = time.perf_counter(); n = sum(map(len, gen())); rates.append(n / (time.perf_counter() - t0))
    res["tokens_per_s"] = sorted(rates)[2]
else:
    same = lambda out: sum(x == y for x, y in zip(out, ref))
    # Teacher-forced: every prompt token's log-probability, so one flipped argmax does not
    # change what the rest is measured on (greedy outputs of a tiny random model flip on
    # run-to-run noise where its kernels are not deterministic, as vLLM's fp8 MoE is).
    lp_sp = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    def logprobs():
        outs = llm.generate(prompts, lp_sp, use_tqdm=False)
        return [[d[t].logprob for t, d in zip(o.prompt_token_ids[1:], o.prompt_logprobs[1:])] for o in outs]
    lp_ref = logprobs()
    drift = lambda lp: max(abs(a - b) for x, y in zip(lp, lp_ref) for a, b in zip(x, y))
    res["repeat_identical"] = same(gen())  # the same engine, nothing swapped: how reproducible it is
    res["repeat_drift"] = drift(logprobs())
    res["swap"] = llm.collective_rpc(swap_slots, args=(0, 1, True))[0]
    res["after_swap_identical"] = same(gen())
    res["after_swap_drift"] = drift(logprobs())
    llm.collective_rpc(swap_slots, args=(0, 1, True))
    res["after_swap_back_identical"] = same(gen())
    res["after_swap_back_drift"] = drift(logprobs())
    llm.collective_rpc(swap_slots, args=(0, 1, False))
    res["weights_without_scales_identical"] = same(gen())
    res["weights_without_scales_drift"] = drift(logprobs())
    res["prompts"] = len(prompts)
print("RESULT " + json.dumps(res))
'''


# --------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    """The options, with what the machine decides filled in: gpus, ranks, redundant, serve_dtype."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, short runs: the CPU check of the whole path")
    ap.add_argument("--ranks", type=int, default=0, help="expert-parallel ranks (default: every GPU, 2 on one GPU or CPU)")
    ap.add_argument("--deployments", default=None,
                    help=f"of {','.join(DEPLOYMENTS)} (default: tp,dp; on one GPU: hosts)")
    ap.add_argument("--kv-cache-gib", type=float, default=4.0, help="KV cache per engine where engines share a GPU")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--resident", action="store_true",
                    help="start every configuration's server once, side by side, and interleave the reps on them "
                         "(one under load at a time): a start-up per configuration, not per run")
    ap.add_argument("--seconds", type=float, default=60.0, help="measured load per run")
    ap.add_argument("--warmup", type=float, default=20.0)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--phases", type=int, default=6, help="topic changes over a run")
    ap.add_argument("--window", type=int, default=500)
    ap.add_argument("--interval", type=int, default=1000)
    ap.add_argument("--redundant", type=int, default=0, help="redundant experts (default: the ranks)")
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--moe-intermediate", type=int, default=512)
    ap.add_argument("--groups", type=int, default=3, help="topics of the vocabulary")
    ap.add_argument("--hot", type=int, default=4, help="hot experts per topic and layer")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--dtype", default="bfloat16", help="checkpoint dtype")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.8)
    ap.add_argument("--start-timeout", type=float, default=900)
    ap.add_argument("--correctness", default="float32,fp8-checkpoint",
                    help="checks after the timed runs, of float32, bfloat16, fp8 (online --quantization fp8), "
                         "fp8-checkpoint (the model quantized ahead of time, 128x128 block scales) ('' for none)")
    ap.add_argument("--check-seconds", type=float, default=60.0)
    ap.add_argument("--check-window", type=int, default=40)
    ap.add_argument("--check-tokens", type=int, default=48)
    ap.add_argument("--single-gpu", action="store_true", help="the one-GPU checks (default on one GPU without hosts)")
    ap.add_argument("--single-modes", default="timing,float32,bfloat16,fp8",
                    help="which one-GPU checks run: timing (plugin cost), and slot swaps in float32, bfloat16, fp8")
    ap.add_argument("--model-dir", default=os.path.join(tempfile.gettempdir(), "eplb-serve-model"))
    ap.add_argument("--workdir", default=None, help="server logs and configs (default: a temporary folder)")
    ap.add_argument("--out", default=None, help="append each run's figures as a JSON line")
    ap.add_argument("--report", default=None, help="print the table from a --out file and exit")
    a = ap.parse_args(argv)
    if a.smoke:
        a.layers, a.experts, a.top_k, a.hidden, a.moe_intermediate, a.vocab = 4, 16, 2, 128, 64, 512
        a.groups, a.hot, a.clients = 2, 2, 4
        a.prompt_len, a.max_tokens, a.window, a.interval, a.check_window = 16, 16, 16, 32, 16
        a.check_tokens, a.dtype = 12, "float32"
        for key, short in (("reps", 1), ("seconds", 20.0), ("warmup", 5.0), ("check_seconds", 25.0)):
            if getattr(a, key) == ap.get_default(key):  # short runs, unless given
                setattr(a, key, short)
    a.gpus = 0
    if a.device == "cuda" and not a.report:
        import torch

        a.gpus = torch.cuda.device_count()
    if a.deployments is None:
        a.deployments = "hosts" if a.device == "cuda" and a.gpus == 1 else "tp,dp"
    unknown = set(a.deployments.split(",")) - set(DEPLOYMENTS)
    if unknown:
        ap.error(f"--deployments: unknown {', '.join(sorted(unknown))}; choose from {', '.join(DEPLOYMENTS)}")
    a.ranks = a.ranks or (a.gpus if a.device == "cuda" and a.gpus > 1 else 2)
    a.redundant = a.redundant or a.ranks
    a.serve_dtype = "float32" if a.device == "cpu" else "bfloat16"
    return a


def correctness_models(a, model: str) -> dict[str, tuple[str, str, str | None]]:
    """{check: (model dir, dtype, --quantization)} of each --correctness kind."""
    from benchmarks.serving.model import quantize_fp8

    out = {}
    for kind in [k for k in a.correctness.split(",") if k]:
        if a.device == "cpu" and kind.startswith("fp8"):
            print(f"correctness {kind}: vLLM's CPU fp8 MoE kernel needs AMX; skipped on CPU")
        elif kind in ("float32", "bfloat16"):
            out[kind] = (model, kind, None)
        elif kind == "fp8":
            out[kind] = (model, a.serve_dtype, "fp8")
        elif kind == "fp8-checkpoint":
            out[kind] = (quantize_fp8(model, model.rstrip("/") + "-fp8"), a.serve_dtype, None)
        else:
            raise SystemExit(f"--correctness: unknown check {kind!r}")
    return out


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.report:
        print(report([json.loads(x) for x in open(a.report)]))
        return 0
    workdir = a.workdir or tempfile.mkdtemp(prefix="eplb-serve-")
    os.makedirs(workdir, exist_ok=True)
    model = build_model(a.model_dir, a)
    vocab = json.load(open(os.path.join(model, "config.json")))["vocab_size"]
    rows: list[dict] = []

    def keep(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)
        if a.out:
            with open(a.out, "a") as fh:
                fh.write(json.dumps(row) + "\n")

    configs = [c for c in a.configs.split(",") if c]
    if a.device == "cpu":  # vLLM's own EPLB runs on CUDA/ROCm/XPU only
        skipped = [c for c in configs if c.startswith(("vllm-sync", "vllm-async"))]
        configs = [c for c in configs if c not in skipped]
        if skipped:
            print(f"on CPU vLLM's own EPLB does not run: {', '.join(skipped)} skipped")
    deployments = a.deployments.split(",")
    if a.single_gpu or a.device == "cuda" and a.gpus < 2 and "hosts" not in deployments:
        print(f"{a.gpus} GPU(s): vLLM refuses EPLB on one expert-parallel rank; running the one-GPU checks")
        for row in single_gpu_checks(a, workdir, model, vocab):
            keep(row)
    else:
        if a.resident:
            for dep in deployments:
                for row in resident_runs(a, workdir, model, vocab, dep, configs):
                    keep(row)
        else:
            for rep in range(a.reps):
                for dep in deployments:
                    for cfg in rotated(configs, rep):
                        keep(timed_run(a, workdir, model, vocab, dep, cfg, rep))
        eplb = next((c for c in configs if c.startswith("vllm-eplb")), None)
        for kind, (checked, dtype, quant) in (correctness_models(a, model) if eplb else {}).items():
            keep(correctness(a, workdir, checked, vocab, deployments[0], eplb, dtype, quant, kind))
    print(report(rows))
    bad = [r for r in rows if r.get("failed") or r.get("slot_checks_mismatch") or r.get("within_noise") is False
           or (r.get("kind") == "tp1_refused" and not r["ok"])]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
