"""The torch hash map-and-record (upstream's replica choice) used where vLLM's Triton kernel is missing (CPU)."""

import torch

from vllm_eplb.core.placement import Topology
from vllm_eplb.core.routing_maps import RoutingMaps
from vllm_eplb.kernels.replica_dispatch import torch_hash_map_and_record as torch_map_to_physical_and_record

import numpy as np


def maps_for(placement):
    topo = Topology(2, 4, 6)
    return RoutingMaps.allocate(np.array([placement]), topo), topo


def test_maps_logical_to_physical_with_kernel_hash():
    maps, topo = maps_for([0, 1, 2, 3, 0, 0])  # expert 0 has 3 replicas: slots 0, 4, 5
    ids = torch.tensor([[0, 1], [0, 2], [0, 3], [0, 1]], dtype=torch.int32)
    load = torch.zeros(6, dtype=torch.int32)
    out = torch_map_to_physical_and_record(ids, load, maps.log2phy[0], maps.replica_count[0], torch.tensor(True))
    assert out.dtype == ids.dtype
    for t in range(4):
        r = ((t * 2654435769) & 0xFFFFFFFF) % 3  # the Triton kernel's replica choice
        assert out[t, 0].item() == [0, 4, 5][r]
    assert out[:, 1].tolist() == [1, 2, 3, 1]
    assert load.sum().item() == 8
    assert torch.equal(load, torch.bincount(out.reshape(-1).long(), minlength=6).to(torch.int32))


def test_records_only_unpadded_tokens_and_when_enabled():
    maps, topo = maps_for([0, 1, 2, 3, 0, 1])
    ids = torch.tensor([[2, 3], [2, 3], [2, 3]])
    load = torch.zeros(6, dtype=torch.int32)
    torch_map_to_physical_and_record(ids, load, maps.log2phy[0], maps.replica_count[0], torch.tensor(True), torch.tensor(2))
    assert load.tolist() == [0, 0, 2, 2, 0, 0]
    torch_map_to_physical_and_record(ids, load, maps.log2phy[0], maps.replica_count[0], torch.tensor(False))
    assert load.tolist() == [0, 0, 2, 2, 0, 0]
