"""The balancer's state machine: every state, phase and transition, in one table.

    idle -> collecting -> planning -> syncing -> transferring(layer k) -> idle
    idle -> suspended -> idle
    idle -> disabled

The top-level states are what operators see (/metrics, logs). `disabled` is terminal, for
what cannot recover (the ranks run different protocols or clocks): rebalancing stopped on
every rank, serving goes on on the placement in force. `suspended` is for transient causes
(the planner dead, the transfer group broken, weight updates applied at different passes,
agreement rounds failing again and again): rebalancing pauses on every rank at the same
pass, and after a back-off (passes, doubling on every suspension in a row) the ranks vote
to resume. Planning
has phases (nested states of `transitions`, named parent_child):

  planning_reducing     the window's load all-reduce is in flight
  planning_waiting      the plan is being computed; readiness rounds until every rank has it

Transferring is a pipeline: a new step (layers_per_pass layers) starts every pass while
fewer than min(agreement_lag + 1, MAX_IN_FLIGHT = 6) are in flight, and every pass posts one commit vote saying
which steps in flight this rank has received and prepared; a step is committed on the
pass the first round in which every rank voted it ready is read. So a layer goes live
1 + agreement_lag passes after it started, and one layer can go live every pass.

The machine is advanced once per forward pass by `Balancer.tick()`. Every trigger
fires at the same pass number on every rank of the expert-parallel group, because
each one is decided either from the pass clock alone or from the result of an
agreement round that every rank reads at the same pass (invariant 1,
docs/architecture.md). None is fired from a rank-local event such as the planner
finishing or a copy landing: such news travels in the rank's next vote. DECIDED_BY
says, for each trigger, what decides it; it is the column the diagram in
docs/architecture.md shows beside each arrow.

Callbacks the table names (methods of the balancer, done by core/cycle.py): `_on_enter_idle`,
the end of every cycle however it ended (keep what may still be in flight, reset, schedule the
next); `_record_placement`, before the cycle's two decided ends (finish, skip): the placement in
force and the load it was planned from, written when `record_placement_path` is set.
"""

from __future__ import annotations

from typing import NamedTuple

from transitions.extensions import HierarchicalMachine

SEPARATOR = "_"

STATES = [
    {"name": "idle", "on_enter": "_on_enter_idle"},
    "collecting",
    {"name": "planning", "children": ["reducing", "waiting"]},
    "syncing",
    "transferring",
    "suspended",
    "disabled",
]

ACTIVE = ["collecting", "planning", "syncing", "transferring"]

TRANSITIONS = [
    ["start_collecting", "idle", "collecting"],
    ["window_full", "collecting", "planning_reducing"],
    ["load_reduced", "planning_reducing", "planning_waiting"],
    ["plan_agreed", "planning_waiting", "syncing"],
    {"trigger": "skip", "source": "syncing", "dest": "idle", "before": "_record_placement"},
    ["start_transfer", "syncing", "transferring"],
    ["next_layer", "transferring", "transferring"],
    {"trigger": "finish", "source": "transferring", "dest": "idle", "before": "_record_placement"},
    ["abort", ACTIVE, "idle"],
    ["suspend", "idle", "suspended"],
    ["resume", "suspended", "idle"],
    ["disable", ["idle", "suspended"], "disabled"],
]

