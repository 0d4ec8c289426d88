"""The replica dispatch (vllm_eplb/kernels): the balanced rule against a plain-Python
reading of its definition, what it guarantees (an even split per tile, determinism, load
recorded only for unpadded tokens while recording), the switch and the GPU router's
choice, and the Triton kernel against the torch version in Triton's interpreter (the
benchmark's --device cpu mode, which also runs the torch versions at several shapes)."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vllm_eplb.core.placement import Topology
from vllm_eplb.core.routing_maps import RoutingMaps
from vllm_eplb.kernels import replica_dispatch as rd

ROOT = Path(__file__).resolve().parents[1]


def maps_for(row, ranks=4):
    topo = Topology(ranks, max(row) + 1, len(row))
    return RoutingMaps.allocate(np.array([row]), topo)


def rule(ids: np.ndarray, count: np.ndarray, recorded: int) -> np.ndarray:
    """The module docstring's rule, element by element."""
    flat = ids.reshape(-1)
    tile = rd.tile_size(flat.size)
    out = np.empty_like(flat)
    for f, e in enumerate(flat):
        t0 = f // tile * tile
        rank = sum(1 for g in range(t0, f) if flat[g] == e)
        s = sum(int(flat[g]) for g in range(t0, min(t0 + tile, flat.size)) if g < recorded)
        out[f] = (rank + e + s) % max(count[e], 1)
    return out.reshape(ids.shape)


ROW = [0, 1, 2, 3, 4, 5, 6, 7, 0, 0, 1, 0]  # expert 0: 4 replicas, expert 1: 2


@pytest.mark.parametrize("tokens, unpadded", [(1, None), (5, 3), (40, 40), (64, 50)])
def test_balanced_follows_the_rule(tokens, unpadded):
    maps = maps_for(ROW)
    rng = np.random.default_rng(tokens)
    ids = torch.tensor(rng.choice([0, 0, 0, 1, 1, 2, 5, 7], size=(tokens, 3)), dtype=torch.int32)
    load = torch.zeros(len(ROW), dtype=torch.int32)
    nu = None if unpadded is None else torch.tensor(unpadded)
    out = rd.torch_balanced_map_and_record(ids, load, maps.log2phy[0], maps.replica_count[0], torch.tensor(True), nu)
    replicas = rule(ids.numpy(), maps.replica_count[0].numpy(), (unpadded or tokens) * 3)
    assert out.dtype == ids.dtype
    assert torch.equal(out.long(), maps.log2phy[0][ids.long(), torch.tensor(replicas)])
    rows = out[: unpadded or tokens].reshape(-1).long()
    assert torch.equal(load, torch.bincount(rows, minlength=len(ROW)).to(torch.int32))
    # the same batch, the same replicas (every TP rank routes it alike)
    again = rd.torch_balanced_map_and_record(ids, load.clone(), maps.log2phy[0], maps.replica_count[0], torch.tensor(True), nu)
    assert torch.equal(out, again)


def test_each_tile_splits_an_expert_evenly_over_its_replicas():
    maps = maps_for(ROW)
    ids = torch.zeros((8, 8), dtype=torch.int32)  # 64 choices of expert 0 (4 replicas), one tile
    ids[::2, 1] = 1
    load = torch.zeros(len(ROW), dtype=torch.int32)
    rd.torch_balanced_map_and_record(ids, load, maps.log2phy[0], maps.replica_count[0], None)
    zero = load[[0, 8, 9, 11]]  # expert 0's slots
    assert zero.sum() == 60 and zero.max() - zero.min() == 0
    one = load[[1, 10]]
    assert one.tolist() == [2, 2]
    # the hash of the token index does not: upstream's choice for the same batch
    hashed = torch.zeros(len(ROW), dtype=torch.int32)
    rd.torch_hash_map_and_record(ids, hashed, maps.log2phy[0], maps.replica_count[0], None)
    assert hashed[[0, 8, 9, 11]].max() - hashed[[0, 8, 9, 11]].min() > 0


def test_records_nothing_when_off_and_rejects_unknown_dispatch():
    maps = maps_for(ROW)
    load = torch.zeros(len(ROW), dtype=torch.int32)
    rd.torch_balanced_map_and_record(torch.zeros((4, 2), dtype=torch.int64), load, maps.log2phy[0], maps.replica_count[0],
                                     torch.tensor(False))
    assert load.sum() == 0
    with pytest.raises(ValueError, match="unknown replica dispatch 'waterfill'; choose one of hash, balanced"):
        rd.select("waterfill")


