import numpy as np
import pytest
import torch

from vllm_eplb.core.placement import (
    Topology,
    balancedness_of,
    default_placement,
    logical_to_physical,
    physical_to_logical_load,
    placement_digest,
    predicted_balancedness,
    rank_loads,
    replica_counts,
    validate_placement,
)
from vllm_eplb.core.routing_maps import RoutingMaps
from vllm_eplb.core.policies import PlanInput, get_policy, keep_in_place, policy_names


def test_default_placement_matches_vllm_layout():
    topo = Topology(num_ranks=2, num_logical=4, num_physical=6)
    p = default_placement(topo, 2)
    assert p.tolist() == [[0, 1, 2, 3, 0, 1]] * 2


def test_logical_to_physical_and_counts():
    p = np.array([[0, 1, 2, 3, 0, 1], [3, 3, 0, 1, 2, 0]])
    counts = replica_counts(p, 4)
    assert counts.tolist() == [[2, 2, 1, 1], [2, 1, 1, 2]]
    l2p = logical_to_physical(p, 4, 3)
    assert l2p[0, 0].tolist() == [0, 4, -1]
    assert l2p[1, 3].tolist() == [0, 1, -1]
    assert l2p[1, 0].tolist() == [2, 5, -1]
    with pytest.raises(ValueError, match="replicas"):
        logical_to_physical(np.array([[0, 0, 0, 1]]), 2, 2)


def test_routing_maps_write_in_place():
    topo = Topology(2, 4, 6)
    maps = RoutingMaps.allocate(default_placement(topo, 2), topo)
    ptr = maps.log2phy.data_ptr()
    maps.write_layer(1, np.array([3, 3, 0, 1, 2, 0]), topo)
    assert maps.log2phy.data_ptr() == ptr
    assert maps.phy2log[1].tolist() == [3, 3, 0, 1, 2, 0]
    assert maps.replica_count[1].tolist() == [2, 1, 1, 2]
    assert maps.phy2log[0].tolist() == [0, 1, 2, 3, 0, 1]


def test_balancedness():
    assert balancedness_of(np.array([[1.0, 1.0]])) == 1.0
    assert balancedness_of(np.array([[3.0, 1.0]])) == pytest.approx(2 / 3)  # mean 2, max 3
    # two layers: sum(mean) / sum(max) = (2 + 1) / (3 + 1)
    assert balancedness_of(np.array([[3.0, 1.0], [1.0, 1.0]])) == pytest.approx(3 / 4)
    assert balancedness_of(np.zeros((1, 2))) == 1.0


def test_rank_loads_split_over_replicas():
    topo = Topology(2, 2, 4)
    p = np.array([[0, 1, 0, 0]])  # expert 0 has 3 replicas
    loads = rank_loads(p, np.array([[30.0, 10.0]]), topo)
    assert loads.tolist() == [[20.0, 20.0]]


def test_physical_to_logical_load():
    p = np.array([[0, 1, 0, 1]])
    assert physical_to_logical_load(np.array([[1, 2, 3, 4]]), p, 2).tolist() == [[4.0, 6.0]]


def test_digest_distinguishes_and_fits_int64():
    a = np.array([[0, 1, 2, 3]])
    b = np.array([[1, 0, 2, 3]])
    assert placement_digest(a) == placement_digest(a.copy())
    assert placement_digest(a) != placement_digest(b)
    assert all(0 <= x < 2**31 for x in placement_digest(a))


def test_validate_placement_rejects_missing_expert():
    topo = Topology(2, 4, 4)
    with pytest.raises(ValueError, match="expert 3 has no physical slot"):
        validate_placement(np.array([[0, 1, 2, 2]]), topo)


def test_keep_in_place_keeps_experts_a_rank_already_holds():
    cur = np.array([[0, 1, 2, 3, 4, 5]])
    new = np.array([[1, 7, 0, 5, 3, 4]])  # rank 0 gets {0,1,7}, rank 1 {3,4,5}
    out = keep_in_place(new, cur, 3)
    assert out.tolist() == [[0, 1, 7, 3, 4, 5]]


@pytest.mark.parametrize("name", policy_names())
@pytest.mark.parametrize("seed", range(5))
def test_policies_valid_deterministic_and_improve(name, seed):
    rng = np.random.default_rng(seed)
    topo = Topology(num_ranks=4, num_logical=16, num_physical=20)
    load = rng.zipf(1.5, size=(6, 16)).astype(np.float64)
    cur = default_placement(topo, 6)
    policy = get_policy(name)
    new = policy.place(PlanInput(load, cur, topo))
    validate_placement(new, topo)
    assert np.array_equal(new, get_policy(name).place(PlanInput(load, cur, topo)))
    assert predicted_balancedness(new, load, topo) >= predicted_balancedness(cur, load, topo) - 1e-12


def test_unknown_policy_names_choices():
    with pytest.raises(ValueError, match="choose one of"):
        get_policy("nope")


def test_routing_maps_on_int32_tensors():
    topo = Topology(2, 4, 6)
    maps = RoutingMaps(
        torch.zeros((1, 6), dtype=torch.int64), torch.zeros((1, 4, 3), dtype=torch.int64), torch.zeros((1, 4), dtype=torch.int32)
    )
    maps.write_all(default_placement(topo, 1), topo)
    assert maps.replica_count.tolist() == [[2, 2, 1, 1]]


def test_architecture_doc_shows_the_transition_table():
    from pathlib import Path

    from vllm_eplb.core.state_machine import table_markdown

    doc = (Path(__file__).parents[1] / "docs" / "architecture.md").read_text()
    shown = doc.split("<!-- BEGIN TABLE -->\n")[1].split("<!-- END TABLE -->")[0].strip()
    assert shown == table_markdown(), "docs/architecture.md's transition table differs from core/state_machine.py"
