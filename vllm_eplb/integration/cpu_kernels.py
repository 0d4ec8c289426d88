"""The CPU fused-MoE kernel under expert parallelism and weight updates: vLLM's CPU experts
index the rank's local weights with global expert ids (these turn them into local slots and
silence the experts held elsewhere), and prepack the weights on the first load only (run
again on reloaded weights). Used by the `cpu_fused_moe` and `cpu_moe_reload` hooks
(integration/hooks.py) and their patches (patches/vllm/series)."""

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


def prepack_cpu_experts_again(method, layer) -> None:
    """A weight update of an unquantized MoE layer on CPU: vLLM sets the CPU experts up
    (padding, prepacking into the grouped-gemm layout) on the first load only, so reloaded
    weights reached the kernel in checkpoint layout (wrong outputs, EPLB on or off). Run that
    setup on the new weights, keeping the parameters (their storage is what the kernel, the
    balancer and vLLM's layerwise reload hold)."""
    from vllm.platforms import current_platform

    kernel = getattr(method, "moe_kernel", None)
    if kernel is None or not current_platform.is_cpu():
        return
    kept = {name: getattr(layer, name) for name in ("w13_weight", "w2_weight")}
    kernel.fused_experts.process_weights_after_loading(layer)
    for name, param in kept.items():
        new = getattr(layer, name)
        if new is not param:
            param.data.copy_(new.data)  # same shape: the padding ran at the first load
            layer.register_parameter(name, param)
