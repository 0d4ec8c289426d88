"""Does every slot hold the expert its map names? Weights and scales alike, on the device.

A slot's fingerprint covers every tensor the model gives per expert (`weights_of(layer)`:
each (local slots, ...) and aliasing the parameters the kernels read, so quantization
scales and biases are in it wherever the model lists them). Per tensor and slot it is two
exact integer sums of the slot's raw bytes read as int32 words (int16 or uint8 where the row
does not divide): the whole row, and its first half. Integer sums do not depend on the order
a reduction runs in, so equal bytes give equal fingerprints on any device; different experts
(random weights, different scales) differ.

At start-up every rank fingerprints its slots and the table is gathered over the agreement
group: the reference of each (layer, logical expert) is the fingerprint of the slot holding it
then, and replicas that already disagree are reported. After a commit, `check(layer, row)`
fingerprints the layer's local slots again and names every slot whose bytes are not those of
the expert `row` (the placement in force) puts there. After a weight update, `refresh`
takes the reference again, from the new weights, the same way (collective too), and names
this rank's slots whose bytes differ from their expert's first replica: an update that missed
a replica, or wrote one expert into another's slot next to a replica of it. A check reads the layer's weights once
and waits for the device: a tool for tests and benchmarks (`verify_slots` in eplb.json), kept
off the measured passes.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from .placement import Topology


def _words(t: torch.Tensor) -> torch.Tensor:
    """(slots, n) integer view of each slot's raw bytes: int32 words where the row's bytes
    divide by 4, else int16, else bytes."""
    raw = t.reshape(t.shape[0], -1).contiguous().view(torch.uint8)
    nbytes = raw.shape[1]
    dtype = torch.int32 if nbytes % 4 == 0 else torch.int16 if nbytes % 2 == 0 else torch.uint8
    return raw.view(dtype)


def fingerprints(tensors: list[torch.Tensor]) -> torch.Tensor:
    """(slots, 2 * len(tensors)) int64 on the tensors' device."""
    cols = []
    for t in tensors:
        w = _words(t)
        cols.append(w.sum(dim=1, dtype=torch.int64))
        cols.append(w[:, : max(1, w.shape[1] // 2)].sum(dim=1, dtype=torch.int64))
    return torch.stack(cols, dim=1)


class SlotVerifier:
    """Reference fingerprints of every (layer, logical expert), and the check after a commit.
    Collective at construction (every rank of `group`, at the same point)."""

    def __init__(
        self,
        weights_of: Callable[[int], list[torch.Tensor]],
        num_layers: int,
        placement: np.ndarray,
        topo: Topology,
        rank: int,
        group=None,
    ):
        self.weights_of, self.topo, self.rank, self.num_layers, self.group = weights_of, topo, rank, num_layers, group
        self.checked = 0  # slots checked
        self.mismatches: list[tuple[int, int, int]] = []  # (layer, slot, expert the map names)
        bad = self._take_reference(placement)
        # (layer, logical) whose replicas differ at start-up
        self.replicas_disagreeing: list[tuple[int, int]] = sorted({(layer, e) for layer, _, e in bad})

    def _take_reference(self, placement: np.ndarray) -> list[tuple[int, int, int]]:
        """Every rank's fingerprints, gathered: the reference of each (layer, logical) is its
        first slot's. Returns (layer, slot, expert) of every slot differing from that."""
        topo = self.topo
        local = torch.stack([fingerprints(self.weights_of(layer)) for layer in range(self.num_layers)]).cpu()
        if topo.num_ranks > 1:
            gathered = [torch.empty_like(local) for _ in range(topo.num_ranks)]
            dist.all_gather(gathered, local, group=self.group)
        else:
            gathered = [local]
        table = torch.cat(gathered, dim=1)  # (layers, physical slots, k)
        self.reference = torch.zeros((self.num_layers, topo.num_logical, table.shape[2]), dtype=torch.int64)
        bad = []
        for layer in range(self.num_layers):
            seen: set[int] = set()
            for slot, expert in enumerate(placement[layer]):
                expert = int(expert)
                if expert not in seen:
                    self.reference[layer, expert] = table[layer, slot]
                    seen.add(expert)
                elif not torch.equal(self.reference[layer, expert], table[layer, slot]):
                    bad.append((layer, slot, expert))
        return bad

    def refresh(self, placement: np.ndarray) -> list[tuple[int, int, int]]:
        """New weights: the reference again, from the slots as they are now. Collective.
        Returns (layer, slot, expert) of this rank's slots that differ from their expert's
        first replica; they count as mismatches."""
        mine = set(self.topo.rank_slots(self.rank))
        bad = [b for b in self._take_reference(placement) if b[1] in mine]
        self.checked += len(mine) * self.num_layers
        self.mismatches += bad
        return bad

    def check(self, layer: int, row: np.ndarray) -> list[tuple[int, int, int]]:
        """This rank's slots of `layer` against the experts `row` (physical -> logical) names."""
        fp = fingerprints(self.weights_of(layer)).cpu()
        slots = self.topo.rank_slots(self.rank)
        bad = [
            (layer, slot, int(row[slot]))
            for i, slot in enumerate(slots)
            if not torch.equal(fp[i], self.reference[layer, int(row[slot])])
        ]
        self.checked += len(slots)
        self.mismatches += bad
        return bad