def test_routers_follow_the_selected_dispatch():
    maps = maps_for(ROW)
    ids = torch.tensor([[0, 1], [0, 2], [0, 0]], dtype=torch.int32)
    seen = []

    def upstream(**kw):
        seen.append(kw["topk_ids"])
        return kw["topk_ids"]

    router = rd.gpu_router(upstream)
    try:
        for mode, fn in (("hash", rd.torch_hash_map_and_record), ("balanced", rd.torch_balanced_map_and_record)):
            rd.select(mode)
            load = torch.zeros(len(ROW), dtype=torch.int32)
            out = rd.torch_map_to_physical_and_record(ids, load, maps.log2phy[0], maps.replica_count[0], torch.tensor(True))
            assert torch.equal(out, fn(ids, torch.zeros_like(load), maps.log2phy[0], maps.replica_count[0], None))
        rd.select("hash")
        assert router(ids, load, maps.log2phy[0], maps.replica_count[0], torch.tensor(True)) is ids and seen == [ids]
    finally:
        rd.select(rd.DEFAULT)


def test_both_routers_advance_the_pass_clock_for_the_first_layer_only():
    """The pass clock's MoE-layer count: vllm-eplb's CPU router and its GPU wrapper (here
    around the torch kernel standing in for vLLM's Triton one) advance the watched counter
    once per call with the first layer's load view, and never for another layer's."""
    from vllm_eplb.core.pass_clock import ForwardCounter

    maps = maps_for(ROW)
    ids = torch.tensor([[0, 1], [0, 2]], dtype=torch.int32)
    load = torch.zeros((2, len(ROW)), dtype=torch.int32)  # (layers, slots): row 0 is the first layer's view
    counter = ForwardCounter()
    counter.watch(load[0])
    gpu = rd.gpu_router(lambda **kw: rd.torch_hash_map_and_record(*kw.values()))
    try:
        for router in (rd.torch_map_to_physical_and_record, gpu):
            before = counter.read()
            for layer in (0, 1, 0, 1):
                router(ids, load[layer], maps.log2phy[0], maps.replica_count[0], torch.tensor(True))
            assert counter.read() - before == 2, router
        assert int(load.sum()) == 2 * 4 * ids.numel()  # both routers recorded every call's load
    finally:
        counter.unwatch()


def test_triton_kernel_equals_torch_in_the_interpreter():
    """benchmarks/router_dispatch.py --device cpu: Triton's interpreter runs the kernel on
    CPU tensors and compares ids and load with the torch version at every shape."""
    pytest.importorskip("triton")
    r = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "router_dispatch.py"), "--device", "cpu", "--reps", "2", "--batches", "4",
         "--tokens", "1,7,8,9,64,300"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    checks = [line for line in r.stdout.splitlines() if "kernel == torch reference" in line]
    assert len(checks) == 6 and all(line.endswith("True") for line in checks), r.stdout
    assert "upstream kernel NOT timed" in r.stdout  # said, not silently skipped


def test_synthetic_moe_side_by_side_on_cpu():
    """benchmarks/dispatch_balance.py in its logic-check shape: the rig's gated synthetic MoE
    routed with token-balanced and cost-model plans, by both dispatches, on the same batches,
    a row of figures for each."""
    r = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "dispatch_balance.py"), "--device", "cpu", "--tiny", "--passes", "3",
         "--plans", "token,cost", "--dispatch", "hash,balanced"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [line.split(" | ") for line in r.stdout.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [(row[0], row[1], row[2]) for row in rows] == [
        (f"| {t}", plan, d) for t in (4, 32) for plan in ("token", "cost") for d in ("hash", "balanced")]
    for row in rows:  # 4 ranks: balancedness lies in [1/4, 1], the straggler shares in [0, 3/4]
        assert 0.25 <= float(row[3]) <= 1 and 0.25 <= float(row[4]) <= 1, row
        assert 0 <= float(row[5].rstrip("%")) <= 75 and 0 <= float(row[6].rstrip("%")) <= 75, row
    assert "fit of " in r.stdout, r.stdout[-2000:]
