"""The cost model (core/cost_model.py) and the default policy planning with it."""

import math

import numpy as np
import pytest

from vllm_eplb.core.cost_model import CostModel
from vllm_eplb.core.placement import Topology, default_placement, predicted_balancedness
from vllm_eplb.core.planner import make_plan
from vllm_eplb.core.policies import PlanInput, get_policy

# DeepSeek-V3's routed expert in bf16: 3 x 7168 x 2048 parameters
DSV3 = CostModel.for_expert(2 * 3 * 7168 * 2048, 3 * 7168 * 2048, horizon_passes=3000)


def test_calibration_from_the_measured_figures():
    assert DSV3.token_seconds == pytest.approx(0.88e-6, rel=0.01)  # 100 TFLOPS: the measured slope
    assert DSV3.read_seconds == pytest.approx(18.35e-6, rel=0.01)  # 88 MB at 4.8 TB/s
    assert DSV3.move_penalty() == pytest.approx(88.08e6 / 1.3e12 / 3000, rel=0.01)


def test_a_replica_costs_its_tokens_and_one_read_when_activated():
    t = np.array([0.0, 0.01, 100.0])
    got = DSV3.replica_seconds(t, np.array([1, 1, 1]))
    assert got[0] == 0.0  # never activated, no tokens
    # rarely activated: the read times the chance of at least one token
    assert got[1] == pytest.approx(0.01 * DSV3.token_seconds + (1 - math.exp(-0.01)) * DSV3.read_seconds)
    assert got[2] == pytest.approx(100 * DSV3.token_seconds + DSV3.read_seconds)
    # two replicas split the tokens and both read
    assert DSV3.replica_seconds(np.array([100.0]), np.array([2]))[0] == pytest.approx(50 * DSV3.token_seconds + DSV3.read_seconds)


def test_straggler_time_is_the_slowest_rank_summed_over_layers():
    topo = Topology(2, 3, 4)  # 2 slots per rank
    placement = np.array([[0, 1, 2, 0], [0, 1, 2, 1]])
    load = np.array([[400.0, 100.0, 300.0], [200.0, 200.0, 0.0]])  # over 100 passes
    per_rank = DSV3.rank_seconds(placement, load, 100, 2)
    one = lambda t, c: DSV3.replica_seconds(np.array([t]), np.array([c]))[0]  # noqa: E731
    assert per_rank[0] == pytest.approx([one(4, 2) + one(1, 1), one(3, 1) + one(4, 2)])
    assert per_rank[1] == pytest.approx([one(2, 1) + one(2, 2), one(0, 1) + one(2, 2)])
    assert DSV3.straggler_seconds(placement, load, 100, 2) == pytest.approx(per_rank.max(axis=1).sum())


def test_plan_reports_predicted_straggler_times():
    rng = np.random.default_rng(3)
    topo = Topology(8, 64, 80)
    load = rng.zipf(1.3, size=(4, 64)).astype(float) * 100
    plan = make_plan(get_policy("min-move", cost=DSV3), load, default_placement(topo, 4), topo, 50, DSV3)
    assert plan.current_seconds == pytest.approx(DSV3.straggler_seconds(default_placement(topo, 4), load, 50, 8))
    assert plan.predicted_seconds == pytest.approx(DSV3.straggler_seconds(plan.placement, load, 50, 8))
    assert plan.predicted_seconds < plan.current_seconds
    assert make_plan(get_policy("min-move"), load, default_placement(topo, 4), topo).predicted_seconds == 0.0


def test_at_decode_sizes_cost_plans_beat_token_plans_on_predicted_pass_time():
    """Few tokens per pass: most replicas read their weights for one or two tokens, so a plan
    balancing tokens leaves ranks with many more activated replicas than others; planning
    with the cost model cuts the predicted slowest rank."""
    rng = np.random.default_rng(0)
    topo = Topology(8, 64, 80)
    layers, passes = 4, 16
    pop = 1.0 / np.arange(1, 65) ** 1.2
    load = np.stack([rng.multinomial(16 * 8 * passes, rng.permutation(pop) / pop.sum()) for _ in range(layers)]).astype(float)
    start = default_placement(topo, layers)
    token = get_policy("min-move").place(PlanInput(load, start, topo))
    cost = get_policy("min-move", cost=DSV3).place(PlanInput(load, start, topo, passes))
    assert DSV3.straggler_seconds(cost, load, passes, 8) < DSV3.straggler_seconds(token, load, passes, 8)
    # and the token plan is the better one in tokens: they optimise different things
    assert predicted_balancedness(token, load, topo) >= predicted_balancedness(cost, load, topo) - 0.02
