"""Stop the world: the rig's baseline strategy, upstream vLLM's synchronous EPLB. At the
window's end, in one pass: the window's load all-reduced, a plan made in the forward loop,
every layer moved (blocking: `Balancer.rebalance_now`, each layer's data in on every rank
before any rank overwrites a slot). The balancer's own cycle is what it is measured against.

Every rank calls `rebalance` at the same pass. Nothing here synchronizes the device beyond
what the copies themselves do: the caller times the pass as it times the others.
"""

from __future__ import annotations

import numpy as np
import torch.distributed as dist

from vllm_eplb.core import Balancer
from vllm_eplb.core.placement import physical_to_logical_load
from vllm_eplb.core.planner import make_plan
from vllm_eplb.core.policies import Policy


def rebalance(balancer: Balancer, policy: Policy, group) -> int:
    """Stop recording load, all-reduce the window's load over `group` (gloo), plan with
    `policy` on the placement in force, move every layer to it. Returns the layers moved."""
    layout = balancer.layout
    if layout.record_flag is not None:
        layout.record_flag.fill_(False)
    load = layout.pass_load.cpu()
    dist.all_reduce(load, group=group)
    current = layout.maps.phy2log.cpu().numpy()
    logical = physical_to_logical_load(load.numpy().astype(np.float64), current, balancer.topo.num_logical)
    plan = make_plan(policy, logical, current.copy(), balancer.topo)
    return balancer.rebalance_now(plan.placement)
