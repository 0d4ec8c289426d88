"""The balancer's state machine: every state, phase and transition, in one table.

    idle -> collecting -> planning -> syncing -> transferring(layer k) -> idle

The five top-level states are what operators see (/metrics, logs). Planning has
phases (nested states of `transitions`, named parent_child):

  planning_reducing     the window's load all-reduce is in flight
  planning_waiting      the plan is being computed; readiness rounds until every rank has it

Transferring is a pipeline: a new step (layers_per_pass layers) starts every pass while
fewer than agreement_lag + 1 are in flight, and every pass posts one commit vote saying
which steps in flight this rank has received and prepared; a step is committed on the
pass the first round in which every rank voted it ready is read. So a layer goes live
1 + agreement_lag passes after it started, and one layer can go live every pass.

The machine is advanced once per forward pass by `Balancer.tick()`. Every trigger
fires at the same pass number on every rank of the expert-parallel group, because
each one is decided either from the pass clock alone or from the result of an
agreement round that every rank reads at the same pass (DESIGN invariant 1).
None is fired from a rank-local event such as the planner finishing or a copy
landing: such news travels in the rank's next vote. DECIDED_BY says, for each
trigger, what decides it; it is the column the diagram in docs/architecture.md
shows beside each arrow.
"""

from __future__ import annotations

from transitions.extensions import HierarchicalMachine

TOP_STATES = ["idle", "collecting", "planning", "syncing", "transferring"]

STATES = [
    {"name": "idle", "on_enter": "_on_enter_idle"},  # end-of-cycle work: record, reset, schedule next
    "collecting",
    {"name": "planning", "children": ["reducing", "waiting"]},
    "syncing",
    "transferring",
]

ACTIVE = ["collecting", "planning", "syncing", "transferring"]

# trigger,           source,                 dest
TRANSITIONS = [
    ["start_collecting", "idle", "collecting"],
    ["window_full", "collecting", "planning_reducing"],
    ["load_reduced", "planning_reducing", "planning_waiting"],
    ["plan_agreed", "planning_waiting", "syncing"],
    ["skip", "syncing", "idle"],
    ["start_transfer", "syncing", "transferring"],
    ["next_layer", "transferring", "transferring"],
    ["finish", "transferring", "idle"],
    ["abort", ACTIVE, "idle"],
]

DECIDED_BY = {
    "start_collecting": "pass clock: the cycle's start",
    "window_full": "pass clock: window_size passes collected; load all-reduce posted",
    "load_reduced": "load round read: plan submitted, readiness round posted",
    "plan_agreed": "readiness round: every rank has its plan; digest round posted (else: vote again, no transition)",
    "skip": "digest round: gain below improvement_threshold",
    "start_transfer": "digest round: same plan everywhere, worth moving; first step started",
    "next_layer": "commit round: every rank voted a step ready; its layers committed, more to move",
    "finish": "commit round: every rank voted the last steps ready; their layers committed",
    "abort": "any round carrying a fault (planner, transfer, timeout, bug) from any rank, or failing on every rank (a rank lagged past agreement_timeout_s)",
}

SEPARATOR = "_"


def top_state(phase: str) -> str:
    """'planning_waiting' -> 'planning'."""
    return phase.split(SEPARATOR, 1)[0]


def attach_machine(model, on_change) -> HierarchicalMachine:
    """Make `model` the machine's model: it gains `phase` (the full nested state) and one
    method per trigger. `on_change(event)` runs after every transition (reflexive ones too)."""
    return HierarchicalMachine(
        model=model,
        states=STATES,
        transitions=TRANSITIONS,
        initial="idle",
        auto_transitions=False,
        send_event=True,
        model_attribute="phase",
        after_state_change=on_change,
    )


def table_markdown() -> str:
    """The transition table as markdown rows, for docs/architecture.md (checked by a test)."""
    rows = []
    for trigger, source, dest in TRANSITIONS:
        src = ", ".join(source) if isinstance(source, list) else source
        rows.append(f"| `{trigger}` | {src} | {dest} | {DECIDED_BY[trigger]} |")
    return "\n".join(rows)
