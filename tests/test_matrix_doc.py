"""docs/architecture.md's fault-matrix tables (a measured run, pasted between the MATRIX
markers) list every scenario of vllm_eplb/harness/matrix.py on every world it runs on, with
the rank, the phase and the outcome the scenario declares, and nothing else."""

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
