"""Weight updates placed into the slots of the placement in force (integration/weight_updates.py),
without a server: a layer of 2 ranks x 10 slots (16 experts + 4 redundant), vLLM's loader
stood in for by what it does with an expert id (the start-up physical id: write that slot if it
is this rank's), driven the way vLLM's model loaders drive it. The real loader, end to end:
tests/test_e2e_weight_updates.py."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vllm_eplb.core.placement import Topology, default_placement
from vllm_eplb.integration import weight_updates as wu

TOPO = Topology(2, 16, 20)
START = default_placement(TOPO, 1)[0]  # slot p holds p % 16


def experts(rank: int):
    return SimpleNamespace(local_num_experts=TOPO.slots_per_rank, quant_config=None, rank=rank)


def vllm_loader(layer, param, loaded_weight, weight_name, shard_id, expert_id, return_success=False):
    """vLLM's RoutedExperts.weight_loader, as far as slots go: global physical id -> local slot."""
    local = expert_id - layer.rank * TOPO.slots_per_rank
    if not 0 <= local < TOPO.slots_per_rank:
        return False if return_success else None
    param.data[local] = loaded_weight
    return True if return_success else None


def slots(rank: int, row: np.ndarray, placeable: bool = True, writes: list | None = None) -> wu.ExpertSlots:
    return wu.ExpertSlots(
        0, lambda: row, START.copy(), list(TOPO.rank_slots(rank)), TOPO.num_logical, placeable,
        (lambda: writes.append(1)) if writes is not None else (lambda: None), lambda layers: f"refused {layers}",
    )


def checkpoint(version: int) -> dict[int, torch.Tensor]:
    """Logical expert -> its (4, 3) weight: value 100 * version + expert everywhere."""
    return {e: torch.full((4, 3), 100.0 * version + e) for e in range(TOPO.num_logical)}


def load_like_vllm(layer, placed: wu.ExpertSlots | None, param, ckpt, stop_at_first=True) -> None:
    """A model's load_weights: for each checkpoint expert, vLLM's start-up mapping lists
    physical ids p with p % 16 == e in ascending order; Qwen3-style loaders stop at the first
    success, RoutedExperts.load_weights tries them all."""
    for e, w in ckpt.items():
        for p in range(TOPO.num_physical):
            if START[p] != e:
                continue
            ok = (placed.load if placed else lambda f, *a: f(*a))(vllm_loader, layer, param, w, "w2_weight", "w2", p, True)
            if ok and stop_at_first:
                break


def moved_row() -> np.ndarray:
    """A placement after rebalancing, different from start-up on both ranks: expert 3 in two
    slots of rank 0 (and none of rank 1), expert 0 in two slots of rank 1 (and none of rank 0)."""
    row = np.array([3, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 0])
    assert sorted(set(row)) == list(range(16))
    return row


def held(param: torch.Tensor) -> list[int]:
    """The expert each local slot holds (its weight's value % 100)."""
    return [int(v) % 100 for v in param[:, 0, 0]]


@pytest.mark.parametrize("stop_at_first", [True, False], ids=["break_on_success", "every_replica_tried"])
@pytest.mark.parametrize("rank", [0, 1])
def test_update_reaches_every_slot_of_each_expert(rank, stop_at_first):
    row = moved_row()
    layer, param = experts(rank), torch.zeros((TOPO.slots_per_rank, 4, 3))
    placed = slots(rank, row)
    load_like_vllm(layer, placed, param, checkpoint(1), stop_at_first)
    assert held(param) == [int(row[s]) for s in TOPO.rank_slots(rank)]
    assert (param[:, 0, 0] >= 100).all(), "a slot kept its old weights"


@pytest.mark.parametrize("rank", [0, 1])
def test_each_slot_is_written_once(rank):
    """vLLM's layerwise reload processes a layer once it counted as many elements written as
    the layer holds: every slot once, however many start-up replicas the loader visits."""
    writes = []
    layer, param = experts(rank), torch.zeros((TOPO.slots_per_rank, 4, 3))

    def counting(layer, param, w, name, shard, expert_id, ret):
        ok = vllm_loader(layer, param, w, name, shard, expert_id, ret)
        writes.append(expert_id) if ok else None
        return ok

    placed = slots(rank, moved_row())
    for e, w in checkpoint(1).items():
        for p in range(TOPO.num_physical):
            if START[p] == e:
                placed.load(counting, layer, param, w, "w2_weight", "w2", p, True)
    assert sorted(writes) == list(TOPO.rank_slots(rank))


