"""Which transfer backend moves the experts, from the configured name and where the
weights live. One place, so the integration, the benchmarks and the tests agree.

  gloo      every device; GPU weights through pinned host staging
  cuda_ipc  GPU, every EP rank on one node: pulls over NVLink by the copy engines
  nccl      GPU: NCCL isend/irecv on a dedicated group
  auto      CPU -> gloo; GPU on one node -> cuda_ipc; GPU across nodes -> IPC within a
            node and NCCL between nodes (HybridBackend)
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

from ..placement import Topology
from .backend import TransferBackend
from .gloo import GlooBackend

log = logging.getLogger(__name__)

BACKENDS = ("auto", "gloo", "cuda_ipc", "nccl")


def make_backend(
    name: str,
    device: torch.device,
    topo: Topology,
    rank: int,
    weights_of: Callable[[int], list[torch.Tensor]],
    num_layers: int,
    gloo_group,
    cpu_group,
    nccl_group: Callable[[], object],
) -> TransferBackend:
    """gloo_group: a dedicated gloo group for gloo transfers; cpu_group: a gloo group
    for the one-time IPC handle exchange; nccl_group: makes the dedicated NCCL group
    (collective: called on every rank or none, which `name` and the topology decide
    identically everywhere)."""
    if name not in BACKENDS:
        raise ValueError(f"transfer_backend {name!r}: choose one of {list(BACKENDS)}")
    if device.type != "cuda":
        if name not in ("auto", "gloo"):
            log.warning("transfer_backend %s needs GPU weights; moving experts over gloo", name)
        return GlooBackend(gloo_group)
    if name == "gloo":
        return GlooBackend(gloo_group)
    from .gpu import CudaIpcBackend, HybridBackend, P2PBackend

    if name == "nccl":
        return P2PBackend(nccl_group(), device)
    one_node = topo.num_nodes == 1
    if name == "cuda_ipc" and not one_node:
        raise ValueError(f"transfer_backend cuda_ipc needs every EP rank on one node; these span {topo.num_nodes}: use auto or nccl")
    node = topo.node_of(rank)
    same_node = [r for r in range(topo.num_ranks) if topo.node_of(r) == node]
    ipc = CudaIpcBackend(cpu_group, weights_of, num_layers, rank, topo.num_ranks, peers=same_node)
    if one_node:
        return ipc
    return HybridBackend(ipc, P2PBackend(nccl_group(), device), topo.node_of)
