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
