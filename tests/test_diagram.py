"""The state diagram in docs/architecture.md is the table in core/state_machine.py."""

import subprocess
import sys

import pytest
from transitions.extensions import HierarchicalMachine

from vllm_eplb.core import state_machine as sm
from vllm_eplb.tools import diagram


def test_doc_diagram_matches_the_table():
    have = diagram.in_doc(diagram.DOC.read_text())
    assert have is not None, "docs/architecture.md lost its state-diagram markers"
    assert have == diagram.block(diagram.from_module()), "run: python -m vllm_eplb.tools.diagram --write"


def test_every_transition_of_the_table_is_drawn():
    text = diagram.from_module()
    for trigger, *_ in (t if isinstance(t, list) else [t["trigger"]] for t in sm.TRANSITIONS):
        assert f": {trigger}" in text, trigger


def test_check_fails_on_a_stale_doc_and_write_fixes_it(tmp_path):
    doc = tmp_path / "architecture.md"
    stale = diagram.block(diagram.from_module()).replace(": finish", ": finished")
    doc.write_text(f"# doc\n\n{stale}\n\ntext after\n")
    run = lambda *a: subprocess.run([sys.executable, "-m", "vllm_eplb.tools.diagram", *a, "--doc", str(doc)], capture_output=True, text=True)
    r = run("--check")
    assert r.returncode == 1 and "differs" in r.stderr
    assert run("--write").returncode == 0
    assert run("--check").returncode == 0
    assert doc.read_text().endswith("\n\ntext after\n")  # only the block changed


def test_missing_markers_is_one_line(tmp_path):
    doc = tmp_path / "a.md"
    doc.write_text("# no markers\n")
    r = subprocess.run([sys.executable, "-m", "vllm_eplb.tools.diagram", "--check", "--doc", str(doc)], capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "markers" in r.stderr


NESTED_STATES = [
    "idle",
    "collecting",
    {"name": "planning", "children": ["submit", "wait"], "initial": "submit"},
    "syncing",
    "transferring",
]
NESTED_TRANSITIONS = [
    ["start_collecting", "idle", "collecting"],
    ["start_planning", "collecting", "planning"],
    ["submitted", "planning_submit", "planning_wait"],
    {"trigger": "plan_agreed", "source": "planning_wait", "dest": "syncing"},
    ["start_transfer", "syncing", "transferring"],
    ["next_layer", "transferring", "="],
    ["finish", "transferring", "idle"],
    ["abort", ["collecting", "planning", "syncing", "transferring"], "idle"],
]


def test_nested_states_are_drawn_as_composites():
    """The shape the lead's restructured table will take: `transitions` must accept it as is,
    and the diagram nests the children and addresses them by "parent_child"."""
    class M:
        pass

    m = M()
    HierarchicalMachine(model=m, states=NESTED_STATES, transitions=NESTED_TRANSITIONS, initial="idle", auto_transitions=False)
    m.start_collecting()
    m.start_planning()
    assert m.state == "planning_submit"  # the library's own reading of the same table
    text = diagram.mermaid(NESTED_STATES, NESTED_TRANSITIONS)
    assert 'state planning {\n        [*] --> planning_submit\n        state "submit" as planning_submit' in text
    assert "    planning_submit --> planning_wait: submitted" in text
    assert "    planning_wait --> syncing: plan_agreed" in text
    assert "    transferring --> transferring: next_layer" in text
    assert "    planning --> idle: abort" in text


def test_a_transition_to_an_undeclared_state_is_an_error():
    with pytest.raises(ValueError, match="'planning_nowhere'"):
        diagram.mermaid(NESTED_STATES, [["x", "planning", "planning_nowhere"]])


def test_arrows_carry_what_decides_each_trigger():
    decided = getattr(sm, "DECIDED_BY", None)
    if not decided:
        pytest.skip("this state_machine.py exports no DECIDED_BY column")
    text = diagram.from_module()
    for trigger, why in decided.items():
        assert f": {trigger} — {why.replace(';', ',')}\n" in text, trigger
    assert ";" not in text.split("\n", 1)[1]  # a ';' would end the Mermaid statement early
