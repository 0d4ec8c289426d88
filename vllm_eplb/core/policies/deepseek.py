"""`deepseek`: DeepSeek's hierarchical expert-parallel load balancer.

The algorithm of https://github.com/deepseek-ai/eplb (also vLLM's default policy),
written here on numpy and vectorized across layers:

1. pack expert groups onto nodes, balancing tokens per node (groups stay whole, so
   group-limited routing keeps its traffic inside a node);
2. within each node, give redundant slots to the experts with the highest load per
   replica;
3. within each node, pack the physical experts onto its GPUs, heaviest first onto the
   lightest GPU.

When the groups do not divide over the nodes it falls back to the global policy (one
group, one node). Slots within a GPU are then chosen to keep experts where they were.
"""

from __future__ import annotations

import numpy as np

from .base import PlanInput, Policy, keep_in_place, register_policy
from .primitives import balanced_packing, inverse, replicate_with_order


def hierarchical(weight: np.ndarray, num_physical: int, num_groups: int, num_nodes: int, num_gpus: int) -> np.ndarray:
    """(layers, num_physical) placement. weight: (layers, logical)."""
    layers, num_logical = weight.shape
    for cond, msg in (
        (num_logical % num_groups == 0, f"{num_logical} experts do not split into {num_groups} groups"),
        (num_groups % num_nodes == 0, f"{num_groups} groups do not spread over {num_nodes} nodes"),
        (num_gpus % num_nodes == 0, f"{num_gpus} GPUs do not spread over {num_nodes} nodes"),
        (num_physical % num_gpus == 0, f"{num_physical} slots do not divide over {num_gpus} GPUs"),
    ):
        if not cond:
            raise ValueError(msg)
    group_size = num_logical // num_groups
    groups_per_node = num_groups // num_nodes
    slots_per_gpu = num_physical // num_gpus
    logical_per_node = num_logical // num_nodes

    # 1. groups -> nodes; renumber experts so each node's experts are contiguous ("mlog")
    group_tokens = weight.reshape(layers, num_groups, group_size).sum(axis=-1)
    group_node, group_rank = balanced_packing(group_tokens, num_nodes)
    log2mlog = (
        ((group_node * groups_per_node + group_rank)[..., None] * group_size) + np.arange(group_size, dtype=np.int64)
    ).reshape(layers, num_logical)
    mlog2log = inverse(log2mlog)

    # 2. replicas within each node (rows: layer x node)
    mlog_tokens = np.take_along_axis(weight, mlog2log, axis=1).reshape(-1, logical_per_node)
    phy2mlog, mlog_count = replicate_with_order(mlog_tokens, num_physical // num_nodes)

    # 3. physical experts -> GPUs within each node
    phy_tokens = np.take_along_axis(mlog_tokens / mlog_count, phy2mlog, axis=1)
    gpu, rank_in_gpu = balanced_packing(phy_tokens, num_gpus // num_nodes)
    pphy2phy = inverse(gpu * slots_per_gpu + rank_in_gpu)
    pphy2mlog = np.take_along_axis(phy2mlog, pphy2phy, axis=1)
    node_offset = np.arange(0, num_logical, logical_per_node, dtype=np.int64)[None, :, None]
    pphy2mlog = (pphy2mlog.reshape(layers, num_nodes, -1) + node_offset).reshape(layers, -1)
    return np.take_along_axis(mlog2log, pphy2mlog, axis=1)


def deepseek_placement(weight: np.ndarray, num_physical: int, num_groups: int, num_nodes: int, num_gpus: int) -> np.ndarray:
    if num_groups % num_nodes == 0:
        return hierarchical(weight, num_physical, num_groups, num_nodes, num_gpus)
    return hierarchical(weight, num_physical, 1, 1, num_gpus)


@register_policy("deepseek")
class DeepSeekPolicy(Policy):
    def place(self, inp: PlanInput) -> np.ndarray:
        t = inp.topo
        new = deepseek_placement(inp.logical_load, t.num_physical, t.num_groups, t.num_nodes, t.num_ranks)
        return keep_in_place(new, inp.current, t.slots_per_rank)
