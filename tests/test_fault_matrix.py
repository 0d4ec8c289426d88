"""The fault matrix (vllm_eplb/harness/matrix.py): every fault on one rank of 2 and of
4 ranks, at the state or phase it hits. Each scenario checks on every pass that maps
agree across ranks, every slot holds the expert its map names and probe outputs never
change; that no pass waits in the balancer past agreement_timeout_s (plus a margin);
that every rank went through the same transitions at the same passes; and that the
cycle ended as the matrix says (completed, aborted everywhere then resumed, or
disabled everywhere with the same reason)."""

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
    problems = verdict(scenario, results[scenario.name])
    assert not problems, f"{scenario.name} on rank 1 of {ranks}:\n" + "\n".join(problems)
