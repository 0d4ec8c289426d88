"""The balance each forward pass sees, and what its stragglers cost.

Every MoE layer of a pass waits for the rank with the most tokens in that pass. The
window's balancedness (placement.balancedness_of on the window's summed load) is what a
plan can fix; a single pass is further off by however that pass's tokens fell. Figures
from per-pass per-rank loads (passes, layers, ranks), EP-group totals:

  pass balancedness    mean over passes of sum_l mean_r / sum_l max_r (passes that routed
                       no token are left out: nothing waited)
  window balancedness  the same ratio on the loads summed over the passes
  straggler share      the cost model: a layer's expert time grows with its most loaded
                       rank's tokens, so the share of MoE expert time spent waiting for
                       stragglers is sum_{p,l} (max_r - mean_r) / sum_{p,l} max_r
                       = 1 - sum_{p,l} mean_r / sum_{p,l} max_r (big passes weigh more, as
                       they take longer); the expected MoE time lost per pass is that share
                       of the pass's MoE time. It holds where expert GEMMs are
                       compute-bound (tokens per expert well above one GPU tile); at small
                       decode batches an expert's time is mostly reading its weights, and
                       balancing tokens buys less (benchmarks/dispatch_balance.py measures
                       both on a GPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PassFigures:
    passes: int  # passes that routed tokens
    pass_balancedness: float
    window_balancedness: float
    straggler_share: float


def pass_figures(loads: np.ndarray) -> PassFigures:
    """loads: (passes, layers, ranks) tokens each rank received in each layer of each pass."""
    loads = np.asarray(loads, dtype=np.float64)
    mean = loads.mean(axis=-1).sum(axis=-1)  # (passes,)
    top = loads.max(axis=-1).sum(axis=-1)
    busy = top > 0
    if not busy.any():
        nan = float("nan")
        return PassFigures(0, nan, nan, nan)
    summed = loads.sum(axis=0)
    window = float(summed.mean(axis=-1).sum() / summed.max(axis=-1).sum())
    return PassFigures(
        int(busy.sum()),
        float((mean[busy] / top[busy]).mean()),
        window,
        float(1.0 - mean.sum() / top.sum()),
    )
