"""The balanced dispatch's tile, shared by its torch path (`replica_dispatch`) and its Triton
kernel (`replica_dispatch_triton`): both must cut a batch into the same tiles to pick the same
replicas. Its own module so that neither of the two imports the other for it."""

from __future__ import annotations

MAX_TILE = 64  # elements dealt together (8 tokens at top-8): benchmarks/router_dispatch.py


def tile_size(numel: int) -> int:
    """TILE for a batch of numel elements: the whole batch up to MAX_TILE (a power of 2)."""
    return max(16, min(MAX_TILE, 1 << max(0, numel - 1).bit_length()))
