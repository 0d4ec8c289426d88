"""Which transfer backend moves the experts, from the configured name and where the
weights live. One place, so the integration, the benchmarks and the tests agree.

  gloo      every device; GPU weights through pinned host staging
  cuda_ipc  GPU, every EP rank on one node: pulls over NVLink by the copy engines
  nccl      GPU: NCCL isend/irecv on a dedicated group
  auto      per pair of ranks, what was measured fastest (`pair_backend`): CPU -> gloo;
            GPU, same node (including two ranks on one GPU) -> cuda_ipc; GPU, different
            nodes -> nccl. One node: CudaIpcBackend; several: HybridBackend.

Measured (docs/benchmarks.md, 2026-11-28, `benchmarks/gpu_rebalance.py`, H200s joined by
NVLink, DeepSeek-V3 expert shapes, median over 3-5 runs): per-layer transfer at EP=2
cuda_ipc 327 GB/s (84% of the peer-copy limit), nccl 215 GB/s (56%), gloo through pinned
host memory 3.5-3.9 GB/s (2026-11-23); at EP=4 cuda_ipc 224, nccl 184 GB/s. Stall
p99/steady p99 at EP=2: cuda_ipc 1.00x, nccl 1.02-1.04x, gloo 1.26x; at EP=4 cuda_ipc and
nccl 1.03x, gloo 1.39x. With two or four ranks on one GPU NCCL refuses to run, and cuda_ipc
met the stall targets (1.00-1.07x).
Across nodes CUDA IPC cannot map memory, so NCCL is the fastest measured there (no
multi-node run yet: an assumption until one is made).
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

from ..placement import Topology
from .backend import TransferBackend
from .gloo import GlooBackend

log = logging.getLogger(__name__)

# name -> the device its weights must be on ("" for any). The one list of backend names:
# eplb.json's choices (integration/config.py), the start-up check that refuses a GPU backend
# without GPUs (integration/startup.py) and `make_backend` read it.
NEEDS: dict[str, str] = {"auto": "", "gloo": "", "nccl": "cuda", "cuda_ipc": "cuda"}
BACKENDS = tuple(NEEDS)
CUDA_ONLY = tuple(name for name, device in NEEDS.items() if device == "cuda")


def pair_backend(topo: Topology, a: int, b: int, device_type: str = "cuda") -> str:
    """The backend `auto` uses between ranks a and b (see the module's notes)."""
    if device_type != "cuda":
        return "gloo"
    return "cuda_ipc" if topo.node_of(a) == topo.node_of(b) else "nccl"


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
        if name in CUDA_ONLY:
            log.warning("transfer_backend %s needs GPU weights; moving experts over gloo", name)
        return GlooBackend(gloo_group)
    if name == "gloo":
        return GlooBackend(gloo_group)
    from .gpu import CudaIpcBackend, HybridBackend, P2PBackend

    if name == "nccl":
        return P2PBackend(nccl_group(), device)
    one_node = all(pair_backend(topo, rank, r) == "cuda_ipc" for r in range(topo.num_ranks))
    if name == "cuda_ipc" and topo.num_nodes > 1:
        raise ValueError(f"transfer_backend cuda_ipc needs every EP rank on one node; these span {topo.num_nodes}: use auto or nccl")
    node = topo.node_of(rank)
    same_node = [r for r in range(topo.num_ranks) if topo.node_of(r) == node]
    ipc = CudaIpcBackend(cpu_group, weights_of, num_layers, rank, topo.num_ranks, peers=same_node)
    if one_node:
        return ipc
    return HybridBackend(ipc, P2PBackend(nccl_group(), device), topo.node_of)
