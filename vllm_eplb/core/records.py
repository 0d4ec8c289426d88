"""Placement records: the placement in force and the load that produced it, in a JSON file.

Written by the balancer (rank 0) after every plan decision when `record_placement_path`
is set; read back to start a server on a recorded placement (`initial_placement_path`)
or to dry-run a policy on a recorded load (`python -m vllm_eplb.tools.dry_run`).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass

import numpy as np

from .placement import Topology, validate_placement

FORMAT = "vllm-eplb placement record v1"


class RecordError(ValueError):
    """A record that cannot be used: one line naming the file and what is wrong."""


@dataclass
class PlacementRecord:
    placement: np.ndarray  # (layers, physical)
    logical_load: np.ndarray | None  # (layers, logical) load of the window the plan was made from
    num_ranks: int
    num_logical: int
    policy: str = ""
    pass_no: int = 0
    created: str = ""

    @property
    def num_layers(self) -> int:
        return self.placement.shape[0]

    @property
    def num_physical(self) -> int:
        return self.placement.shape[1]

    def topology(self, ranks_per_node: int = 0, num_groups: int = 1) -> Topology:
        return Topology(self.num_ranks, self.num_logical, self.num_physical, ranks_per_node, num_groups)

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": FORMAT,
                "num_layers": self.num_layers,
                "num_logical_experts": self.num_logical,
                "num_physical_experts": self.num_physical,
                "num_ranks": self.num_ranks,
                "policy": self.policy,
                "pass": self.pass_no,
                "created": self.created or time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "placement": self.placement.tolist(),
                "logical_load": None if self.logical_load is None else np.round(self.logical_load, 3).tolist(),
            }
        )


def save(record: PlacementRecord, path: str) -> None:
    """Atomic: a reader never sees half a file."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".eplb-record-")
    with os.fdopen(fd, "w") as fh:
        fh.write(record.to_json())
    os.replace(tmp, path)


def load(path: str) -> PlacementRecord:
    try:
        with open(path) as fh:
            data = json.load(fh)
    except FileNotFoundError:
        raise RecordError(f"{path}: placement record not found") from None
    except json.JSONDecodeError as exc:
        raise RecordError(f"{path}: not a placement record (invalid JSON: {exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise RecordError(f"{path}: not a placement record (no 'format': {FORMAT!r})")
    try:
        placement = np.asarray(data["placement"], dtype=np.int64)
        raw_load = data.get("logical_load")
        rec = PlacementRecord(
            placement=placement,
            logical_load=None if raw_load is None else np.asarray(raw_load, dtype=np.float64),
            num_ranks=int(data["num_ranks"]),
            num_logical=int(data["num_logical_experts"]),
            policy=str(data.get("policy", "")),
            pass_no=int(data.get("pass", 0)),
            created=str(data.get("created", "")),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise RecordError(f"{path}: malformed placement record ({type(exc).__name__}: {exc})") from None
    if placement.ndim != 2 or placement.shape != (data.get("num_layers"), data.get("num_physical_experts")):
        raise RecordError(f"{path}: 'placement' is {placement.shape}, the header says {data.get('num_layers')} x {data.get('num_physical_experts')}")
    try:
        validate_placement(placement, rec.topology())
    except ValueError as exc:
        raise RecordError(f"{path}: invalid placement: {exc}") from None
    if rec.logical_load is not None and rec.logical_load.shape != (rec.num_layers, rec.num_logical):
        raise RecordError(f"{path}: 'logical_load' is {rec.logical_load.shape}, expected {(rec.num_layers, rec.num_logical)}")
    return rec


def check_matches(rec: PlacementRecord, path: str, layers: int | None, logical: int, physical: int, ranks: int) -> None:
    """Raise RecordError unless the record fits the model and parallel layout."""
    for what, have, want in (
        ("MoE layers", rec.num_layers, layers),
        ("logical experts", rec.num_logical, logical),
        ("physical expert slots", rec.num_physical, physical),
        ("expert-parallel ranks", rec.num_ranks, ranks),
    ):
        if want is not None and have != want:
            raise RecordError(
                f"{path}: recorded for {have} {what}, this server has {want}; "
                "record a placement with this model and layout, or drop initial_placement_path"
            )
