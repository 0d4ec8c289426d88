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
+ EP, N = the GPUs), each run `--reps` times, interleaved (rep r in an order rotated by r):

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

On one GPU vLLM refuses EPLB (it needs TP, DP or PCP > 1) and so does vllm-eplb; the command then
runs `--single-gpu` checks instead: the plugin with EPLB off against the plugin absent (tokens/s,
interleaved), one expert-parallel rank refused in one line by vLLM's own CLI, and a slot swap in a
live engine (CUDA graphs and torch.compile on): two experts' slots exchanged in every layer, every
tensor get_expert_weights() lists (weights and scales) and the router's two columns, must leave
greedy outputs unchanged, while exchanging weights without their scales must change them.
"""

from __future__ import annotations

import argparse
import http.client
import inspect
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from vllm_eplb.integration.server import Server, metric, parse_metrics, vllm_bin  # noqa: E402

CONFIGS = ("off", "vllm-sync", "vllm-async", "vllm-eplb")
MARKERS = {  # (start, end) of a rebalance in the server log, rank 0
    "vllm-eplb": (re.compile(r"EPLB rank 0 pass \d+: syncing -> transferring"), re.compile(r"EPLB rank 0 pass \d+: transferring -> idle")),
    "vllm": (re.compile(r"Rearranging experts (sync|\(async)"), re.compile(r"Rearranged experts\s+in")),
}


# --------------------------------------------------------------------------- the model


def build_model(out_dir: str, a) -> str:
    """A Qwen3-MoE with topic-skewed routers (see the module docstring); reused if present."""
    stamp = os.path.join(out_dir, "built.json")
    spec = {k: getattr(a, k) for k in ("layers", "experts", "top_k", "hidden", "moe_intermediate", "groups", "hot", "seed", "dtype")}
    if os.path.exists(stamp) and json.load(open(stamp)) == spec:
        return out_dir
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from vllm_eplb.integration.tiny_model import build_tokenizer

    os.makedirs(out_dir, exist_ok=True)
    build_tokenizer(out_dir, a.vocab)
    vocab = max(a.vocab, len(json.load(open(os.path.join(out_dir, "tokenizer_config.json"))).get("added_tokens_decoder", {})))
    heads = max(4, a.hidden // 128)
    cfg = Qwen3MoeConfig(
        vocab_size=vocab, hidden_size=a.hidden, intermediate_size=a.hidden * 2, moe_intermediate_size=a.moe_intermediate,
        num_hidden_layers=a.layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 4),
        head_dim=a.hidden // heads, num_experts=a.experts, num_local_experts=a.experts, num_experts_per_tok=a.top_k,
        norm_topk_prob=True, decoder_sparse_step=1, max_position_embeddings=4096, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=3, initializer_range=0.3 if a.hidden <= 256 else 0.05,
    )
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(a.seed)
    with torch.device(dev):
        model = Qwen3MoeForCausalLM(cfg).to(torch.float32)
    skew_topics(model, a.groups, a.hot, vocab, a.seed)
    model.config.architectures = ["Qwen3MoeForCausalLM"]
    model.to(getattr(torch, a.dtype)).save_pretrained(out_dir, safe_serialization=True)
    conf = json.load(open(os.path.join(out_dir, "config.json")))
    conf.update(num_experts=a.experts, num_local_experts=a.experts)  # vLLM reads num_experts
    json.dump(conf, open(os.path.join(out_dir, "config.json"), "w"), indent=2)
    json.dump(spec, open(stamp, "w"))
    return out_dir


def topic_range(vocab: int, groups: int, g: int) -> tuple[int, int]:
    """Token ids of topic g: the vocabulary past the 4 special tokens, in equal parts."""
    size = (vocab - 4) // groups
    return 4 + g * size, 4 + (g + 1) * size


def skew_topics(model, groups: int, hot: int, vocab: int, seed: int, strength: float = 3.0) -> None:
    """Topic g's tokens get direction v_g in their embeddings; the LM head rows of its tokens
    lean towards v_g (generations stay in the topic); per layer, the router rows of `hot`
    experts of each topic (different experts per topic) are pulled towards the mean input
    direction of that topic's tokens at that layer, scaled as the router's logits are."""
    import torch

    g = torch.Generator(device="cpu").manual_seed(seed + 1)
    emb, head = model.model.embed_tokens.weight, model.lm_head.weight
    dirs = torch.linalg.qr(torch.randn(emb.shape[1], groups, generator=g))[0].T.to(emb.device)  # orthonormal
    with torch.no_grad():
        scale = emb.norm(dim=1).mean()
        for t in range(groups):
            lo, hi = topic_range(vocab, groups, t)
            emb[lo:hi] += dirs[t] * scale
            head[lo:hi] += dirs[t] * head.norm(dim=1).mean()
    experts = model.config.num_experts
    perm = torch.randperm(experts, generator=g).tolist()
    calib = {t: torch.randint(*topic_range(vocab, groups, t), (8, 32), generator=g).to(emb.device) for t in range(groups)}
    for layer in model.model.layers:
        seen: dict[int, list] = {}
        for t in range(groups):
            rows = []
            h = layer.mlp.register_forward_hook(lambda mod, args, out: rows.append(args[0].detach().reshape(-1, args[0].shape[-1])))
            with torch.no_grad():
                model(calib[t])
            h.remove()
            seen[t] = torch.cat(rows)
        with torch.no_grad():
            gate = layer.mlp.gate.weight
            for t in range(groups):
                x = seen[t]
                u = x.mean(dim=0)
                u = u / u.norm()
                reach = (x @ u).mean().abs().clamp(min=1e-3)
                logit_scale = (x @ gate.T).std()
                for i in range(hot):
                    e = perm[(t * hot + i) % experts]
                    gate[e] += u * (strength * logit_scale / reach) / (i + 1)


# --------------------------------------------------------------------------- load


@dataclass
class Request:
    start: float
    first: float = 0.0
    times: list[float] = field(default_factory=list)  # arrival of each streamed chunk
    tokens: int = 0  # a chunk can carry several tokens (the server batches what it has)
    error: str = ""


def stream_completion(port: int, model: str, prompt: list[int], max_tokens: int, timeout: float = 300) -> Request:
    """One streamed completion; every chunk's arrival time on the client. Inter-token latency
    is counted per chunk, as vLLM's own serving benchmark does."""
    req = Request(time.monotonic())
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                       "stream": True, "return_token_ids": True}).encode()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        r = conn.getresponse()
        if r.status != 200:
            req.error = f"HTTP {r.status}: {r.read()[:200]!r}"
            return req
        for line in r:
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            t = time.monotonic()
            chunk = json.loads(line[6:])
            choice = (chunk.get("choices") or [{}])[0]
            n = len(choice.get("token_ids") or []) or (1 if choice.get("text") else 0)
            if n:
                req.times.append(t)
                req.tokens += n
        conn.close()
        req.first = req.times[0] if req.times else 0.0
        if req.tokens < max_tokens:
            req.error = f"{req.tokens} of {max_tokens} tokens"
    except Exception as exc:  # counted as a failed request
        req.error = f"{type(exc).__name__}: {exc}"
    return req


