"""Figures the balancer exposes (for /metrics, logs and tests). Every history is bounded:
a server runs for months."""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field

KEEP = 1000  # entries kept of each per-event history


def _history(n: int = KEEP):
    return field(default_factory=lambda: deque(maxlen=n))


@dataclass(frozen=True)
class TransitionRecord:
    pass_no: int
    trigger: str
    source: str  # top-level states
    dest: str
    layer: int  # next layer to move while transferring, else -1
    reason: str = ""


@dataclass
class BalancerStats:
    cycles_started: int = 0
    cycles_completed: int = 0
    cycles_skipped: Counter = field(default_factory=Counter)  # reason -> count
    cycles_aborted: Counter = field(default_factory=Counter)  # reason -> count
    last_abort: str = ""  # "reason (rank r, pass p): detail" of the last abort
    local_faults: Counter = field(default_factory=Counter)  # reason -> faults raised on this rank
    last_plan_seconds: float = 0.0
    plans_total: int = 0
    plan_seconds: deque = _history()
    balancedness_observed: float = float("nan")  # measured over the last window
    observed_history: deque = _history()  # (window end pass, observed)
    # a cycle window's sampled passes one by one (core/pass_balance.py): mean over them of each
    # pass's balancedness, the same passes' summed load's (the bound the straggler share keeps:
    # `observed` may be a later watch window's, or span carried watch windows), and the share
    # of MoE time stragglers cost (cost model)
    balancedness_pass: float = float("nan")
    balancedness_sampled: float = float("nan")
    straggler_share: float = float("nan")
    balancedness_current: float = float("nan")  # predicted for the placement in force (same load)
    balancedness_predicted: float = float("nan")  # predicted for the last plan
    # predicted for the placement the server started with, on the last window's load:
    # what the same traffic would give without rebalancing
    balancedness_initial: float = float("nan")
    # the load trigger (core/load_trigger.py): predicted for the placement in force on the last
    # watch window's load, and the cycles it started
    balancedness_watch: float = float("nan")
    load_triggers: int = 0
    # the cost model's predicted MoE expert seconds per pass (core/cost_model.py), on the last
    # plan's window: for the placement in force and for the plan
    pass_seconds_current: float = float("nan")
    pass_seconds_predicted: float = float("nan")
    last_plan_moved_slots: int = 0
    layers_committed: int = 0
    experts_moved: int = 0  # experts this rank received
    bytes_moved: int = 0  # bytes this rank received
    bytes_sent: int = 0
    last_layer_transfer_seconds: float = 0.0
    steps_total: int = 0
    transfer_seconds: deque = _history()  # per committed step
    transfer_layers: deque = _history()  # layers of each committed step
    max_staging_bytes: int = 0
    cycle_passes: deque = _history()  # window end -> placement fully live
    # the driver's ticks against the pass clock: extra ticks are ignored, missed ones
    # caught up before the next forward pass (both harmless, both reported)
    extra_ticks: int = 0
    missed_ticks: int = 0
    skew_rounds: int = 0  # rounds in which some rank reported tick skew
    planner_restarts: int = 0
    weight_updates: int = 0  # weight updates applied (one per pass that had one)
    # transient causes that paused rebalancing (reason -> count), and the resume votes that ended a pause
    suspensions: Counter = field(default_factory=Counter)
    reenabled: int = 0
    # rounds that showed maps differing across ranks, each healed at once: (pass, layers moved, experts lost)
    maps_healed: int = 0
    # windows in which this rank routed tokens and no rank recorded load (plan_rounds._nothing_recorded)
    unrecorded_windows: int = 0
    heals: deque = _history()
    history: deque = _history(100_000)
