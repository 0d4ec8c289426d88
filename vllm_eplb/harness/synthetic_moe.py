"""The rig's synthetic expert-parallel MoE: the one model the fault matrix, the tests,
the demo and every benchmark drive the balancer with, without vLLM. One layout and
router, two kinds of expert arithmetic (the constructors):

  `SyntheticMoE.exact_model`  (CPU: the correctness rig) weights small integers in float64,
        one linear map per expert, activations kept in [-8, 8] by a modulo after each
        layer. Outputs do not depend on which rank computes an expert or in what order
        partial sums add, so any change of a probe's output means a slot held the wrong
        weights or a map pointed at the wrong slot: what the invariant checks want.
  `SyntheticMoE.gated_model`  (GPU shapes: the benchmarks) SiLU-gated experts w13 (2I x H) and
        w2 (H x I), bf16 on GPU (DeepSeek-V3: H 7168, I 2048, 88 MB per expert), computed
        with one grouped GEMM per weight per layer: a pass's real cost. Its probe checks
        each (token, choice)'s expert output alone, since sums across ranks in bf16 depend
        on the placement.

Layout as in vLLM's TP+EP on one node: every rank sees every token; rank r owns physical
slots [r*S, (r+1)*S), computes its slots' contributions, and `combine` (an all-reduce)
sums them. Each layer's tokens pick top-k logical experts from their input features (a
router of topic centres: a skewed topic mix gives a skewed expert load, different hot
experts in each layer), or from a precomputed (layers, tokens, k) routing (the
benchmarks' Zipf bank, `skewed_routing`). Replicas are chosen by token index ("hash", as
vLLM's router) or "balanced" (vllm_eplb/kernels/replica_dispatch.py). The first layer's
router advances `pass_counter`, the pass clock's device count, as vLLM's does.
"""

from __future__ import annotations

import sys

import numpy as np
import torch
import torch.distributed as dist

from vllm_eplb.core.pass_clock import ForwardCounter
from vllm_eplb.core.placement import Topology, default_placement
from vllm_eplb.core.routing_maps import RoutingMaps

MOD = 17  # exact model: activations live in [-8, 8]

