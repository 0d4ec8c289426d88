"""moe_adapter's construction-time switch on vLLM's real FusedMoEFactory: EPLB layers for
the duration of the block only, restored whatever happens inside. (The adapted models
themselves are served in test_e2e_architectures.py.)"""

from __future__ import annotations

import inspect

import pytest

from vllm_eplb.integration.moe_adapter import eplb_layer_defaults

pytestmark = pytest.mark.vllm


def defaults():
    from vllm.model_executor.layers.fused_moe import layer

    params = inspect.signature(layer.FusedMoEFactory).parameters
    return params["enable_eplb"].default, params["num_redundant_experts"].default


def test_factory_builds_eplb_layers_inside_the_block_only():
    assert defaults() == (False, 0)
    with eplb_layer_defaults(6):
        assert defaults() == (True, 6)
    assert defaults() == (False, 0)
    with pytest.raises(RuntimeError), eplb_layer_defaults(2):
        raise RuntimeError("a model that fails to build")
    assert defaults() == (False, 0)


def test_moe_blocks_that_default_eplb_off_build_eplb_layers_inside_the_block_only():
    """GLM-4.7-Flash's layers build GLM-4.5's MoE block without passing `enable_eplb`, whose
    default is False: inside the block it is True (so the layers get EPLB and redundant slots),
    after it False again. A block that takes no such parameter is left alone."""
    import vllm.model_executor.models.glm4_moe_lite  # noqa: F401  (imports GLM-4.5's block)
    from vllm.model_executor.models.glm4_moe import Glm4MoE
    from vllm.model_executor.models.qwen3_moe import Qwen3MoeSparseMoeBlock

    def block_default():
        return inspect.signature(Glm4MoE.__init__).parameters["enable_eplb"].default

    untouched = inspect.signature(Qwen3MoeSparseMoeBlock.__init__)
    assert block_default() is False
    with eplb_layer_defaults(2):
        assert block_default() is True
        assert inspect.signature(Qwen3MoeSparseMoeBlock.__init__) == untouched
    assert block_default() is False
