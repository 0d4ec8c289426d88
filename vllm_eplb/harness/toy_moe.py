"""A toy expert-parallel MoE model for driving the balancer without vLLM.

Layout as in vLLM's TP+EP on one node: every rank sees every token; rank r owns
physical slots [r*S, (r+1)*S); each rank computes the contributions of its own
slots and an all-reduce sums them.

The arithmetic is exact: weights are small integers, activations are integers
kept small by a modulo after each layer, all in float64. So the outputs do not
depend on which rank computes an expert or in what order partial sums are added,
and any difference in outputs means an expert's weights were wrong or the map
pointed at the wrong slot: exactly what the correctness checks want to catch.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from vllm_eplb.core.pass_clock import ForwardCounter
from vllm_eplb.core.placement import RoutingMaps, Topology, default_placement

MOD = 17  # activations live in [-8, 8]


def expert_weight(seed: int, layer: int, expert: int, dim: int, version: int = 0) -> torch.Tensor:
    """The one true weight of a logical expert (at a weights version): entries in {-1, 0, 1},
    distinct per expert and version."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + layer * 10_007 + expert + version * 7_919_993)
    return torch.randint(-1, 2, (dim, dim), generator=g).to(torch.float64)


class ToyMoE:
    def __init__(
        self, topo: Topology, num_layers: int, dim: int, top_k: int, rank: int, seed: int = 0, num_topics: int = 16, group=None
    ):
        self.topo = topo
        self.num_layers = num_layers
        self.dim = dim
        self.top_k = top_k
        self.rank = rank
        self.seed = seed
        self.group = group  # model all-reduce group (the default group if None)
        self.version = 0  # weights version: a weight update writes the next one
        placement = default_placement(topo, num_layers)
        self.maps = RoutingMaps.allocate(placement, topo)
        self.pass_load = torch.zeros((num_layers, topo.num_physical), dtype=torch.int64)
        self.pass_counter = ForwardCounter()  # runs of the first MoE layer, advanced by its router
        s = topo.slots_per_rank
        self.weights = [
            torch.stack([expert_weight(seed, layer, int(e), dim) for e in placement[layer, rank * s : (rank + 1) * s]])
            for layer in range(num_layers)
        ]
        self.router = make_router(seed, num_layers, dim, topo.num_logical, num_topics)

    def weights_of(self, layer: int) -> list[torch.Tensor]:
        return [self.weights[layer]]

    def route(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """(tokens, top_k) logical experts. Ties break by expert id, identically everywhere.

        Every layer routes on the token's input features (a hash-like router), so the
        load skew the workload asks for reaches every layer."""
        logits = h @ self.router[layer]
        # add a tiny id-dependent term so topk never meets a tie
        logits = logits + torch.arange(self.topo.num_logical, dtype=torch.float64) * 1e-6
        return torch.topk(logits, self.top_k, dim=-1).indices

    def forward(self, h: torch.Tensor, record: bool = True, count: bool = True) -> torch.Tensor:
        """h: (tokens, dim) integer-valued float64; returns the same shape. `count`: the
        first layer's router advances `pass_counter`, as vLLM's does (the rig's probe
        passes, which are no serving passes, do not)."""
        s = self.topo.slots_per_rank
        first = self.rank * s
        token_idx = torch.arange(h.shape[0])
        h0 = h
        for layer in range(self.num_layers):
            if layer == 0 and count:
                self.pass_counter.advance()
            experts = self.route(layer, h0)  # (T, k)
            # replica chosen by token index, as vLLM's router does
            count = self.maps.replica_count[layer][experts]  # (T, k)
            replica = token_idx[:, None] % count
            phys = self.maps.log2phy[layer][experts, replica]  # (T, k)
            local = (phys >= first) & (phys < first + s)
            out = torch.zeros_like(h)
            for slot in range(s):
                hit = (phys == first + slot) & local
                tokens = hit.any(dim=1).nonzero().squeeze(1)
                if tokens.numel():
                    out[tokens] += h[tokens] @ self.weights[layer][slot]
            if record:
                self.pass_load[layer] += torch.bincount(phys[local], minlength=self.topo.num_physical)
            if dist.is_initialized() and dist.get_world_size(self.group) > 1:
                dist.all_reduce(out, group=self.group)
            h = torch.remainder(h + out + 8, MOD) - 8
        return h

    def update_weights(self) -> None:
        """A weight update: the next version of every expert, written into each local slot
        that holds it under the maps in force (what vllm-eplb's placed weight loader does)."""
        self.version += 1
        s = self.topo.slots_per_rank
        for layer in range(self.num_layers):
            for slot in range(s):
                e = int(self.maps.phy2log[layer, self.rank * s + slot])
                self.weights[layer][slot].copy_(expert_weight(self.seed, layer, e, self.dim, self.version))

    def slot_mismatches(self) -> list[tuple[int, int, int]]:
        """(layer, local slot, expert the map names) for every slot whose weights are wrong."""
        bad = []
        s = self.topo.slots_per_rank
        for layer in range(self.num_layers):
            for slot in range(s):
                e = int(self.maps.phy2log[layer, self.rank * s + slot])
                if not torch.equal(self.weights[layer][slot], expert_weight(self.seed, layer, e, self.dim, self.version)):
                    bad.append((layer, slot, e))
        return bad


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