def test_start_up_placement_loads_as_vllm_does():
    layer, placed_param, plain_param = experts(1), torch.zeros((10, 4, 3)), torch.zeros((10, 4, 3))
    load_like_vllm(layer, slots(1, START.copy()), placed_param, checkpoint(2))
    load_like_vllm(layer, None, plain_param, checkpoint(2))
    assert torch.equal(placed_param, plain_param)


def test_the_balancer_hears_of_every_write():
    writes = []
    load_like_vllm(experts(0), slots(0, moved_row(), writes=writes), torch.zeros((10, 4, 3)), checkpoint(1))
    assert writes


def test_a_layer_wide_value_loads_as_given():
    """A parameter without one row per slot (a global scale) is no slot to place."""
    scale, row = torch.zeros(1), moved_row()

    def scalar_loader(layer, param, w, *_):
        param.data.copy_(w)
        return True

    assert slots(0, row).load(scalar_loader, experts(0), scale, torch.tensor([7.0]), "w13_input_scale", "w1", 0, True)
    assert scale.item() == 7.0


def test_stacked_tensor_refused_once_moved():
    """A 3-D tensor of the rank's start-up experts (Llama-4's fused checkpoints) cannot be
    placed; at the start-up placement it loads as vLLM loads it."""
    stacked, param = torch.ones((10, 4, 3)), torch.zeros((10, 4, 3))

    def whole(layer, param, w, *_):
        param.data.copy_(w)
        return True

    with pytest.raises(wu.WeightUpdateRefused, match=r"refused \[0\]"):
        slots(0, moved_row()).load(whole, experts(0), param, stacked, "w13_weight", "w1", 0, True)
    assert param.sum() == 0
    assert slots(0, START.copy()).load(whole, experts(0), param, stacked, "w13_weight", "w1", 0, True)


def test_layer_whose_loader_was_not_seen_placing_refused_once_moved():
    """An update that reaches the loader without the worker's RPCs (load_weights called
    directly) is refused there, before anything is written."""
    param = torch.zeros((10, 4, 3))
    stuck = slots(0, moved_row(), placeable=False)
    with pytest.raises(wu.WeightUpdateRefused, match=r"^refused \[0\]$"):
        stuck.load(vllm_loader, experts(0), param, torch.ones((4, 3)), "w2_weight", "w2", 3, True)
    assert param.sum() == 0
    assert slots(0, START.copy(), placeable=False).load(vllm_loader, experts(0), param, torch.ones((4, 3)), "w2_weight", "w2", 3, True)
    # at the start-up placement it loads as vLLM does: start-up slot 3
    assert param[3].eq(1).all() and param.sum() == param[3].sum()


def test_first_load_is_observed():
    """While the model first loads (no slots attached yet) the calls are counted: one expert
    at a time, or stacked."""
    layer, param = experts(0), torch.zeros((10, 4, 3))
    load_like_vllm(layer, None, param, checkpoint(0))
    wu.placed_load(vllm_loader, layer, param, torch.ones((4, 3)), "w2_weight", "w2", 1, True)
    wu.placed_load(lambda *a: True, layer, param, torch.ones((10, 4, 3)), "w2_weight", "w2", 0, True)
    seen = layer.__dict__[wu.SEEN]
    assert seen.per_expert == 1 and seen.whole_layer == 1


def placed_model(row: np.ndarray, placeable: bool = True) -> wu.PlacedModel:
    model = wu.PlacedModel("TinyMoE")
    model.layers.append(slots(0, row, placeable))
    model.layers[0].refuse = model.loader_refusal
    return model


