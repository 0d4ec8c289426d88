"""The CPU fused-MoE kernel under expert parallelism, on vLLM's real kernel: two ranks'
outputs, each computed from its own experts with the hooked CPUUnquantizedExperts.apply
(global ids mapped through the expert map), sum to the output of one rank holding every
expert, the router weight applied on the output (top-2) or on the input (top-1, Llama-4)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from vllm_eplb.integration import hooks

pytestmark = pytest.mark.vllm

EXPERTS, HIDDEN, INTER, TOKENS = 4, 32, 32, 12


@pytest.fixture
def hooked_apply():
    hooks.named("cpu_fused_moe").install()
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts

    yield CPUUnquantizedExperts
    hooks.uninstall_all()


def experts_holding(cls, w13, w2):
    """The kernel object as vLLM builds it after loading, for these (prepacked) weights."""
    from vllm._custom_ops import cpu_prepack_moe_weight

    e = cls.__new__(cls)
    e._use_zentorch = False
    e.quant_config = SimpleNamespace(w1_bias=None, w2_bias=None, a2_scale=None)
    return e, cpu_prepack_moe_weight(w13.contiguous(), cls.isa), cpu_prepack_moe_weight(w2.contiguous(), cls.isa)


def run(cls, w13, w2, hidden, weights, ids, expert_map, on_input):
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation

    e, p13, p2 = experts_holding(cls, w13, w2)
    out = torch.zeros(hidden.shape)
    e.apply(
        output=out, hidden_states=hidden, w1=p13, w2=p2, topk_weights=weights, topk_ids=ids,
        activation=MoEActivation.SILU, global_num_experts=EXPERTS, expert_map=expert_map, a1q_scale=None,
        a2_scale=None, workspace13=None, workspace2=None, expert_tokens_meta=None, apply_router_weight_on_input=on_input,
    )
    return out


@pytest.mark.parametrize("top_k, on_input", [(2, False), (1, True)], ids=["weight-on-output", "weight-on-input"])
def test_two_ranks_sum_to_one_rank_with_every_expert(hooked_apply, top_k, on_input):
    g = torch.Generator().manual_seed(0)
    w13 = torch.randn(EXPERTS, 2 * INTER, HIDDEN, generator=g) * 0.2
    w2 = torch.randn(EXPERTS, HIDDEN, INTER, generator=g) * 0.2
    hidden = torch.randn(TOKENS, HIDDEN, generator=g)
    ids = torch.stack([torch.randperm(EXPERTS, generator=g)[:top_k] for _ in range(TOKENS)]).to(torch.int32)
    weights = torch.rand(TOKENS, top_k, generator=g)
    if on_input:  # what MoEPrepareAndFinalizeNoDPEPModular.prepare() does before apply
        hidden = hidden * weights
    whole = run(hooked_apply, w13, w2, hidden, weights, ids, None, on_input)
    summed = torch.zeros_like(whole)
    for rank in (0, 1):
        mine = torch.arange(2 * rank, 2 * rank + 2)
        expert_map = torch.full((EXPERTS,), -1, dtype=torch.int32)
        expert_map[mine] = torch.arange(2, dtype=torch.int32)
        summed += run(hooked_apply, w13[mine], w2[mine], hidden, weights, ids, expert_map, on_input)
    assert whole.abs().sum() > 0
    torch.testing.assert_close(summed, whole, rtol=1e-5, atol=1e-5)
