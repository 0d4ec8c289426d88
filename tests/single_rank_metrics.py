"""One rank of the real balancer (core, gloo, the rig's synthetic MoE) with the real metrics code, no vLLM:
prints the /metrics text its BalancerMetrics produce after a run. Used by test_status.py
for the failure paths a healthy server never takes.

    python tests/single_rank_metrics.py disable   # a bug in every planning tick: cycles end by the timeout path, suspended
    python tests/single_rank_metrics.py stall     # every plan fails: cycles abort, windows pile up
    python tests/single_rank_metrics.py mismatch  # two ranks, rank 1 with another layers_per_pass:
                                                  # refused at start-up (both ranks' /metrics text)
"""

import logging
import socket
import sys

import torch.distributed as dist
from prometheus_client import CollectorRegistry, generate_latest

from vllm_eplb.core import Balancer, BalancerConfig, Comm, MoELayout, Topology, new_gloo_group
from vllm_eplb.core.policies import Policy, get_policy
from vllm_eplb.core.transfer import GlooBackend
from vllm_eplb.harness.driver import Driver
from vllm_eplb.harness.synthetic_moe import DriftingWorkload, SyntheticMoE
from vllm_eplb.integration import metrics


class NeverPlans(Policy):
    def place(self, inp):
        raise RuntimeError("this policy never plans")


def main(mode: str, passes: int = 130) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    cfg = BalancerConfig(window_size=10, step_interval=20, agreement_lag=2, planner="thread", improvement_threshold=0.0)
    topo = Topology(1, 16, 16)
    model = SyntheticMoE.exact_model(topo, 4, 16, 2, 0, 0, 16)
    work = DriftingWorkload(16, 64, 16, 1.2, 0, 0)
    comm = Comm(0, 1, new_gloo_group([0], cfg.agreement_timeout_s), GlooBackend(new_gloo_group([0], 30)))
    policy = NeverPlans() if mode == "stall" else get_policy("greedy")
    driver = Driver()
    layout = MoELayout(topo, 4, model.pass_load, model.maps, model.weights_of)
    b = driver.balancer = Balancer(cfg, layout, comm, policy, clock=driver.clock(model.pass_counter))
    b.planner.ready.result()
    m = metrics.BalancerMetrics(0)
    m.update(b)  # as the integration does when the balancer starts

    def broken(p):
        raise RuntimeError("injected bug")

    for p in range(1, passes + 1):
        if mode == "disable" and p == 45:
            # from the next planning phase on, every phase tick raises: a bug that the
            # retry of the pass meets again: the rank cannot vote, its cycles end by the timeout path
            b._tick_round = broken
        with driver.forward_pass():  # the runner's contract: catch up, count the pass as it starts, run it, tick
            model.forward(work.batch(p))
            n = b.transitions_total
        m.update(b, b.transitions_total != n)
    reg = CollectorRegistry()
    for family in vars(metrics._families).values():
        reg.register(family)
    sys.stdout.write(generate_latest(reg).decode())
    b.shutdown()


def mismatch_rank(rank: int, world: int) -> str:
    """One of two ranks whose configs differ (layers_per_pass on rank 1): the /metrics text
    its BalancerMetrics produce once the balancer is built, as the integration updates them."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
    cfg = BalancerConfig(window_size=10, step_interval=20, planner="thread", layers_per_pass=1 + rank)
    topo = Topology(world, 16, 16)
    model = SyntheticMoE.exact_model(topo, 4, 16, 2, rank, 0, 16)
    group = new_gloo_group(list(range(world)), cfg.agreement_timeout_s)
    comm = Comm(rank, world, group, GlooBackend(new_gloo_group(list(range(world)), 30)))
    layout = MoELayout(topo, 4, model.pass_load, model.maps, model.weights_of)
    b = Balancer(cfg, layout, comm, get_policy("greedy"), clock=Driver().clock(model.pass_counter))
    m = metrics.BalancerMetrics(rank)
    m.update(b)
    reg = CollectorRegistry()
    for family in vars(metrics._families).values():
        reg.register(family)
    b.shutdown()
    return generate_latest(reg).decode()


if __name__ == "__main__":
    if sys.argv[1] == "mismatch":
        from vllm_eplb.harness.launcher import launch

        sys.stdout.write("".join(launch(mismatch_rank, 2, (), 120)))
    else:
        main(sys.argv[1])
