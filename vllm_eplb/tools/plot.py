"""Per-rank load before and after a plan, as a PNG (`dry_run --png`).

Top: load of each rank in each layer, as a share of that layer's mean (1.0 = perfect
balance), for the placement in force and for the plan, on one color scale, so hot ranks
that the plan cools are visible side by side. Bottom: balancedness (mean / max rank load)
per layer, before and after. A layer waits for its most loaded rank, so per layer, not
summed over layers: a sum hides ranks that are hot in different layers.

matplotlib is an optional dependency (`pip install 'vllm-eplb[plot]'`).
"""

from __future__ import annotations

import numpy as np

SIZE_IN = (10.0, 7.0)  # figure size in inches; at DPI the PNG is 1000 x 700 pixels
DPI = 100


class PlotUnavailable(RuntimeError):
    pass


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise PlotUnavailable("--png needs matplotlib: pip install 'vllm-eplb[plot]'") from None
    matplotlib.use("Agg")  # files only: no display on a server
    import matplotlib.pyplot as plt

    return plt


def balance_png(path: str, before: np.ndarray, after: np.ndarray, title: str) -> tuple[int, int]:
    """Write the figure for (layers, ranks) loads before and after; returns (width, height) px."""
    plt = _pyplot()
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.ticker import MaxNLocator

    layers, ranks = before.shape
    mean = before.mean(axis=1, keepdims=True)  # the same tokens before and after
    mean[mean == 0] = 1.0
    rel0, rel1 = before / mean, after / mean
    # diverging around 1.0 (balanced, white): red ranks hold more than their share, blue less
    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=max(1.5, float(rel0.max()), float(rel1.max())))
    fig = plt.figure(figsize=SIZE_IN, dpi=DPI)
    grid = fig.add_gridspec(2, 3, width_ratios=[1, 1, 0.05], height_ratios=[1.4, 1], hspace=0.45, wspace=0.25)
    for col, (rel, name) in enumerate(((rel0, "before"), (rel1, "after the plan"))):
        ax = fig.add_subplot(grid[0, col])
        img = ax.imshow(rel.T, aspect="auto", origin="lower", cmap="coolwarm", norm=norm, interpolation="nearest")
        ax.set_title(f"{name}: hottest rank {rel.max(axis=1).mean():.2f}x the mean", fontsize=9)
        ax.set_xlabel("MoE layer")
        ax.set_ylabel("rank")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    # the norm squeezes 1..max into half the bar: ticks spread evenly on each side of 1
    ticks = [0.0, 0.5, 1.0, *np.linspace(1.0, norm.vmax, 4)[1:]]
    bar = fig.colorbar(img, cax=fig.add_subplot(grid[0, 2]), label="rank load / layer mean", ticks=ticks)
    bar.ax.set_yticklabels([f"{t:.1f}" for t in ticks])
    ax = fig.add_subplot(grid[1, :2])
    x = np.arange(layers)
    b0 = before.mean(axis=1) / np.maximum(before.max(axis=1), 1e-12)
    b1 = after.mean(axis=1) / np.maximum(after.max(axis=1), 1e-12)
    ax.plot(x, b0, "o-", color="tab:red", label="before", markersize=3)
    ax.plot(x, b1, "o-", color="tab:blue", label="after the plan", markersize=3)
    ax.set_ylim(0, 1.05)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("balancedness (mean / max)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=DPI)  # no bbox_inches="tight": the pixel size stays fixed
    plt.close(fig)
    return int(SIZE_IN[0] * DPI), int(SIZE_IN[1] * DPI)