_GROUPED_MM_OK = hasattr(torch, "_grouped_mm")


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Rows of x grouped by offs (cumulative ends), group g times w[g]. Rows past the last
    group are left unspecified (callers mask them). One kernel on GPU; a loop elsewhere."""
    global _GROUPED_MM_OK
    if x.is_cuda and _GROUPED_MM_OK:
        try:
            return torch._grouped_mm(x, w, offs=offs)
        except Exception as exc:  # older torch or GPU: a loop of matmuls, with a host sync
            print(f"torch._grouped_mm unavailable ({exc}); falling back to a loop", file=sys.stderr)
            _GROUPED_MM_OK = False
    out = torch.zeros((x.shape[0], w.shape[-1]), dtype=x.dtype, device=x.device)
    start = 0
    for g, end in enumerate(offs.tolist()):
        if end > start:
            out[start:end] = x[start:end] @ w[g]
        start = end
    return out


class SyntheticMoE:
    """Rank `rank`'s share of an EP MoE: slots [rank*S, (rank+1)*S) of every layer.

    `weights[layer]` is the list the balancer moves (`weights_of`): [w] for the exact
    model, [w13, w2] for the gated one, each (local slots, ...)."""

    def __init__(self, topo: Topology, num_layers: int, rank: int, *, exact: bool, hidden: int, inter: int = 0,
                 top_k: int = 2, device="cpu", dtype=torch.float64, seed: int = 0, num_topics: int = 16,
                 record_all_slots: bool = False, gate_recording: bool = False, group=None):
        self.topo, self.num_layers, self.rank, self.first = topo, num_layers, rank, rank * topo.slots_per_rank
        self.exact, self.hidden, self.inter, self.top_k = exact, hidden, inter, top_k
        self.device, self.dtype, self.seed, self.group = device, dtype, seed, group
        # The exact model records its own slots' load (the balancer's all-reduce sums the
        # ranks' windows to the pass's load); the gated one records every slot it routes,
        # as vLLM's router kernels and the balanced dispatch do: its window is that load
        # times the ranks, a scale the planners ignore.
        self.record_all_slots = record_all_slots
        self.dispatch = "hash"
        self.version = 0  # weights version: a weight update writes the next one
        self.placement0 = default_placement(topo, num_layers)
        self.maps = RoutingMaps.allocate(self.placement0, topo, device=device)
        self.pass_load = torch.zeros((num_layers, topo.num_physical), dtype=torch.int64, device=device)
        # gate_recording: load is added only while this flag is set (device-side, no host
        # branch), the flag the balancer raises for its window; otherwise always
        self.record_flag = torch.zeros((), dtype=torch.bool, device=device) if gate_recording else None
        self._no_load = torch.zeros(topo.num_physical, dtype=torch.int64, device=device)
        self.pass_counter = ForwardCounter(device)  # runs of the first MoE layer, advanced by its router
        self.router = make_router(seed, num_layers, hidden, topo.num_logical, num_topics) if exact else None
        s = topo.slots_per_rank
        shapes = [(s, hidden, hidden)] if exact else [(s, 2 * inter, hidden), (s, hidden, inter)]
        self.weights = [[torch.empty(shape, dtype=dtype, device=device) for shape in shapes] for _ in range(num_layers)]
        self._expected_fp: dict[tuple[int, int, int], torch.Tensor] = {}
        self.reset()

    @classmethod
    def exact_model(cls, topo: Topology, num_layers: int, dim: int, top_k: int, rank: int, seed: int = 0,
                    num_topics: int = 16, group=None) -> "SyntheticMoE":
        """The correctness rig's model (CPU, float64, exact); `group`: the model's all-reduce
        (the default group if None)."""
        return cls(topo, num_layers, rank, exact=True, hidden=dim, top_k=top_k, seed=seed, num_topics=num_topics, group=group)

    @classmethod
    def gated_model(cls, topo: Topology, num_layers: int, hidden: int, inter: int, rank: int, device, dtype,
                    seed: int = 0) -> "SyntheticMoE":
        """The benchmarks' model (GPU shapes): routed by a precomputed bank, load recorded
        while `record_flag` is set, summed by the caller's `combine`."""
        return cls(topo, num_layers, rank, exact=False, hidden=hidden, inter=inter, device=device, dtype=dtype, seed=seed,
                   record_all_slots=True, gate_recording=True)

    # ------------------------------------------------------------------ weights

    def weights_of(self, layer: int) -> list[torch.Tensor]:
        return self.weights[layer]

    def expert_weights(self, layer: int, expert: int, version: int | None = None) -> list[torch.Tensor]:
        """The one true weights of a logical expert at a weights version (default: the
        model's), distinct per expert and version."""
        v = self.version if version is None else version
        seed = self.seed * 1_000_003 + layer * 10_007 + expert + v * 7_919_993
        if self.exact:  # entries in {-1, 0, 1}
            g = torch.Generator().manual_seed(seed)
            return [torch.randint(-1, 2, (self.hidden, self.hidden), generator=g).to(torch.float64)]
        g = torch.Generator(device=self.device).manual_seed(seed)
        a = torch.randn((2 * self.inter, self.hidden), generator=g, device=self.device, dtype=torch.float32)
        b = torch.randn((self.hidden, self.inter), generator=g, device=self.device, dtype=torch.float32)
        return [(a * 0.02).to(self.dtype), (b * 0.02).to(self.dtype)]

    def _write_slots(self) -> None:
        s = self.topo.slots_per_rank
        for layer in range(self.num_layers):
            for slot in range(s):
                e = int(self.maps.phy2log[layer, self.first + slot])
                for dst, src in zip(self.weights[layer], self.expert_weights(layer, e)):
                    dst[slot].copy_(src)

    def reset(self) -> None:
        """Back to the initial placement and weights: maps rewritten, slots regenerated,
        load and pass count zeroed."""
        self.version = 0
        self.maps.write_all(self.placement0, self.topo)
        self._write_slots()
        self.pass_load.zero_()
        self.pass_counter.tensor.zero_()

    def update_weights(self) -> None:
        """A weight update: the next version of every expert, written into each local slot
        that holds it under the maps in force (what vllm-eplb's placed weight loader does)."""
        self.version += 1
        self._write_slots()

    def _fingerprint(self, tensors) -> torch.Tensor:
        # float64 sums: equal bits give equal sums (same shape, same kernel) and distinct
        # random experts differ; computed on the device, so no weight crosses to the host
        return torch.stack([t.sum(dtype=torch.float64) for t in tensors])

    def slot_mismatches(self) -> list[tuple[int, int, int]]:
        """(layer, local slot, expert the map names) for every slot whose weights are not
        that expert's. Exact model: compared whole; gated: by fingerprint (regenerating
        every expert of a DeepSeek-shaped model per check would cost more than the pass)."""
        bad = []
        placement = self.maps.phy2log.cpu()
        for layer in range(self.num_layers):
            for slot in range(self.topo.slots_per_rank):
                e = int(placement[layer, self.first + slot])
                have = [w[slot] for w in self.weights[layer]]
                if self.exact:
                    ok = all(torch.equal(h, w) for h, w in zip(have, self.expert_weights(layer, e)))
                else:
                    key = (layer, e, self.version)
                    if key not in self._expected_fp:
                        self._expected_fp[key] = self._fingerprint(self.expert_weights(layer, e))
                    ok = torch.equal(self._fingerprint(have), self._expected_fp[key])
                if not ok:
                    bad.append((layer, slot, e))
        return bad

    # ------------------------------------------------------------------ passes

    def route(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """(tokens, top_k) logical experts from the tokens' features. Ties break by expert
        id, identically everywhere. Every layer routes on the pass's input features (a
        hash-like router), so the load skew the workload asks for reaches every layer."""
        logits = h @ self.router[layer]
        # add a tiny id-dependent term so topk never meets a tie
        logits = logits + torch.arange(self.topo.num_logical, dtype=torch.float64) * 1e-6
        return torch.topk(logits, self.top_k, dim=-1).indices

    def to_physical(self, layer: int, ids: torch.Tensor, record: bool, record_rows: int | None = None) -> torch.Tensor:
        """(T, k) logical experts -> physical slots by `self.dispatch`; with `record`, the
        load of the first `record_rows` tokens (default all) is added to pass_load (gated by
        record_flag when there is one)."""
        if self.dispatch == "balanced":
            from vllm_eplb.kernels.replica_dispatch import torch_balanced_map_and_record

            if not self.record_all_slots:
                raise ValueError("the balanced dispatch records every slot it routes: build the model with record_all_slots")
            load = self.pass_load[layer] if record else self._no_load
            flag = self.record_flag if self.record_flag is not None else torch.ones((), dtype=torch.bool, device=ids.device)
            if ids.is_cuda:
                from vllm_eplb.kernels.replica_dispatch_triton import triton_balanced_map_and_record

                rows = None if record_rows is None else torch.tensor(record_rows, device=ids.device)
                return triton_balanced_map_and_record(ids, load, self.maps.log2phy[layer], self.maps.replica_count[layer], flag,
                                                      rows)
            return torch_balanced_map_and_record(ids, load, self.maps.log2phy[layer], self.maps.replica_count[layer], flag,
                                                 record_rows)
        tok = torch.arange(ids.shape[0], device=ids.device)
        count = self.maps.replica_count[layer][ids]
        phys = self.maps.log2phy[layer][ids, tok[:, None] % count]  # replica by token index
        if record:
            slots = phys[:record_rows].flatten()
            if not self.record_all_slots:
                slots = slots[(slots >= self.first) & (slots < self.first + self.topo.slots_per_rank)]
            if self.record_flag is None:
                self.pass_load[layer] += torch.bincount(slots, minlength=self.topo.num_physical)
            else:  # add 0 when not recording: no branch on the host
                self.pass_load[layer].index_add_(0, slots, self.record_flag.expand(slots.numel()).long())
        return phys

    def _experts(self, layer: int, x: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        w = self.weights[layer]
        if self.exact:
            return grouped_mm(x, w[0], offs)
        h = grouped_mm(x, w[0].transpose(-2, -1), offs)
        a = torch.nn.functional.silu(h[:, : self.inter]) * h[:, self.inter :]
        return grouped_mm(a, w[1].transpose(-2, -1), offs)

    def forward(self, h: torch.Tensor, routing: torch.Tensor | None = None, combine=None, depth: int = 0,
                record: bool = True, count: bool = True, record_rows: int | None = None) -> torch.Tensor:
        """h: (tokens, hidden); returns the same shape. routing: (layers, tokens, k) logical
        experts, or None to route from h's features. combine(out): sums the ranks' partial
        outputs in place (default: the exact model all-reduces over its group; the gated
        one does nothing). depth: layers of compute (default the resident layers), cycling
        through the resident layers' weights: a deep model's pass time from the layers that
        fit; load is recorded for the first pass through them. count: the first layer's
        router advances `pass_counter` (the rig's probe passes, no serving passes, do not).
        record_rows: only the first rows are the pass's tokens (load); the rest ride along
        (the exact model's rows are computed independently: the harness's probe batch)."""
        s = self.topo.slots_per_rank
        tokens = h.shape[0]
        tok = torch.arange(tokens, device=h.device)
        if combine is None and self.exact and dist.is_initialized() and dist.get_world_size(self.group) > 1:
            combine = lambda out: dist.all_reduce(out, group=self.group)  # noqa: E731
        h0 = h
        for d in range(depth or self.num_layers):
            layer = d % self.num_layers
            if d == 0 and count:
                self.pass_counter.advance()  # as vLLM's router of the first balanced layer does
            ids = routing[layer] if routing is not None else self.route(layer, h0)
            phys = self.to_physical(layer, ids, record and d < self.num_layers, record_rows)
            k = ids.shape[1]
            local = phys - self.first
            is_local = (local >= 0) & (local < s)
            key = torch.where(is_local, local, s).flatten()
            order = torch.argsort(key, stable=True)
            offs = torch.bincount(key, minlength=s + 1)[:s].cumsum(0).to(torch.int32)
            rows = tok.repeat_interleave(k)[order]
            y = self._experts(layer, h[rows], offs)
            y = torch.where(is_local.flatten()[order][:, None], y, torch.zeros((), dtype=y.dtype, device=y.device))
            out = torch.zeros_like(h).index_add_(0, rows, y)
            if combine is not None:
                combine(out)
            h = torch.remainder(h + out + 8, MOD) - 8 if self.exact else h + out
        return h

    def probe(self, x: torch.Tensor, routing: torch.Tensor | None = None) -> torch.Tensor:
        """What the invariant checker compares with its reference (a collective on every
        rank). Exact model: a whole forward pass of x (no load, no count), all-reduced.
        Gated model: (layers, T, k, hidden) float32, each (token, choice)'s expert output
        computed alone from whichever slot the map names, zeros where that slot is on
        another rank: the caller's sum over ranks is exact (one non-zero per entry) and
        independent of the placement."""
        if self.exact:
            return self.forward(x, routing, record=False, count=False)
        s = self.topo.slots_per_rank
        layers, tokens, k = routing.shape
        out = torch.zeros((layers, tokens, k, self.hidden), dtype=torch.float32)
        maps_l2p = self.maps.log2phy.cpu()
        counts = self.maps.replica_count.cpu()
        for layer in range(layers):
            w13, w2 = self.weights[layer]
            for t in range(tokens):
                for j in range(k):
                    e = int(routing[layer, t, j])
                    slot = int(maps_l2p[layer, e, t % int(counts[layer, e])]) - self.first
                    if 0 <= slot < s:
                        h = x[t : t + 1] @ w13[slot].T
                        a = torch.nn.functional.silu(h[:, : self.inter]) * h[:, self.inter :]
                        out[layer, t, j] = (a @ w2[slot].T).float().cpu()[0]
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


def topic_centers(seed: int, num_topics: int, dim: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 99)
    return torch.randint(-8, 9, (num_topics, dim), generator=g).to(torch.float64)


def make_router(seed: int, num_layers: int, dim: int, num_logical: int, num_topics: int = 16) -> torch.Tensor:
    """(layers, dim, logical) router whose column for expert e points at topic e % num_topics,
    under a per-layer permutation: a topic's tokens favour the same few experts, so a skewed
    topic mix gives a skewed expert load, with different hot experts in each layer."""
    centers = topic_centers(seed, num_topics, dim)
    g = torch.Generator().manual_seed(seed + 7)
    layers = []
    for _ in range(num_layers):
        perm = torch.randperm(num_logical, generator=g)
        cols = centers[perm % num_topics].T  # (dim, logical)
        layers.append(cols + torch.randint(-2, 3, cols.shape, generator=g).to(torch.float64))
    return torch.stack(layers)


class DriftingWorkload:
    """Token batches from a mixture of topics; topic popularity is Zipf-skewed and the
    hot topics rotate every `drift_every` passes. Each topic's tokens prefer a few
    experts, so expert load is skewed and drifts. The same batch on every rank."""

    def __init__(self, dim: int, tokens: int, num_topics: int = 16, zipf: float = 1.2, drift_every: int = 0, seed: int = 0):
        self.dim = dim
        self.tokens = tokens
        self.num_topics = num_topics
        self.drift_every = drift_every
        self.seed = seed
        self.centers = topic_centers(seed, num_topics, dim)
        p = 1.0 / np.arange(1, num_topics + 1) ** zipf
        self.popularity = p / p.sum()

    def batch(self, pass_no: int) -> torch.Tensor:
        shift = pass_no // self.drift_every if self.drift_every else 0
        probs = np.roll(self.popularity, shift)
        rng = np.random.default_rng(self.seed * 7919 + pass_no)
        topics = rng.choice(self.num_topics, size=self.tokens, p=probs)
        noise = rng.integers(-1, 2, size=(self.tokens, self.dim))
        h = self.centers[torch.from_numpy(topics)] + torch.from_numpy(noise).to(torch.float64)
        return torch.remainder(h + 8, MOD) - 8

    def probe(self) -> torch.Tensor:
        """A fixed batch for checking outputs never change."""
        rng = np.random.default_rng(12345)
        return torch.from_numpy(rng.integers(-8, 9, size=(32, self.dim))).to(torch.float64)
