"""The routing maps a MoE model reads (phy2log, log2phy, replica counts), on its device,
and the placement of record kept beside them.

The placement of record is `RoutingMaps.placement`: a host copy of the maps' phy2log,
kept by the same `apply` that writes the maps (the only way they change), so what the
balancer plans from, moves from and records is always what the model routes with.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .placement import Topology, logical_to_physical, replica_counts


@dataclass
class RoutingMaps:
    """The three routing tensors a MoE model reads, updated in place only.

    vLLM's layers and CUDA graphs hold views of this memory, so a commit copies
    into the existing tensors instead of rebinding them."""

    phy2log: torch.Tensor  # (layers, physical)
    log2phy: torch.Tensor  # (layers, logical, max_replicas), -1 padded
    replica_count: torch.Tensor  # (layers, logical)
    _host: np.ndarray | None = field(default=None, init=False, repr=False)
    version: int = field(default=0, init=False)  # counts `apply`: the maps' digest is recomputed only when it moves

    @property
    def placement(self) -> np.ndarray:
        """The placement of record: a host copy of phy2log, read from the device once (on
        first use: maps built for one write, as the vLLM API shims do, never pay for it),
        then kept by `apply`. Read it, never write it: only `apply` changes the maps."""
        if self._host is None:
            self._host = self.phy2log.cpu().numpy().astype(np.int64, copy=True)
        return self._host

    @classmethod
    def allocate(cls, placement: np.ndarray, topo: Topology, device="cpu") -> "RoutingMaps":
        layers = placement.shape[0]
        maps = cls(
            torch.empty((layers, topo.num_physical), dtype=torch.int64, device=device),
            torch.empty((layers, topo.num_logical, topo.max_replicas), dtype=torch.int64, device=device),
            torch.empty((layers, topo.num_logical), dtype=torch.int64, device=device),
        )
        maps.write_all(placement, topo)
        return maps

    def write_all(self, placement: np.ndarray, topo: Topology) -> None:
        for layer in range(placement.shape[0]):
            self.write_layer(layer, placement[layer], topo)

    def write_layer(self, layer: int, row: np.ndarray, topo: Topology) -> None:
        """Stage and apply at once (start-up, tests, stop-the-world)."""
        self.apply(self.stage_layer(layer, row, topo))

    def stage_layer(self, layer: int, row: np.ndarray, topo: Topology) -> "StagedLayer":
        """Compute layer `layer`'s three maps for placement `row` into host memory (pinned
        when the maps live on a GPU). Everything that can fail happens here (a placement
        the map cannot hold raises ValueError, pinning can fail), so `apply` cannot.
        Pinned blocks come from PyTorch's caching host allocator: after the first layers
        no new host memory is pinned."""
        if not 0 <= layer < self.phy2log.shape[0]:
            raise ValueError(f"layer {layer} out of range (0..{self.phy2log.shape[0] - 1})")
        row = np.asarray(row, dtype=np.int64)
        if row.shape != (self.phy2log.shape[1],):
            raise ValueError(f"placement row of shape {row.shape}, the map holds {self.phy2log.shape[1]} slots")
        l2p = logical_to_physical(row[None], topo.num_logical, self.log2phy.shape[-1])[0]
        counts = replica_counts(row[None], topo.num_logical)[0]
        pinned = self.phy2log.is_cuda
        # one host block for the three: one allocation, three views
        sizes = (row.size, l2p.size, counts.size)
        host = torch.empty(sum(sizes), dtype=torch.int64, pin_memory=pinned)
        flat = host.numpy()
        flat[: sizes[0]] = row
        flat[sizes[0] : sizes[0] + sizes[1]] = l2p.reshape(-1)
        flat[sizes[0] + sizes[1] :] = counts
        a, b, c = torch.split(host, sizes)
        return StagedLayer(layer, row.copy(), a, b.view(l2p.shape), c)

    def apply(self, staged: "StagedLayer") -> None:
        """Copy a staged layer into the maps, in place. On GPU: three asynchronous copies
        from pinned memory on the current stream (the next forward pass on that stream
        sees the new maps; the CPU does not wait). Cannot fail for a staged layer."""
        layer, nb = staged.layer, self.phy2log.is_cuda
        self.phy2log[layer].copy_(staged.phy2log, non_blocking=nb)
        self.log2phy[layer].copy_(staged.log2phy, non_blocking=nb)
        self.replica_count[layer].copy_(staged.replica_count, non_blocking=nb)
        if self._host is not None:
            self._host[layer] = staged.row
        self.version += 1


@dataclass(frozen=True)
class StagedLayer:
    """One layer's routing maps, computed and in host memory, ready for `RoutingMaps.apply`."""

    layer: int
    row: np.ndarray  # the placement row (physical slots) the maps were computed from
    phy2log: torch.Tensor
    log2phy: torch.Tensor
    replica_count: torch.Tensor