@pytest.mark.parametrize(
    "kind, checkpoint_format, engine, expected",
    [
        ("reload", True, None, ""),
        ("reload", False, None, "reload_weights(is_checkpoint_format=False) copies expert tensors as given"),
        ("start", True, "NCCLWeightTransferEngine", ""),
        ("start", True, "IPCWeightTransferEngine", ""),
        ("start", True, "ShardedRDTWeightTransferEngine", "writes parameter memory directly"),
    ],
)
def test_what_cannot_be_placed_is_refused_in_one_line(kind, checkpoint_format, engine, expected):
    moved, start = placed_model(moved_row()), placed_model(START.copy())
    line = moved.refusal(kind, checkpoint_format, engine)
    assert (expected in line) if expected else line == ""
    assert "\n" not in line and ("MoE layers 0 moved since start-up" in line or not expected)
    assert start.refusal(kind, checkpoint_format, engine) == "", "nothing is refused at the start-up placement"


def test_loader_writing_the_start_up_layout_refused_once_moved():
    line = placed_model(moved_row(), placeable=False).refusal("reload")
    assert line.startswith("vllm-eplb: TinyMoE's weight loader writes a layer's experts in the start-up layout")
    assert placed_model(START.copy(), placeable=False).refusal("reload") == ""


class _Guard:
    def __init__(self, problem: str):
        self.problem, self.begun = problem, 0

    def begin(self, kind, checkpoint_format=True, engine=None):
        if self.problem:
            raise wu.WeightUpdateRefused(self.problem)
        self.begun += 1


def worker_of(guard, **fields) -> SimpleNamespace:
    """A worker whose model runner's EPLB state holds `guard`, as VllmEplbState does."""
    runner = SimpleNamespace(eplb_state=SimpleNamespace(guard=guard))
    return SimpleNamespace(model_runner=runner, **fields)


def test_the_guard_is_found_from_the_runner_state_only():
    """No module global: a worker without vllm-eplb's state (upstream's, or none) has no guard."""
    assert not hasattr(wu, "_state")
    guard = _Guard("")
    assert wu.guard_of(worker_of(guard)) is guard
    assert wu.guard_of(SimpleNamespace(model_runner=SimpleNamespace(eplb_state=object()))) is None
    assert wu.guard_of(SimpleNamespace()) is None
    assert wu.weight_update_begins(SimpleNamespace(rank=0), "start") is True  # nothing balanced here: it goes ahead


@pytest.mark.parametrize("rank, raises", [(0, False), (1, True)])
def test_a_refusal_is_raised_by_the_last_worker_only(monkeypatch, rank, raises):
    """vLLM's multiprocess executor reads the workers' replies in rank order and stops at the
    first failure: one failing reply, the last, keeps the next RPC's replies paired."""
    worker = worker_of(_Guard("vllm-eplb: refused"), rank=rank, parallel_config=SimpleNamespace(world_size=2))
    if raises:
        with pytest.raises(wu.WeightUpdateRefused):
            wu.weight_update_begins(worker, "start")
    else:
        assert wu.weight_update_begins(worker, "start") is False


def test_an_update_that_can_be_placed_goes_ahead():
    state = _Guard("")
    worker = worker_of(state, rank=0, parallel_config=SimpleNamespace(world_size=2), _weight_update_is_draft=True)
    assert wu.weight_update_begins(worker, "update") is True and state.begun == 0  # a draft model's update
    assert wu.weight_update_begins(worker, "start") is True and state.begun == 1


def sharded_loader(layer, param, loaded_weight, weight_name, shard_id, expert_id, return_success=False):
    """vLLM's loader for a merged gate/up parameter and a per-expert scale: w1 fills the first
    half of the slot's rows, w3 the second, w2 (or a scale) the slot whole."""
    local = expert_id - layer.rank * TOPO.slots_per_rank
    if not 0 <= local < TOPO.slots_per_rank:
        return False if return_success else None
    if shard_id in ("w1", "w3") and param.dim() == 3:
        half = param.shape[1] // 2
        rows = slice(0, half) if shard_id == "w1" else slice(half, 2 * half)
        param.data[local, rows] = loaded_weight
    else:
        param.data[local] = loaded_weight
    return True if return_success else None


