import numpy as np
import pytest
import torch

from vllm_eplb.core.placement import Topology
from vllm_eplb.core.transfer import plan_layer
from vllm_eplb.core.transfer.backend import TransferHandle
from vllm_eplb.core.transfer.engine import TransferEngine


def simulate(old, new, topo, dim=3):
    """Execute a layer plan for every rank in one process; return per-rank slot contents."""
    plan = plan_layer(0, np.array(old), np.array(new), topo)
    n = topo.slots_per_rank
    weights = [torch.tensor([[float(old[r * n + i])] * dim for i in range(n)]) for r in range(topo.num_ranks)]
    received = {}
    for t in plan.transfers:
        for e, s in zip(t.experts, t.src_slots):
            assert weights[t.src][s][0].item() == e, "sender does not hold the expert it sends"
            received[(t.dst, e)] = weights[t.src][s].clone()
    for r in range(topo.num_ranks):
        part = plan.part(r)
        local = {e: weights[r][s].clone() for e, s in part.local_sources.items()}
        for slot, e in part.writes.items():
            weights[r][slot] = local[e] if e in local else received[(r, e)]
    return plan, weights


@pytest.mark.parametrize("seed", range(20))
def test_plan_reaches_new_placement(seed):
    rng = np.random.default_rng(seed)
    topo = Topology(4, 8, 12)
    old = np.concatenate([rng.permutation(8), rng.integers(0, 8, 4)])
    new = np.concatenate([rng.permutation(8), rng.integers(0, 8, 4)])
    plan, weights = simulate(old.tolist(), new.tolist(), topo)
    got = np.concatenate([w[:, 0].numpy() for w in weights]).astype(int)
    assert got.tolist() == new.tolist()


def test_local_copy_instead_of_transfer():
    topo = Topology(2, 4, 6)
    # rank 0 holds 0,1,2 ; wants 2,0,1 : pure local permutation, nothing crosses ranks
    plan = plan_layer(0, np.array([0, 1, 2, 3, 0, 1]), np.array([2, 0, 1, 3, 0, 1]), topo)
    assert plan.transfers == []
    assert plan.part(0).local_sources == {2: 2, 0: 0, 1: 1}


def test_expert_needed_twice_is_received_once():
    topo = Topology(2, 4, 8)
    # rank 1 wants a second copy of 3, which it holds: a local copy, nothing crosses ranks
    plan = plan_layer(0, np.array([0, 1, 2, 3, 0, 1, 2, 3]), np.array([0, 1, 2, 3, 0, 1, 3, 3]), topo)
    assert plan.transfers == []
    # rank 1 wants expert 0 in two slots and holds none: one transfer carries it once
    plan = plan_layer(0, np.array([0, 1, 2, 3, 3, 3, 3, 3]), np.array([0, 1, 2, 3, 0, 0, 3, 3]), topo)
    assert [(t.src, t.dst, t.experts) for t in plan.transfers] == [(0, 1, (0,))]
    assert plan.part(1).writes == {0: 0, 1: 0}


def test_sources_are_spread_over_replicas():
    topo = Topology(4, 2, 8)
    # expert 0 on ranks 0 and 1; ranks 2 and 3 each need it: one from each holder
    old = [0, 1, 0, 1, 1, 1, 1, 1]
    new = [0, 1, 0, 1, 0, 1, 0, 1]
    plan = plan_layer(0, np.array(old), np.array(new), topo)
    srcs = sorted(t.src for t in plan.transfers)
    assert srcs == [0, 1]


def test_engine_commit_with_local_swap():
    """Swapping two slots on one rank needs the snapshot: without it one expert is lost."""
    topo = Topology(1, 2, 2)
    plan = plan_layer(0, np.array([0, 1]), np.array([1, 0]), topo)
    w = torch.tensor([[0.0], [1.0]])

    class NoTraffic(TransferHandle):
        def done(self):
            return True

        def wait(self):
            return {}

        @property
        def staging_bytes(self):
            return 0

    class Backend:
        name = "none"

        def start(self, jobs, rank):
            return NoTraffic()

    eng = TransferEngine(Backend(), lambda layer: [w], 0)
    step = eng.start([plan])
    eng.finish(step)
    eng.commit(step)
    assert w[:, 0].tolist() == [1.0, 0.0]


def test_transfers_rotated_by_rank_distance():
    """Rank r receives from r+1, r+2, ... in that order and sends to r-1, r-2, ...: in
    each position of the order, every rank has at most one peer each way."""
    from vllm_eplb.core.transfer.plan import rounds

    rng = np.random.default_rng(3)
    topo = Topology(4, 16, 16)
    for _ in range(10):
        old, new = rng.permutation(16), rng.permutation(16)
        plan = plan_layer(0, old, new, topo)
        for r in range(4):
            part = plan.part(r)
            assert [(t.src - r) % 4 for t in part.recvs] == sorted((t.src - r) % 4 for t in part.recvs)
            assert [(r - t.dst) % 4 for t in part.sends] == sorted((r - t.dst) % 4 for t in part.sends)
        rs = rounds(plan, 4)
        assert sum(len(x) for x in rs) == len(plan.transfers)
        for x in rs:
            assert len({t.src for t in x}) == len(x) and len({t.dst for t in x}) == len(x)


def test_pack_rows_and_copy_rows():
    from vllm_eplb.core.transfer.backend import pack_rows

    w = torch.arange(24.0).view(6, 4)
    slots = [4, 0, 1, 2, 5]
    assert torch.equal(pack_rows(w, slots), w[slots])
    assert pack_rows(w, []).shape == (0, 4)


