"""`round-robin`: an example vllm-eplb placement policy, shipped as a plug-in.

1. Each redundant slot goes to the expert with the highest load per replica.
2. Replicas, heaviest first, are dealt to ranks in snake order (0, 1, .., R-1, R-1, .., 0,
   0, 1, ..): every rank gets the same number of slots and a mix of hot and cold replicas.
3. `keep_in_place` reorders each rank's slots so experts a rank already holds stay put
   (balance is the same; fewer bytes move).

The contract (vllm_eplb.core.policies.Policy): `place(inp)` gets the window's load per
logical expert `inp.logical_load` (layers, logical), the placement in force `inp.current`
(layers, physical) and the topology `inp.topo`, and returns the new placement, (layers,
physical) int64 of logical expert ids, every expert at least once per layer. It must be
deterministic (every rank plans on the same input and the plans are compared by digest)
and runs on the planner process, off the forward loop. The balancer builds the policy
with no arguments, except `tolerance` (eplb.json's `min_move_tolerance`) if __init__
takes a parameter of that name.
"""

from __future__ import annotations

import numpy as np

from vllm_eplb.core.policies import PlanInput, Policy, keep_in_place


class RoundRobinPolicy(Policy):
    def place(self, inp: PlanInput) -> np.ndarray:
        topo = inp.topo
        load = np.asarray(inp.logical_load, dtype=np.float64)
        rows = [self._layer(load[layer], topo.num_ranks, topo.slots_per_rank) for layer in range(load.shape[0])]
        return keep_in_place(np.stack(rows), inp.current, topo.slots_per_rank)

    @staticmethod
    def _layer(load: np.ndarray, num_ranks: int, slots_per_rank: int) -> np.ndarray:
        num_logical = load.shape[0]
        counts = np.ones(num_logical, dtype=np.int64)
        for _ in range(num_ranks * slots_per_rank - num_logical):
            # ties go to the lowest expert id (argmax), which keeps the plan deterministic
            counts[np.argmax(load / counts)] += 1
        experts = np.repeat(np.arange(num_logical), counts)
        weight = load[experts] / counts[experts]
        experts = experts[np.argsort(-weight, kind="stable")]
        # snake order: round r deals ranks forward when r is even, backward when odd
        out = np.empty((num_ranks, slots_per_rank), dtype=np.int64)
        for i, e in enumerate(experts):
            rnd, pos = divmod(i, num_ranks)
            rank = pos if rnd % 2 == 0 else num_ranks - 1 - pos
            out[rank, rnd] = e
        return out.reshape(-1)
