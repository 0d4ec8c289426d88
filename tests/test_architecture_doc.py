"""docs/architecture.md's tables checked against the code: the fault-matrix tables (a
measured run, pasted between the MATRIX markers) list every scenario of
vllm_eplb/harness/matrix.py on every world it runs on, with the rank, the phase and the
outcome the scenario declares, and nothing else; the transfer backends' table names every
backend of core/transfer/select.py; the fault model's table names every fault and reason of
core/faults.py that ends a cycle or rebalancing, and no label the code does not have. (The transition table and the diagram are generated:
tests/test_diagram.py.)"""

from pathlib import Path

from vllm_eplb.harness.matrix import SCENARIOS, declared

DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"


def _tables() -> dict[int, list[list[str]]]:
    block = DOC.read_text().split("<!-- BEGIN MATRIX -->")[1].split("<!-- END MATRIX -->")[0]
    out: dict[int, list[list[str]]] = {}
    world = None
    for line in block.splitlines():
        if line.startswith("| fault ("):
            world = int(line.split("(")[1].split()[0])
            out[world] = []
        elif line.startswith("| ") and world is not None:
            out[world].append([c.strip() for c in line.strip("|").split("|")])
    return out


def test_doc_matrix_lists_every_declared_scenario():
    tables = _tables()
    assert sorted(tables) == [2, 4], "the doc shows the 2- and 4-rank tables"
    for world, rows in tables.items():
        want = [declared(s) for s in SCENARIOS if world in s.worlds]
        have = [row[:4] for row in rows]
        assert have == want, f"{world}-rank table differs from matrix.SCENARIOS: rerun python -m vllm_eplb.harness.matrix"
        assert all(row[-1] == "ok" for row in rows), f"{world}-rank table shows a failed row"


def test_doc_backend_table_names_every_backend_and_its_device():
    """The Transfer section's table has one row per backend of core/transfer/select.py, and
    says GPU for each one that needs CUDA."""
    from vllm_eplb.core.transfer.select import BACKENDS, NEEDS

    text = DOC.read_text()
    block = text.split("| backend | where | how |")[1].split("\n\n")[0]
    rows = {line.split("|")[1].strip().strip("`"): line.split("|")[2] for line in block.splitlines()[2:] if line.startswith("| `")}
    assert sorted(rows) == sorted(BACKENDS)
    for name, device in NEEDS.items():
        if device == "cuda":
            assert "GPU" in rows[name] and "CPU" not in rows[name], (name, rows[name])


def test_doc_fault_model_names_every_fault_and_reason():
    """The fault model's table (section "Faults") has a row leaving each label a cycle can
    end with (core/faults.py: every Fault, every Reason but the skip), and each label it
    names in its "leaves" column is one the code reports (or a config key)."""
    import re
    from vllm_eplb.core.config import BalancerConfig
    from vllm_eplb.core.faults import Fault, Reason

    text = DOC.read_text().split("| fault | detected by | how fast | leaves |")[1]
    rows = [line for line in text.splitlines()[2:]]
    rows = rows[: next(i for i, line in enumerate(rows) if not line.startswith("|"))]
    leaves = {t for line in rows for t in re.findall(r"`([a-z_]+)`", line.strip("|").split(" | ")[-1])}
    labels = {f.label for f in Fault if f is not Fault.NONE} | {r.label for r in Reason if r is not Reason.INSUFFICIENT_IMPROVEMENT}
    assert labels - leaves == set(), f"faults with no row in docs/architecture.md's fault model: {sorted(labels - leaves)}"
    keys = set(BalancerConfig.model_fields)
    assert leaves - labels - keys == set(), f"labels the code does not report: {sorted(leaves - labels - keys)}"
