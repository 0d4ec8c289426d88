"""Every expert slot's fingerprint, on demand, from a running server: did a weight update
land where the maps say?

`slot_fingerprints(worker)` runs in a worker (`LLM.collective_rpc(slot_fingerprints)`, or
by name through the worker extension `SlotRpc`: `vllm serve ... --worker-extension-cls
vllm_eplb.integration.slot_rpc.SlotRpc`, then `collective_rpc("eplb_slot_fingerprints")`,
over HTTP `POST /collective_rpc` with VLLM_SERVER_DEV_MODE=1). It returns, for the worker's
expert-parallel rank, its slots, the placement in force (physical slot -> logical expert,
per MoE layer) and each slot's fingerprint (core/slot_check.fingerprints: exact integer sums
of the bytes of every tensor the layer gives per expert, scales and biases included). With
EPLB off the placement is vLLM's start-up one. `check_slots` compares a server's answer with
a reference (another server's, one fresh from the same checkpoint with EPLB off): one read
of every expert weight per rank, no cross-rank traffic, nothing on the forward passes.
"""

from __future__ import annotations

import numpy as np


def slot_fingerprints(worker) -> dict:
    from vllm.distributed.parallel_state import get_ep_group

    from vllm_eplb.core.placement import Topology, default_placement
    from vllm_eplb.core.slot_check import fingerprints

    from .moe_model import mixture_of_experts_model
    from .runner_state import VllmEplbState

    state = getattr(worker.model_runner, "eplb_state", None)  # the runner state balancing this worker's model
    balancer = state.balancer if isinstance(state, VllmEplbState) else None
    if balancer is not None:
        rank, topo, placement = balancer.comm.rank, balancer.topo, balancer.placement
        weights = [balancer.layout.weights_of(layer) for layer in range(balancer.layout.num_layers)]
    else:  # EPLB off: vLLM's start-up layout
        model = mixture_of_experts_model(worker.model_runner.get_model())
        ep = get_ep_group()
        rank = ep.rank_in_group
        layers = list(model.moe_layers)
        topo = Topology(ep.world_size, model.num_logical_experts, model.num_physical_experts)
        placement = default_placement(topo, len(layers))
        weights = [list(layer.get_expert_weights()) for layer in layers]
    return {
        "rank": rank,
        "slots": list(topo.rank_slots(rank)),
        "placement": np.asarray(placement).tolist(),
        "fingerprints": [fingerprints(ws).cpu().tolist() for ws in weights],
    }


def every_rank_slot_fingerprints(worker) -> list[dict]:
    """`slot_fingerprints` of every rank of this worker's expert-parallel group, gathered over
    vLLM's EP CPU group: collective, so every engine of the group must run it (vLLM's
    collective_rpc does, data-parallel engines included, but returns the first engine's answer
    only: this is how a data-parallel or multi-host deployment's ranks are all read over HTTP).
    Run between forward passes (no request in flight), when no other collective of that group runs."""
    import torch.distributed as dist
    from vllm.distributed.parallel_state import get_ep_group

    ep = get_ep_group()
    answers: list = [None] * ep.world_size
    dist.all_gather_object(answers, slot_fingerprints(worker), group=ep.cpu_group)
    return answers


class SlotRpc:
    """Worker extension (--worker-extension-cls): `slot_fingerprints` as an RPC by name."""

    def eplb_slot_fingerprints(self) -> dict:
        return slot_fingerprints(self)

    def eplb_every_rank_slot_fingerprints(self) -> list[dict]:
        return every_rank_slot_fingerprints(self)


def expert_fingerprints(answers: list[dict]) -> dict[tuple[int, int], list[int]]:
    """{(layer, logical expert): fingerprint} from every rank's answer, each expert's first
    slot's (a reference, taken where every replica is known to be right)."""
    out: dict[tuple[int, int], list[int]] = {}
    for a in sorted(answers, key=lambda a: a["rank"]):
        for layer, rows in enumerate(a["fingerprints"]):
            for i, slot in enumerate(a["slots"]):
                out.setdefault((layer, a["placement"][layer][slot]), rows[i])
    return out


def check_slots(answers: list[dict], reference: dict[tuple[int, int], list[int]]) -> list[tuple[int, int, int, int]]:
    """(rank, layer, slot, expert the map names) of every slot whose fingerprint is not its
    expert's in `reference`."""
    bad = []
    for a in answers:
        for layer, rows in enumerate(a["fingerprints"]):
            for i, slot in enumerate(a["slots"]):
                expert = a["placement"][layer][slot]
                if rows[i] != reference.get((layer, expert)):
                    bad.append((a["rank"], layer, slot, expert))
    return bad