DECIDED_BY = {
    "start_collecting": "pass clock: the cycle's start; or, while idle, the load trigger's vote (the placement in force fell short of its promise)",
    "window_full": "pass clock: window_size passes collected; load all-reduce posted",
    "load_reduced": "load round read: plan submitted, readiness round posted",
    "plan_agreed": "readiness round: every rank has its plan; digest round posted (else: vote again, no transition)",
    "skip": "digest round: gain below improvement_threshold",
    "start_transfer": "digest round: same plan everywhere, worth moving; first step started",
    "next_layer": "commit round: every rank voted a step ready; its layers committed, more to move",
    "finish": "commit round: every rank voted the last steps ready; their layers committed",
    "abort": "any round carrying a fault (planner, transfer, timeout, bug) from any rank, showing maps that differ across ranks (healed at that pass), or failing on every rank (a rank lagged past agreement_timeout_s, or stopped voting)",
    "suspend": "a cycle's end for a transient cause, read alike by every rank: a fault that suspends (planner dead, transfer group broken), a round showing weight updates applied at different passes, or the agreement_timeout abort repeated",
    "resume": "pass clock: the back-off over, a resume vote posted; its read: every rank ready again (planner alive, transfer group healthy, agreement group rebuilt); else back off twice as long",
    "disable": "the start-up check (the ranks run different protocols), or a round showing the ranks disagree about the protocol (pass clock, a step's layers); rank-local only where no vote can follow (commit failed)",
}


def _name(state) -> str:
    return state if isinstance(state, str) else state["name"]


def _leaves(states, prefix: str = "") -> list[str]:
    out = []
    for st in states:
        children = [] if isinstance(st, str) else st.get("children", [])
        path = prefix + _name(st)
        out += _leaves(children, path + SEPARATOR) if children else [path]
    return out


TOP_STATES = tuple(_name(s) for s in STATES)  # what /metrics and the logs name
PHASES = tuple(_leaves(STATES))  # every state the machine can be in: the balancer has work for each
TERMINAL = ("disabled",)  # no transition leaves it
PAUSED = ("suspended",)  # not rebalancing, waiting to vote itself back
LIVE_STATES = tuple(s for s in TOP_STATES if s not in TERMINAL + PAUSED)  # a rebalancing rank's states
LIVE_PHASES = tuple(p for p in PHASES if p not in TERMINAL + PAUSED)  # and phases: where a fault can hit a cycle


class PhaseWork(NamedTuple):
    """What the balancer does on a pass in one phase: `tick`, the method run; for the phases
    that exchange one round at a time, `post` and `read`, the methods that post the phase's
    round and read it when due (`_tick_round` runs them); `scheduled`: the phase posts or
    reads rounds on a schedule every rank keeps, so a pass that failed on a bug is retried
    once (core/ends.py). A name is the balancer's method (`_tick_round`) or one of its parts'
    (`cycles.tick_idle`: `Balancer.cycles`, core/cycle.py)."""

    tick: str
    post: str = ""
    read: str = ""
    scheduled: bool = False


# What each phase does on a pass (core/balancer.py's methods and its parts', by name), one row
# per phase of the table above: the balancer's only dispatch on the phase.
PHASE_WORK = {
    "idle": PhaseWork("cycles.tick_idle"),  # core/cycle.py
    "collecting": PhaseWork("cycles.tick_collecting"),
    "planning_reducing": PhaseWork("_tick_round", "plan_rounds.post_load", "plan_rounds.read_load", scheduled=True),
    "planning_waiting": PhaseWork("_tick_round", "plan_rounds.post_readiness", "plan_rounds.read_readiness", scheduled=True),
    "syncing": PhaseWork("_tick_round", "plan_rounds.post_digest", "plan_rounds.read_digest", scheduled=True),
    "transferring": PhaseWork("transferring.tick", scheduled=True),  # core/transferring.py: the pipeline's own votes
    "suspended": PhaseWork("suspension.tick", scheduled=True),  # core/suspension.py: the resume vote
    "disabled": PhaseWork("_tick_disabled"),
}
assert set(PHASE_WORK) == set(PHASES), f"PHASE_WORK must name every phase of the table: {sorted(PHASES)}"


def rows() -> list[tuple[str, list[str], str]]:
    """(trigger, sources, dest) of every transition, in table order."""
    out = []
    for t in TRANSITIONS:
        trigger, source, dest = (t["trigger"], t["source"], t["dest"]) if isinstance(t, dict) else t[:3]
        out.append((trigger, source if isinstance(source, list) else [source], dest))
    return out


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
    return "\n".join(f"| `{trigger}` | {', '.join(sources)} | {dest} | {DECIDED_BY[trigger]} |" for trigger, sources, dest in rows())
