"""The check that a model's weight loader fills every expert slot (core/slot_fill.py, and
moe_adapter's wrapper around the model's first load_weights): right for every dtype a
quantized model gives per slot (fp8 weights, block and per-expert scales, packed ints),
and never a refusal for a model that loads correctly, also when its loader replaces the
expert tensors (online quantization builds them on the meta device)."""

from __future__ import annotations

import types

import pytest
import torch

from vllm_eplb.core.slot_fill import Marks, sentinel

SLOTS = 6


def expert_tensors(device="cpu") -> list[torch.Tensor]:
    """One layer as get_expert_weights() lists a block-quantized fp8 layer, plus a bf16, an
    fp32 and a packed-int tensor: each (local slots, ...)."""
    return [
        torch.zeros(SLOTS, 8, 16, device=device).to(torch.float8_e4m3fn),  # w13 (fp8)
        torch.zeros(SLOTS, 4, 2, device=device),  # w13 block scales (float32)
        torch.zeros(SLOTS, 32, device=device, dtype=torch.bfloat16),
        torch.zeros(SLOTS, 5, device=device, dtype=torch.int32),  # packed int4
        torch.zeros(SLOTS, 1, device=device).to(torch.float8_e8m0fnu),  # e8m0 scales
    ]


def write(tensors, slots, value=1.0):
    for t in tensors:
        for s in slots:
            if t.is_floating_point():
                t[s].view(torch.uint8).copy_(torch.full(t[s].shape, value).to(t.dtype).view(torch.uint8))
            else:
                t[s] = 7


def test_sentinel_is_nan_in_each_floating_format_and_all_ones_else():
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.float8_e5m2):
        x = torch.empty(1, dtype=dtype)
        x.view(torch.uint8).copy_(sentinel(dtype))
        assert x.float().isnan().all(), dtype
    assert sentinel(torch.int32).tolist() == [255] * 4


def test_every_slot_written_passes_and_each_unwritten_slot_counts_once():
    layers = [expert_tensors(), expert_tensors()]
    marks = Marks.mark(layers)
    assert all(t.view(torch.uint8).eq(sentinel(t.dtype)[0]).any() for t in layers[0])
    write(layers[0], range(SLOTS))
    write(layers[1], range(SLOTS - 2))  # the loader knew only the logical experts
    assert marks.unwritten(layers) == (2, 0)
    write(layers[1], range(SLOTS))
    assert marks.unwritten(layers) == (0, 0)


def test_a_half_written_floating_row_is_unwritten_a_packed_row_with_ones_is_not():
    (w13, scales, bf16, packed, e8m0) = layer = expert_tensors()
    marks = Marks.mark([layer])
    write(layer, range(SLOTS))
    w13[0, 4:].view(torch.uint8).fill_(int(sentinel(w13.dtype)[0]))  # w3's half never loaded
    assert marks.unwritten([layer]) == (1, 0)
    write([w13], [0])
    packed[1, :2] = -1  # real packed words can be all ones: only a row of nothing else is unwritten
    assert marks.unwritten([layer]) == (0, 0)


def test_tensors_on_meta_or_replaced_while_loading_are_not_checked_never_refused():
    layer = expert_tensors()
    layer[0] = torch.empty(SLOTS, 8, 16, device="meta", dtype=torch.float8_e4m3fn)  # online quantization
    marks = Marks.mark([layer])
    write(layer[1:], range(SLOTS))
    after = [torch.ones(SLOTS, 8, 16).to(torch.float8_e4m3fn)] + layer[1:]  # built by the loader
    assert marks.unwritten([after]) == (0, 1)
    after[2] = after[2].clone()  # another tensor replaced after marking: not the marked one
    assert marks.unwritten([after]) == (0, 2)


# --------------------------------------------------------------------------- moe_adapter's wrapper


class _Layer:
    def __init__(self, params: dict):
        self.params = params
        self.moe_config = types.SimpleNamespace(num_experts=SLOTS)

    def get_expert_weights(self):
        return list(self.params.values())


@pytest.fixture
def one_rank_group(monkeypatch):
    """A real one-rank gloo group standing in for vLLM's expert-parallel group."""
    pytest.importorskip("vllm")
    import torch.distributed as dist
    from vllm.distributed import parallel_state

    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    monkeypatch.setattr(parallel_state, "get_ep_group", lambda: types.SimpleNamespace(world_size=1, cpu_group=dist.group.WORLD))
    yield
    dist.destroy_process_group()


@pytest.mark.vllm
def test_model_whose_loader_replaces_its_fp8_experts_loads(one_rank_group):
    """Online fp8 in vLLM: the expert weights are on the meta device until the loader
    materializes and quantizes them; the block scales exist before. Loaded in full: no refusal."""
    from vllm_eplb.integration.moe_adapter import _check_slots_loaded

    layers = [_Layer({"w13": torch.empty(SLOTS, 8, 16, device="meta"), "w13_scale": torch.zeros(SLOTS, 4, 2)})]

    def load_weights(weights):
        for layer in layers:
            layer.params["w13"] = torch.randn(SLOTS, 8, 16).to(torch.float8_e4m3fn)  # replaced
            layer.params["w13_scale"].fill_(0.5)
        return {"w13"}

    model = types.SimpleNamespace(load_weights=load_weights)
    _check_slots_loaded(model, "OnlineFp8Moe", layers)
    assert model.load_weights([]) == {"w13"}
    assert model.load_weights is load_weights  # later calls (weight updates) are the model's own


@pytest.mark.vllm
def test_model_whose_loader_skips_redundant_fp8_slots_is_refused_in_one_line(one_rank_group):
    from vllm_eplb.integration.moe_adapter import _check_slots_loaded
    from vllm_eplb.integration.refusal import ModelRefused

    layers = [_Layer({"w13": torch.zeros(SLOTS, 8, 16).to(torch.float8_e4m3fn), "w13_scale": torch.zeros(SLOTS, 4, 2)})
              for _ in range(2)]

    def load_weights(weights):  # written for the 4 logical experts only
        for layer in layers:
            write(layer.get_expert_weights(), range(4))

    model = types.SimpleNamespace(load_weights=load_weights)
    _check_slots_loaded(model, "LogicalOnlyMoe", layers)
    with pytest.raises(ModelRefused) as err:
        model.load_weights([])
    line = str(err.value)
    assert "\n" not in line and "LogicalOnlyMoe" in line and "left 4 of 12 expert slots unfilled" in line, line
