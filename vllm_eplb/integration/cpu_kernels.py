"""The CPU fused-MoE kernel under expert parallelism: vLLM's CPU experts index the rank's
local weights with global expert ids; these turn them into local slots and silence the
experts held elsewhere. Used by the `cpu_fused_moe` hook (integration/hooks.py) and its patch
(patches/vllm/<release>/0007-cpu-fused-moe-local-expert-ids.patch)."""

from __future__ import annotations


def local_expert_ids(topk_weights, topk_ids, expert_map):
    """Global physical expert ids -> this rank's slot ids; experts held elsewhere get slot 0
    with routing weight 0, so they add nothing."""
    local = expert_map[topk_ids.long()]
    remote = local < 0
    return topk_weights.masked_fill(remote, 0.0), local.masked_fill(remote, 0).to(topk_ids.dtype)


def drop_remote_tokens(output, topk_ids, expert_map) -> None:
    """With the router weight applied on the input (top-1 only: Llama-4), the kernel does
    not scale its output by topk_weights, so a zero weight does not silence an expert held
    elsewhere: the rows of the tokens routed to one get no output on this rank."""
    output.masked_fill_((expert_map[topk_ids.long()] < 0).any(dim=1, keepdim=True), 0.0)
