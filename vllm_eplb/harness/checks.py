"""The correctness invariants, checked across every rank at a forward pass
(invariants 2 and 5 of docs/architecture.md, "How the invariants are met"):

  - the routing maps are identical on every rank;
  - every local slot holds exactly the weights of the expert the map names;
  - the outputs for a fixed probe batch equal those before any rebalance.

Every rank calls `check` at the same pass (it runs collectives on the default group).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist

from vllm_eplb.core.routing_maps import RoutingMaps


def map_digest(maps: RoutingMaps) -> torch.Tensor:
    h = hashlib.sha256()
    for t in (maps.phy2log, maps.log2phy, maps.replica_count):
        h.update(t.cpu().numpy().tobytes())
    d = h.digest()
    return torch.tensor([int.from_bytes(d[:7], "little"), int.from_bytes(d[7:14], "little")], dtype=torch.int64)


@dataclass
class InvariantChecker:
    maps: RoutingMaps
    slot_mismatches: Callable[[], list]  # (layer, slot, expert) of every slot holding the wrong weights
    probe: Callable[[], torch.Tensor]  # the probe batch's outputs (a collective forward on every rank)
    world_size: int
    reference: torch.Tensor | None = None
    checks: int = 0
    map_disagreements: list[int] = field(default_factory=list)  # passes where maps differed across ranks
    slot_errors: list[tuple] = field(default_factory=list)  # (pass, layer, slot, expert)
    output_changes: list[int] = field(default_factory=list)  # passes where the probe output differed

    def __post_init__(self) -> None:
        if self.reference is None:
            self.reference = self.probe()

    def new_reference(self) -> None:
        """The model's weights changed (a weight update): its outputs from now on are the
        reference. Collective, like `check`."""
        self.reference = self.probe()

    def check(self, p: int, probe_out: torch.Tensor | None = None) -> None:
        """At pass p, on every rank. probe_out: the probe's outputs where the caller computed
        them already (the harness runs the probe batch inside the pass, with the maps that
        pass routes with, so the check costs no forward of its own); else `probe()`."""
        self.checks += 1
        d = map_digest(self.maps)
        if self.world_size > 1:
            gathered = [torch.empty_like(d) for _ in range(self.world_size)]
            dist.all_gather(gathered, d)
            if any(not torch.equal(g, gathered[0]) for g in gathered):
                self.map_disagreements.append(p)
        self.slot_errors += [(p, *m) for m in self.slot_mismatches()]
        if not torch.equal(self.probe() if probe_out is None else probe_out, self.reference):
            self.output_changes.append(p)

    @property
    def clean(self) -> bool:
        return not (self.map_disagreements or self.slot_errors or self.output_changes)
