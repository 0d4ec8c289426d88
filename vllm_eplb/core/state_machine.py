"""The balancer's state machine: every state and transition, in one table.

    idle -> collecting -> planning -> syncing -> transferring(layer k) -> idle

The machine is advanced by `Balancer.tick()`, once per forward pass (dummy
passes included). Every trigger below fires at the same pass number on every
rank of the expert-parallel group, because each one is decided either from the
pass counter alone or from the result of an agreement round that every rank
reads at the same pass (DESIGN invariant 1). None is fired from a rank-local
event such as the planner thread finishing.
"""

from __future__ import annotations

from transitions import Machine

STATES = ["idle", "collecting", "planning", "syncing", "transferring"]

ACTIVE = ["collecting", "planning", "syncing", "transferring"]

# trigger,           source,                  dest,           decided by
TRANSITIONS = [
    ["start_collecting", "idle", "collecting"],  # pass counter reaches the cycle's start
    ["start_planning", "collecting", "planning"],  # pass counter: the window is full
    ["plan_agreed", "planning", "syncing"],  # readiness round: every rank has a plan
    ["start_transfer", "syncing", "transferring"],  # digest round: same plan everywhere, worth moving
    ["next_layer", "transferring", "transferring"],  # commit round: layers committed, more to move
    ["finish", "transferring", "idle"],  # commit round: last layer committed
    ["skip", ["planning", "syncing"], "idle"],  # digest round: gain below the threshold
    ["abort", ACTIVE, "idle"],  # a round reported a failure on some rank, or a round failed
]


def attach_machine(model, on_change) -> Machine:
    """Make `model` the machine's model: it gains `state` and one method per trigger.

    `on_change(event)` runs after every transition (the reflexive next_layer too)."""
    return Machine(
        model=model,
        states=STATES,
        transitions=TRANSITIONS,
        initial="idle",
        auto_transitions=False,
        send_event=True,
        after_state_change=on_change,
    )