@pytest.mark.parametrize("rank", [0, 1])
def test_shards_and_scales_follow_their_expert(rank):
    """A quantized layer: w13 loaded as two shards, one scale per slot; every local slot ends
    up with both shards and the scale of the expert it holds now."""
    row = moved_row()
    layer = experts(rank)
    w13, scale = torch.zeros((TOPO.slots_per_rank, 8, 3)), torch.zeros(TOPO.slots_per_rank)
    placed = slots(rank, row)
    for e in range(TOPO.num_logical):
        for p in (p for p in range(TOPO.num_physical) if START[p] == e):  # every start-up replica, as vLLM visits them
            placed.load(sharded_loader, layer, w13, torch.full((4, 3), 100.0 + e), "w13_weight", "w1", p, True)
            placed.load(sharded_loader, layer, w13, torch.full((4, 3), 200.0 + e), "w13_weight", "w3", p, True)
            placed.load(sharded_loader, layer, scale, torch.tensor(300.0 + e), "w13_weight_scale", "w1", p, True)
    expected = [int(row[s]) for s in TOPO.rank_slots(rank)]
    assert [int(v) - 100 for v in w13[:, 0, 0]] == expected
    assert [int(v) - 200 for v in w13[:, 4, 0]] == expected
    assert [int(v) - 300 for v in scale] == expected
    assert torch.equal(w13[:, :4], w13[:, :1].expand(-1, 4, -1)) and torch.equal(w13[:, 4:], w13[:, 4:5].expand(-1, 4, -1))


def test_an_expert_this_rank_does_not_hold_writes_nothing():
    """Rank 0 holds no slot of expert 0 in the moved placement: its call reports no success,
    and the loader goes on to the next start-up replica (which writes nothing either)."""
    row, layer, param = moved_row(), experts(0), torch.zeros((10, 4, 3))
    assert 0 not in [int(row[s]) for s in TOPO.rank_slots(0)]
    placed = slots(0, row)
    assert placed.load(vllm_loader, layer, param, torch.ones((4, 3)), "w2_weight", "w2", 0, True) is False
    assert placed.load(vllm_loader, layer, param, torch.ones((4, 3)), "w2_weight", "w2", 16, True) is False
    assert param.sum() == 0


class _Runner:
    def reload_weights(self, weights_iterator=None, weights_path=None, is_checkpoint_format=True):
        raise AssertionError("only its signature is read")


@pytest.mark.parametrize(
    "args, kwargs, expected",
    [((), {}, True), ((), {"is_checkpoint_format": False}, False), ((None, "/ckpt", False), {}, False),
     ((), {"weights_path": "/ckpt"}, True)],
)
def test_checkpoint_format_as_the_runner_binds_it(args, kwargs, expected):
    worker = SimpleNamespace(model_runner=_Runner())
    assert wu._checkpoint_format(worker, args, kwargs) is expected


class _Ends:
    def __init__(self):
        self.ended = 0

    def end(self):
        self.ended += 1


def test_the_reference_is_taken_again_once_the_new_weights_are_in():
    """After a reload, or the last chunk's finish; not after start or a chunk; not for a draft model."""
    state = _Ends()
    worker = worker_of(state, rank=0, parallel_config=SimpleNamespace(world_size=2))
    for kind in ("start", "update"):
        wu.weight_update_ends(worker, kind)
    assert state.ended == 0
    wu.weight_update_ends(worker, "reload")
    wu.weight_update_ends(worker, "finish")
    assert state.ended == 2
    wu.weight_update_ends(worker_of(state, rank=0, _weight_update_is_draft=True), "finish")
    assert state.ended == 2


def test_the_guard_refuses_before_the_balancer_hears_and_refreshes_after():
    """UpdateGuard.begin: a refused update never reaches the balancer; one that can be placed
    does. end: verify_slots' reference taken again (only with a verifier)."""
    heard, refreshed = [], []
    verifier = SimpleNamespace(refresh=lambda placement: refreshed.append(placement.copy()) or [])
    moved = wu.UpdateGuard(placed_model(moved_row()), lambda: heard.append(1), lambda: np.stack([moved_row()]), verifier)
    with pytest.raises(wu.WeightUpdateRefused):
        moved.begin("reload", checkpoint_format=False)
    assert heard == []
    moved.begin("reload")
    moved.end()
    assert heard == [1] and len(refreshed) == 1 and np.array_equal(refreshed[0][0], moved_row())
    wu.UpdateGuard(placed_model(START.copy()), lambda: None, lambda: np.stack([START])).end()  # no verifier: nothing
