"""What a placement costs per forward pass: the cost model the default policy plans with and the
balancer reports (the predicted straggler time).

Every MoE layer of a pass waits for its slowest rank. A rank's expert time in one layer is
modelled as

    token_seconds x tokens routed to the rank  +  read_seconds x replicas on the rank that get >= 1 token

the first term the GEMMs' arithmetic, the second one read of an expert's weights per activated
replica (docs/benchmarks.md section 5: at decode sizes an expert costs a read of its weights
whatever its token count). An expert of t tokens per pass spread evenly over c replicas gives
each t / c; with tokens arriving independently a replica is activated with probability
1 - exp(-t / c). The predicted straggler time per pass is the sum over layers of the slowest
rank's time.

Calibration (`for_expert`), from figures measured on one H200 with DeepSeek-V3 expert shapes
(hidden 7168, inter 2048, bf16: 44M parameters, 88 MB):
  token_seconds  2 x params / expert_tflops; 100 TFLOPS is the slope of the measured expert
                 time between 256 and 1024 tokens (0.87 us per token-choice, benchmarks.md 5)
  read_seconds   bytes / read_gbps; 4800 GB/s, H200 HBM (DESIGN.md): 18 us per 88 MB expert.
                 (The synthetic EP group's eager timings cannot separate reads from their fixed
                 per-layer overhead; benchmarks/dispatch_balance.py fits both per rank on a GPU.)
  move_seconds   pass time lost per moved slot: bytes / move_gbps; 1300 GB/s is the 250 GB/s
                 of a NVLink peer copy divided by the 19% it slowed concurrent matmuls
                 (DESIGN.md, 2026-11-23)
A moved slot pays for itself when it cuts the layer's slowest rank by move_seconds /
horizon_passes per pass, the horizon being the passes until the next plan (step_interval).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# the calibration above; the config keys of the same names default to these
EXPERT_TFLOPS = 100.0
READ_GBPS = 4800.0
MOVE_GBPS = 1300.0


@dataclass(frozen=True)
class CostModel:
    token_seconds: float  # one token-choice through one expert
    read_seconds: float  # one read of an expert's weights (a replica that gets >= 1 token)
    move_seconds: float  # pass time lost to moving one expert slot
    horizon_passes: int = 3000  # passes a plan stays in force (step_interval)

    @classmethod
    def for_expert(
        cls, expert_bytes: float, expert_params: float, horizon_passes: int = 3000, expert_tflops: float = EXPERT_TFLOPS,
        read_gbps: float = READ_GBPS, move_gbps: float = MOVE_GBPS,
    ) -> "CostModel":
        return cls(
            token_seconds=2.0 * expert_params / (expert_tflops * 1e12),
            read_seconds=expert_bytes / (read_gbps * 1e9),
            move_seconds=expert_bytes / (move_gbps * 1e9),
            horizon_passes=max(1, int(horizon_passes)),
        )

    def replica_seconds(self, tokens_per_pass: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """Seconds per pass of one replica of each expert: tokens_per_pass / counts tokens,
        activated with probability 1 - exp(-that)."""
        t = tokens_per_pass / np.maximum(counts, 1)
        return self.token_seconds * t - self.read_seconds * np.expm1(-t)

    def move_penalty(self) -> float:
        """Seconds per pass a moved slot must save on a layer's slowest rank to pay for itself."""
        return self.move_seconds / self.horizon_passes

    def rank_seconds(self, placement: np.ndarray, logical_load: np.ndarray, passes: float, num_ranks: int) -> np.ndarray:
        """(layers, ranks) predicted expert seconds per pass; logical_load summed over `passes`."""
        layers, slots = placement.shape
        counts = np.zeros(logical_load.shape, dtype=np.int64)
        np.add.at(counts, (np.repeat(np.arange(layers), slots), placement.reshape(-1)), 1)
        per = self.replica_seconds(logical_load / max(passes, 1e-12), counts)
        return np.take_along_axis(per, placement, axis=1).reshape(layers, num_ranks, -1).sum(axis=2)

    def straggler_seconds(self, placement: np.ndarray, logical_load: np.ndarray, passes: float, num_ranks: int) -> float:
        """Predicted MoE expert time per pass: sum over layers of the slowest rank's."""
        return float(self.rank_seconds(placement, logical_load, passes, num_ranks).max(axis=1).sum())


def expert_size(weights: list) -> tuple[int, int]:
    """(bytes, parameters) of one expert slot from a layer's expert tensors, each (local slots, ...)."""
    nbytes = sum(w[0].numel() * w.element_size() for w in weights)
    params = sum(w[0].numel() for w in weights)
    return int(nbytes), int(params)