class Load:
    """`clients` closed-loop clients; prompts from topic `phase(t)` of the run."""

    def __init__(self, port: int, model: str, a, vocab: int, seconds: float):
        self.port, self.model, self.a, self.vocab, self.seconds = port, model, a, vocab, seconds
        self.requests: list[Request] = []
        self.lock = threading.Lock()

    def _client(self, i: int, t0: float) -> None:
        rng = random.Random(self.a.seed * 1000 + i)
        while (now := time.monotonic()) < t0 + self.seconds:
            phase = int((now - t0) / self.seconds * self.a.phases) % self.a.groups
            lo, hi = topic_range(self.vocab, self.a.groups, phase)
            prompt = [rng.randrange(lo, hi) for _ in range(rng.randint(self.a.prompt_len // 2, self.a.prompt_len))]
            r = stream_completion(self.port, self.model, prompt, self.a.max_tokens)
            with self.lock:
                self.requests.append(r)

    def run(self) -> tuple[float, float]:
        t0 = time.monotonic()
        threads = [threading.Thread(target=self._client, args=(i, t0), daemon=True) for i in range(self.a.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return t0, time.monotonic()


class LogWatch:
    """Timestamps rebalance markers as they appear in the server log (polled every 10 ms)."""

    def __init__(self, path: str, kind: str):
        self.path, (self.start_re, self.end_re) = path, MARKERS[kind]
        self.events: list[tuple[str, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        pos = 0
        while not self._stop.is_set():
            try:
                with open(self.path) as fh:
                    fh.seek(pos)
                    chunk = fh.read()
                    pos = fh.tell()
            except OSError:
                chunk = ""
            now = time.monotonic()
            for line in chunk.splitlines():
                if self.start_re.search(line):
                    self.events.append(("start", now))
                elif self.end_re.search(line):
                    self.events.append(("end", now))
            time.sleep(0.01)

    def stop(self) -> list[tuple[str, float]]:
        self._stop.set()
        self._thread.join(2)
        return self.events


# --------------------------------------------------------------------------- one run


def server_argv(a, model: str, port: int, deployment: str, config: str, eplb_path: str | None, dtype: str, quant: str | None) -> list[str]:
    n = a.ranks
    cmd = [vllm_bin(), "serve"] if a.device == "cpu" else [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve"]
    cmd += [model, "--port", str(port), "--dtype", dtype, "--max-model-len", str(a.max_model_len), "--seed", "0",
            "--no-enable-prefix-caching", "--enable-expert-parallel"]
    cmd += ["-tp", str(n)] if deployment == "tp" else ["-tp", "1", "--data-parallel-size", str(n)]
    if a.device == "cpu":
        cmd += ["--enforce-eager"]
    else:
        cmd += ["--gpu-memory-utilization", str(a.gpu_memory_utilization)]
    if quant:
        cmd += ["--quantization", quant]
    if config.startswith("vllm-sync") or config.startswith("vllm-async"):
        up = {"window_size": a.window, "step_interval": a.interval, "num_redundant_experts": a.redundant,
              "use_async": config.startswith("vllm-async")}
        cmd += ["--enable-eplb", "--eplb-config", json.dumps(up)]
    elif eplb_path:
        cmd += ["--eplb-config", eplb_path]
    return cmd


def eplb_json(a, config: str, path: str, verify: bool, window: int | None = None, interval: int | None = None) -> str | None:
    if not config.startswith("vllm-eplb"):
        return None
    cfg = {"window_size": window or a.window, "step_interval": interval or a.interval, "num_redundant_experts": a.redundant,
           "verify_slots": verify}
    if ":" in config:
        cfg["transfer_backend"] = config.split(":", 1)[1]
    json.dump(cfg, open(path, "w"))
    return path


def start_server(a, workdir: str, model: str, deployment: str, config: str, tag: str, verify=False, dtype=None, quant=None,
                 window=None, interval=None) -> Server:
    port = 8300 + random.randrange(600)
    path = eplb_json(a, config, os.path.join(workdir, f"{tag}.eplb.json"), verify, window, interval)
    argv = server_argv(a, model, port, deployment, config, path, dtype or a.serve_dtype, quant)
    env = {"VLLM_USE_FLASHINFER_SAMPLER": "0"}
    if not config.startswith("vllm-eplb") and a.device == "cuda":
        # EPLB off and vLLM's own EPLB: vLLM as shipped. On CPU the plugin stays loaded without
        # --eplb-config: vLLM's CPU expert parallelism crashes without its CPU kernel fixes.
        env["EPLB_PLUGIN_DISABLE"] = "1"
    if dtype == "float32" and a.device == "cuda":
        env["VLLM_ATTENTION_BACKEND"] = "TRITON_ATTN"  # FlashAttention serves no float32
    s = Server(model, port, log_path=os.path.join(workdir, f"{tag}.log"), argv=argv, env=env)
    return s.start(timeout=a.start_timeout)


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q / 100 * len(xs)))]


def windows_of(events, kind: str, steady_itl: float, layers: int) -> list[tuple[float, float]]:
    """(start, end) of each rebalance; vLLM's async worker logs no end: num_layers + 8 passes."""
    starts = [t for what, t in events if what == "start"]
    if kind == "vllm-async":
        return [(t, t + (layers + 8) * steady_itl) for t in starts]
    ends = [t for what, t in events if what == "end"]
    return [(b, next((e for e in ends if e >= b), b)) for b in starts]


def timed_run(a, workdir: str, model: str, vocab: int, deployment: str, config: str, rep: int) -> dict:
    tag = f"{deployment}-{config.replace(':', '_')}-r{rep}"
    res = {"deployment": deployment, "config": config, "rep": rep, "ranks": a.ranks, "device": a.device}
    t_start = time.monotonic()
    s = start_server(a, workdir, model, deployment, config, tag)
    res["start_s"] = time.monotonic() - t_start
    kind = "vllm-eplb" if config.startswith("vllm-eplb") else ("vllm-async" if config.startswith("vllm-async") else "vllm")
    watch = LogWatch(s.log_path, "vllm-eplb" if kind == "vllm-eplb" else "vllm")
    try:
        Load(s.port, model, a, vocab, a.warmup).run()  # compile caches, first cycles of the window
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
        final = s.metrics(prefix="vllm:")
    finally:
        events = watch.stop()
        s.stop()
    ok = [r for r in load.requests if not r.error and r.first >= t0]
    itls = [(t, t - prev) for r in ok for prev, t in zip(r.times, r.times[1:])]
    steady_med = statistics.median([d for _, d in itls]) if itls else 0.0
    wins = [(b, e) for b, e in windows_of([ev for ev in events if ev[1] >= t0], kind, steady_med, a.layers) if b <= t1]
    inside = [d for t, d in itls if any(b <= t <= e + 2 * steady_med for b, e in wins)]
    steady = [d for t, d in itls if not any(b <= t <= e + 2 * steady_med for b, e in wins)]
    res.update(
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
        cycles=metric(final, "vllm:eplb_cycles_total", rank=0, outcome="completed") if kind == "vllm-eplb" else len(wins),
        layers_moved=metric(final, "vllm:eplb_committed_layers_total", rank=0) if kind == "vllm-eplb" else len(wins) * a.layers,
    )
    errors = [r.error for r in load.requests if r.error][:3]
    if errors:
        res["errors"] = errors
    return res


# --------------------------------------------------------------------------- correctness


PROBES = 8


def probe_prompts(a, vocab: int) -> list[list[int]]:
    rng = random.Random(7)
    out = []
    for i in range(PROBES):
        lo, hi = topic_range(vocab, a.groups, i % a.groups)
        out.append([rng.randrange(lo, hi) for _ in range(12)])
    return out


def greedy(s: Server, model: str, prompts: list[list[int]], tokens: int) -> list[list[int]]:
    from vllm_eplb.integration.server import http_post

    body = {"model": model, "prompt": prompts, "max_tokens": tokens, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
    choices = sorted(http_post(s.url + "/v1/completions", body)["choices"], key=lambda c: c["index"])
    return [c.get("token_ids") or c["text"] for c in choices]


def correctness(a, workdir: str, model: str, vocab: int, deployment: str, config: str, dtype: str, quant: str | None) -> dict:
    """Greedy outputs against EPLB off (same dtype and quantization) while the balancer cycles
    fast, and every slot's bytes checked after every commit.

    The bar for outputs is EPLB off's own reproducibility, measured first: where its repeated
    probes are identical (CPU float32), every probe with the balancer must be identical to them;
    where they are not (on one H200, 2026-12-01, float32 under TRITON_ATTN repeated 108 of 128
    greedy sequences and bf16 127-128 of 128), the balancer's share of identical probes must be
    within one probe of EPLB off's own. The exact check is verify_slots: bytes, not numerics."""
    prompts = probe_prompts(a, vocab)
    tag = f"check-{deployment}-{dtype}-{quant or 'none'}"
    s = start_server(a, workdir, model, deployment, "off", tag + "-off", dtype=dtype, quant=quant)
    try:
        ref = greedy(s, model, prompts, a.check_tokens)
        repeats = [greedy(s, model, prompts, a.check_tokens) for _ in range(2)]
    finally:
        s.stop()
    off_same = sum(x == y for out in repeats for x, y in zip(out, ref)) / (2 * len(prompts))
    res = {"deployment": deployment, "config": config, "dtype": dtype, "quant": quant or "none", "kind": "correctness"}
    s = start_server(a, workdir, model, deployment, config, tag + "-eplb", verify=True, dtype=dtype, quant=quant,
                     window=a.check_window, interval=2 * a.check_window)
    try:
        load = threading.Thread(target=Load(s.port, model, a, vocab, a.check_seconds).run, daemon=True)
        load.start()  # other traffic, so the probes' passes include rebalances
        rounds, same = 0, 0
        t0 = time.monotonic()
        # for check_seconds and 3 rounds at least (a slow machine), 4 x check_seconds at most
        while (time.monotonic() < t0 + a.check_seconds or rounds < 3) and time.monotonic() < t0 + 4 * a.check_seconds:
            out = greedy(s, model, prompts, a.check_tokens)
            rounds += 1
            same += sum(x == y for x, y in zip(out, ref))
        load.join()
        final = s.metrics()
    finally:
        s.stop()
    ranks = range(a.ranks)
    share = same / (rounds * len(prompts))
    res.update(
        probe_rounds=rounds,
        outputs_identical=f"{same}/{rounds * len(prompts)}",
        off_repeat_identical=off_same,
        identical=share == 1.0 if off_same == 1.0 else share >= off_same - 1 / len(prompts),
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


# --------------------------------------------------------------------------- the table


def _mr(xs: list[float], fmt: str = "{:.2f}") -> str:
    xs = [x for x in xs if x == x]
    if not xs:
        return "n/a"
    m = statistics.median(xs)
    return fmt.format(m) + (f" [{fmt.format(min(xs))}-{fmt.format(max(xs))}]" if len(xs) > 1 else "")


def report(rows: list[dict]) -> str:
    lines = []
    timed = [r for r in rows if "tokens_per_s" in r and "deployment" in r]
    for dep in sorted({r["deployment"] for r in timed}):
        runs = [r for r in timed if r["deployment"] == dep]
        n = runs[0]["ranks"]
        lines += [f"\n{dep.upper()}={n} + EP ({runs[0]['device']}), median [min-max] over reps; ratios against that rep's 'off'",
                  "| config | tok/s | tok/s vs off | ITL p50 ms | ITL p99 ms | TTFT p99 ms | ITL p99 in rebalances / steady | "
                  "rebalances | balancedness | cycles | layers moved | failed |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        off = {r["rep"]: r for r in runs if r["config"] == "off"}
        for cfg in [c for c in dict.fromkeys(r["config"] for r in runs)]:
            rs = [r for r in runs if r["config"] == cfg]
            vs = [r["tokens_per_s"] / off[r["rep"]]["tokens_per_s"] for r in rs if r["rep"] in off]
            stall = [r["itl_p99_rebalance_ms"] / r["itl_p99_steady_ms"] for r in rs if r["rebalances"] and r["itl_p99_steady_ms"]]
            lines.append(
                f"| {cfg} | {_mr([r['tokens_per_s'] for r in rs], '{:.0f}')} | {_mr(vs, '{:.3f}')} | {_mr([r['itl_p50_ms'] for r in rs])} "
                f"| {_mr([r['itl_p99_ms'] for r in rs])} | {_mr([r['ttft_p99_ms'] for r in rs], '{:.0f}')} | {_mr(stall)} "
                f"| {_mr([r['rebalances'] for r in rs], '{:.0f}')} | {_mr([r['balancedness'] for r in rs], '{:.3f}')} "
                f"| {_mr([r['cycles'] or 0 for r in rs], '{:.0f}')} | {_mr([r['layers_moved'] or 0 for r in rs], '{:.0f}')} "
                f"| {sum(r['failed'] for r in rs)} of {sum(r['requests'] for r in rs)} |"
            )
    checks = [r for r in rows if r.get("kind") == "correctness"]
    if checks:
        lines += ["\ncorrectness (greedy vs EPLB off, same dtype/quantization; slots checked after every commit)",
                  "| deployment | config | dtype | quant | outputs identical | EPLB off's own repeats identical | pass | cycles "
                  "| slot checks ok | mismatches |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in checks:
            lines.append(f"| {r['deployment']} | {r['config']} | {r['dtype']} | {r['quant']} | {r['outputs_identical']} "
                         f"| {r['off_repeat_identical']:.3f} | {'yes' if r['identical'] else 'NO'} | {r['cycles']:.0f} "
                         f"| {r['slot_checks_ok']:.0f} | {r['slot_checks_mismatch']:.0f} |")
    single = [r for r in rows if r.get("kind", "").startswith(("llm_", "tp1"))]
    if single:
        lines.append("\none GPU")
        timing = [r for r in single if r["kind"] == "llm_timing" and "tokens_per_s" in r]
        by_rep = {}
        for r in timing:
            by_rep.setdefault(r["rep"], {})[r["plugin"]] = r["tokens_per_s"]
        ratios = [d["loaded"] / d["absent"] for d in by_rep.values() if len(d) == 2]
        if ratios:
            lines.append(f"- plugin loaded, EPLB off / plugin absent, tokens/s: {_mr(ratios, '{:.3f}')} over {len(ratios)} interleaved pairs")
        for r in single:
            if r["kind"] == "tp1_refused":
                lines.append(f"- TP=1 with --eplb-config, vLLM's own CLI: exit {r['rc']}, last line: {r['last_line']!r}, traceback: {r['traceback']}")
            elif r["kind"] != "llm_timing":
                if "error" in r:
                    lines.append(f"- {r['kind']}: error {r['error'][-300:]!r}")
                    continue
                n = r["prompts"]
                lines.append(f"- slot swap {r['kind'][4:]}: repeat {r['repeat_identical']}/{n}, all tensors swapped "
                             f"{r['after_swap_identical']}/{n}, swapped back {r['after_swap_back_identical']}/{n}, weights without "
                             f"scales {r['weights_without_scales_identical']}/{n} identical; expert tensors {r['swap']['expert_tensors']}")
                if "repeat_drift" in r:  # teacher-forced: the largest |log-prob change| of any prompt token
                    lines.append(f"  max |prompt log-prob change|: repeat {r['repeat_drift']:.4f}, all tensors swapped "
                                 f"{r['after_swap_drift']:.4f}, swapped back {r['after_swap_back_drift']:.4f}, weights without "
                                 f"scales {r['weights_without_scales_drift']:.4f}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, short runs: the CPU check of the whole path")
    ap.add_argument("--ranks", type=int, default=0, help="expert-parallel ranks (default: every GPU; CPU: 2)")
    ap.add_argument("--deployments", default="tp,dp")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--reps", type=int, default=3)
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
    ap.add_argument("--correctness", default="float32,fp8", help="checks after the timed runs ('' for none)")
    ap.add_argument("--check-seconds", type=float, default=60.0)
    ap.add_argument("--check-window", type=int, default=40)
    ap.add_argument("--check-tokens", type=int, default=48)
    ap.add_argument("--single-gpu", action="store_true", help="the one-GPU checks (default when one GPU is seen)")
    ap.add_argument("--single-modes", default="timing,float32,bfloat16,fp8",
                    help="which one-GPU checks run: timing (plugin cost), and slot swaps in float32, bfloat16, fp8")
    ap.add_argument("--model-dir", default=os.path.join(tempfile.gettempdir(), "eplb-serve-model"))
    ap.add_argument("--workdir", default=None, help="server logs and configs (default: a temporary folder)")
    ap.add_argument("--out", default=None, help="append each run's figures as a JSON line")
    ap.add_argument("--report", default=None, help="print the table from a --out file and exit")
    a = ap.parse_args(argv)
    if a.report:
        print(report([json.loads(x) for x in open(a.report)]))
        return 0
    if a.smoke:
        a.layers, a.experts, a.top_k, a.hidden, a.moe_intermediate, a.vocab = 4, 16, 2, 128, 64, 512
        a.groups, a.hot, a.reps, a.seconds, a.warmup, a.clients = 2, 2, 1, 20.0, 5.0, 4
        a.prompt_len, a.max_tokens, a.window, a.interval, a.check_seconds, a.check_window = 16, 16, 16, 32, 25.0, 16
        a.check_tokens, a.dtype = 12, "float32"
    gpus = 0
    if a.device == "cuda":
        import torch

        gpus = torch.cuda.device_count()
    a.ranks = a.ranks or (gpus if a.device == "cuda" else 2)
    a.redundant = a.redundant or a.ranks
    a.serve_dtype = "float32" if a.device == "cpu" else "bfloat16"
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
    if a.device == "cuda" and gpus < 2 or a.single_gpu:
        print(f"{gpus} GPU(s): vLLM refuses EPLB on one expert-parallel rank; running the one-GPU checks")
        for row in single_gpu_checks(a, workdir, model, vocab):
            keep(row)
    else:
        for rep in range(a.reps):
            order = configs[rep % len(configs):] + configs[: rep % len(configs)]
            for dep in a.deployments.split(","):
                for cfg in order:
                    keep(timed_run(a, workdir, model, vocab, dep, cfg, rep))
        eplb = next((c for c in configs if c.startswith("vllm-eplb")), None)
        for kind in [k for k in a.correctness.split(",") if k and eplb]:
            dtype, quant = ("float32", None) if kind == "float32" else (a.serve_dtype, kind)
            if a.device == "cpu" and quant:
                print(f"correctness with --quantization {quant}: vLLM's CPU fp8 MoE kernel needs AMX; skipped on CPU")
                continue
            keep(correctness(a, workdir, model, vocab, a.deployments.split(",")[0], eplb, dtype, quant))
    print(report(rows))
    bad = [r for r in rows if r.get("failed") or r.get("slot_checks_mismatch") or r.get("identical") is False
           or (r.get("kind") == "tp1_refused" and not r["ok"])]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
