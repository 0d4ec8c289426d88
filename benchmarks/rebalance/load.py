"""The load the GPU rebalance benchmark's ranks route: one skewed batch of top-k choices per
pass and layer (the rig's `skewed_routing`, a Zipf popularity that drifts over 32 batches), the
tokens' hidden states, and the probe batch whose expert outputs the checks compare."""

from __future__ import annotations

import torch

from vllm_eplb.harness.synthetic_moe import skewed_routing


class Load:
    """Every rank builds the same load from the same seed (`args`: the benchmark's options)."""

    def __init__(self, args, device: str, dtype: torch.dtype):
        self.routing = skewed_routing(args.layers, args.experts, args.tokens, args.top_k, args.zipf, 32, args.seed, device)
        self.x0 = (torch.randn((args.tokens, args.hidden), generator=torch.Generator().manual_seed(1)) * 0.1).to(device, dtype)
        self.probe_routing = self.routing[0, :, : args.probe_tokens, :2].cpu()
        self.probe_x = self.x0[: args.probe_tokens]

    def routing_of(self, p: int) -> torch.Tensor:
        """Pass p's (layers, tokens, top_k) expert choices."""
        return self.routing[p % self.routing.shape[0]]