def test_routing_maps_stage_then_apply():
    """stage_layer computes (and may fail) without touching the maps; apply copies in place."""
    from vllm_eplb.core.placement import default_placement
    from vllm_eplb.core.routing_maps import RoutingMaps

    topo = Topology(2, 4, 6)
    maps = RoutingMaps.allocate(default_placement(topo, 2), topo)
    before = [t.clone() for t in (maps.phy2log, maps.log2phy, maps.replica_count)]
    ptrs = [t.data_ptr() for t in (maps.phy2log, maps.log2phy, maps.replica_count)]
    staged = maps.stage_layer(1, np.array([3, 3, 0, 1, 2, 0]), topo)
    assert all(torch.equal(a, b) for a, b in zip(before, (maps.phy2log, maps.log2phy, maps.replica_count)))
    maps.apply(staged)
    assert [t.data_ptr() for t in (maps.phy2log, maps.log2phy, maps.replica_count)] == ptrs
    assert maps.phy2log[1].tolist() == [3, 3, 0, 1, 2, 0]
    assert maps.replica_count[1].tolist() == [2, 1, 1, 2]
    assert maps.log2phy[1, 3].tolist()[:2] == [0, 1]
    assert torch.equal(maps.phy2log[0], before[0][0])
    with pytest.raises(ValueError):
        maps.stage_layer(0, np.array([0, 0, 0, 0, 1, 2]), topo)  # 4 replicas, the map holds 3
    with pytest.raises(ValueError):
        maps.stage_layer(2, np.array([0, 1, 2, 3, 0, 1]), topo)
    assert torch.equal(maps.phy2log[0], before[0][0])


def test_chunked_copy(monkeypatch):
    from vllm_eplb.core.transfer import gloo

    monkeypatch.setattr(gloo, "COPY_CHUNK_BYTES", 40)
    src = torch.arange(60, dtype=torch.float32).view(3, 20)
    dst = torch.zeros_like(src)
    gloo._chunked_copy(dst, src)
    assert torch.equal(dst, src)


def test_auto_picks_per_pair():
    from vllm_eplb.core.transfer.select import pair_backend

    topo = Topology(4, 8, 8, ranks_per_node=2)
    assert pair_backend(topo, 0, 1) == "cuda_ipc"  # same node: IPC measured fastest
    assert pair_backend(topo, 1, 2) == "nccl"  # across nodes: no IPC
    assert pair_backend(topo, 0, 1, "cpu") == "gloo"
    assert pair_backend(Topology(8, 8, 8), 0, 7) == "cuda_ipc"  # one node, shared GPUs too


def test_staging_arena_carves_views_and_takes_regions_back():
    """Staging reserved at start-up: one region per step in flight, views carved in order
    and aligned, a full region or no free region falls back to a fresh allocation, and a
    region serves a later step once released."""
    from vllm_eplb.core.transfer.backend import STAGING_ALIGN, StagingArena, staging_tensor

    arena = StagingArena()
    arena.reserve(torch.device("cpu"), steps=2, region_bytes=1000)
    assert arena.reserved_bytes == 2 * 1024  # regions padded to STAGING_ALIGN
    a, b = arena.acquire(None), arena.acquire(None)
    assert a is not b and arena.acquire(None) is None and arena.fallbacks == 1
    x, x_new = staging_tensor(a, (10, 5), torch.float32, "cpu")
    y, y_new = staging_tensor(a, (3,), torch.int64, "cpu")
    assert not x_new and not y_new
    assert y.data_ptr() - x.data_ptr() == STAGING_ALIGN  # 200 bytes, padded
    x.fill_(1.0)
    y.fill_(7)
    assert x.sum().item() == 50.0 and y.tolist() == [7, 7, 7]  # views do not overlap
    z, z_new = staging_tensor(a, (100, 5), torch.float32, "cpu")  # 2000 bytes: no room
    assert z_new and z.shape == (100, 5)
    assert not (a.buf.data_ptr() <= z.data_ptr() < a.buf.data_ptr() + a.buf.numel())
    a.release()
    c = arena.acquire(None)
    assert c is a and c.off == 0
    assert staging_tensor(c, (10, 5), torch.float32, "cpu")[0].data_ptr() == x.data_ptr()


def test_engine_commit_releases_the_steps_staging():
    from vllm_eplb.core.transfer.backend import StagingArena, staging_tensor

    topo = Topology(2, 2, 2)
    plan = plan_layer(0, np.array([0, 1]), np.array([1, 1]), topo)  # rank 0 receives expert 1
    arena = StagingArena()
    arena.reserve(torch.device("cpu"), steps=1, region_bytes=4096)
    w = torch.tensor([[0.0, 0.0]])

    class Staged(TransferHandle):
        def __init__(self, region):
            self._region = region
            self.buf, _ = staging_tensor(region, (1, 2), torch.float32, "cpu")
            self.buf.fill_(1.0)

        def done(self):
            return True

        def wait(self):
            return {(0, 1): [self.buf[0]]}

        @property
        def staging_bytes(self):
            return 8

    class Backend:
        name = "staged"

        def start(self, jobs, rank):
            return Staged(arena.acquire(None))

    eng = TransferEngine(Backend(), lambda layer: [w], 0)
    step = eng.start([plan])
    assert arena.regions[0].busy
    eng.finish(step)
    assert arena.regions[0].busy  # finished, not committed: the commit still reads it
    eng.commit(step)
    assert w[0].tolist() == [1.0, 1.0] and not arena.regions[0].busy
