"""Figures the balancer exposes (for /metrics, logs and tests)."""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field


@dataclass(frozen=True)
class TransitionRecord:
    pass_no: int
    trigger: str
    source: str
    dest: str
    layer: int  # next layer to move while transferring, else -1
    reason: str = ""


@dataclass
class BalancerStats:
    cycles_started: int = 0
    cycles_completed: int = 0
    cycles_skipped: Counter = field(default_factory=Counter)  # reason -> count
    cycles_aborted: Counter = field(default_factory=Counter)  # reason -> count
    last_plan_seconds: float = 0.0
    plan_seconds: list[float] = field(default_factory=list)
    balancedness_observed: float = float("nan")  # measured over the last window
    observed_history: list[tuple[int, float]] = field(default_factory=list)  # (window end pass, observed)
    balancedness_current: float = float("nan")  # predicted for the placement in force (same load)
    balancedness_predicted: float = float("nan")  # predicted for the last plan
    # predicted for the placement the server started with, on the last window's load:
    # what the same traffic would give without rebalancing
    balancedness_initial: float = float("nan")
    last_plan_moved_slots: int = 0
    layers_committed: int = 0
    experts_moved: int = 0  # experts this rank received
    bytes_moved: int = 0  # bytes this rank received
    bytes_sent: int = 0
    last_layer_transfer_seconds: float = 0.0
    transfer_seconds: list[float] = field(default_factory=list)  # per committed step
    transfer_layers: list[int] = field(default_factory=list)  # layers of each committed step
    max_staging_bytes: int = 0
    cycle_passes: list[int] = field(default_factory=list)  # window end -> placement fully live
    history: deque = field(default_factory=lambda: deque(maxlen=100_000))
