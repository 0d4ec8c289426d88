"""The fault matrix (vllm_eplb/harness/matrix.py): every fault on 2 and on 4 ranks (rank 1,
or rank 0, two ranks at once, a rank with nothing to send), at the state or phase it hits.
Each scenario checks right before every forward pass that maps agree across ranks, every
slot holds the expert its map names and probe outputs never change; that no pass waits in
the balancer past agreement_timeout_s (plus a margin); that every rank went through the
same transitions at the same passes; that a phase-timed fault fired; and that the cycle
ended as the matrix says (completed, aborted everywhere then resumed, disabled everywhere
with the same reason, or refused at start-up naming the key and ranks)."""

from __future__ import annotations

import pytest

from vllm_eplb.harness.matrix import SCENARIOS, run_matrix, verdict

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=[2, 4], ids=lambda n: f"{n}ranks")
def matrix(request):
    return request.param, run_matrix(request.param)


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.name.replace(" ", "_"))
def test_fault(matrix, scenario):
    ranks, results = matrix
    if ranks not in scenario.worlds:
        pytest.skip(f"runs on {scenario.worlds} ranks only")
    problems = verdict(scenario, results[scenario.name])
    assert not problems, f"{scenario.name} on {ranks} ranks:\n" + "\n".join(problems)
