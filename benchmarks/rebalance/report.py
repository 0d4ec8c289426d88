"""The GPU rebalance benchmark's figures: per run (steady, stall and after windows, commit cost,
GB/s, payoff), per strategy (median and range over runs), the table, the targets and the plot."""

from __future__ import annotations

import numpy as np


def _pct(xs, q) -> float:
    return float(np.percentile(np.asarray(xs) * 1e3, q)) if len(xs) else float("nan")


def run_figures(runs: list[dict], args, peer: dict | None) -> dict:
    """One run's figures from its per-rank records (a pass takes its slowest rank's time)."""
    r0 = runs[0]
    times = np.max(np.array([r["times"] for r in runs]), axis=0)
    ticks = np.max(np.array([r["ticks"] for r in runs]), axis=0)
    n = len(times)
    passes = np.arange(1, n + 1)
    near_check = set()
    for c in r0["checked_after"]:
        near_check |= {c, c + 1}
    we, live = r0["window_end"], r0["live"]
    if we is None or live is None:
        return {"ok": False, "why": "no window end" if we is None else "never live"}
    stall_end = live + args.tail
    steady_m = np.array([args.skip < p < we and p not in near_check for p in passes])
    stall_m = (passes >= we) & (passes <= stall_end)
    after_m = np.array([p > stall_end and p not in near_check for p in passes])
    steady, stall, after = times[steady_m], times[stall_m], times[after_m]
    s50, s99 = _pct(steady, 50), _pct(steady, 99)
    commit_m = np.array([any(r["committed"][i] for r in runs) for i in range(n)]) & stall_m
    if commit_m.sum() and (~commit_m & stall_m).sum():
        # against the passes between commits: the placement improves layer by layer, so
        # steady p50 would flatter the committing passes
        first, last = np.flatnonzero(commit_m)[[0, -1]]
        between = times[max(first - 3, 0) : last + 1][~commit_m[max(first - 3, 0) : last + 1]]
        base = float(np.median(between)) * 1e3 if len(between) else s50
    else:
        base = s50
    commit_cost = [t * 1e3 - base for t in times[commit_m]]
    # GB/s per step: bytes a rank received / device time of the step's copies
    gbps, big_gbps, layer_mb = [], [], 0.0
    for r in runs:
        for st in r["steps"]:
            layer_mb = max(layer_mb, st["bytes_received"] / 2**20)
            if st["device_s"] and st["bytes_received"] > 0:
                g = st["bytes_received"] / st["device_s"] / 1e9
                gbps.append(g)
                if st["bytes_received"] >= args.big_layer_mb * 2**20:
                    big_gbps.append(g)
    a50 = _pct(after, 50)
    extra_ms = float(np.sum(stall * 1e3 - s50))
    gain_ms = s50 - a50
    mm = {k: sum(r["mismatch"][k] for r in runs) for k in ("slots", "maps", "outputs", "checks")}
    return {
        "ok": True, "steady_p50": s50, "steady_p99": s99, "stall_p50": _pct(stall, 50), "stall_p99": _pct(stall, 99),
        "stall_max": float(stall.max() * 1e3), "after_p50": a50,
        "p99_ratio": _pct(stall, 99) / s99, "max_ratio": float(stall.max() * 1e3) / s99, "after_ratio": a50 / s50,
        "stall_passes": int(stall_m.sum()), "passes_to_live": live - we,
        "commit_cost_ms": float(np.median(commit_cost)) if commit_cost else float("nan"),
        "commit_passes": int(commit_m.sum()),
        "tick_max_ms": float(ticks[stall_m].max() * 1e3),
        "gbps": float(np.median(gbps)) if gbps else float("nan"),
        "gbps_big": float(np.median(big_gbps)) if big_gbps else float("nan"),
        "peer_frac": (float(np.median(big_gbps)) / peer["all"]) if big_gbps and peer else float("nan"),
        "layer_mb": layer_mb,
        "staging_mb": max((st["staging"] for r in runs for st in r["steps"]), default=0) / 2**20,
        "extra_ms": extra_ms, "gain_ms": gain_ms,
        "payoff_passes": extra_ms / gain_ms if gain_ms > 0 else float("inf"),
        "checks": mm, "completed": r0["completed"], "skipped": r0["skipped"], "aborted": r0["aborted"],
        "observed": r0["observed"], "agreement_late": max(r["agreement_late"] for r in runs),
        "times_ms": (times * 1e3).tolist(), "states": r0["states"], "window_end": we, "live": live,
    }


def summarize(results: list[dict], args) -> tuple[list[dict], dict]:
    """Rows (one per strategy, in --strategies order) of median and range over timed runs."""
    peer = results[0].get("peer_copy_gbps")
    n_runs = len(results[0]["runs"])
    per_run = []
    for i in range(n_runs):
        runs = [res["runs"][i] for res in results]
        f = run_figures(runs, args, peer)
        f.update(name=runs[0]["name"], mode=runs[0]["mode"], backend=runs[0]["backend"], index=i,
                 setup_s=max(r.get("setup_s", 0) for r in runs), wall_s=max(r.get("wall_s", 0) for r in runs))
        per_run.append(f)
    rows = []
    seen = []
    for f in per_run:
        if f["name"] not in seen:
            seen.append(f["name"])
    seen.sort(key=lambda n: args.strategies.index(n) if n in args.strategies else len(args.strategies))
    for name in seen:
        mine = [f for f in per_run if f["name"] == name]
        timed = [f for f in mine if f["mode"] == "timed" and f["ok"]]
        checks = {k: sum(f["checks"][k] for f in mine if f["ok"]) for k in ("slots", "maps", "outputs", "checks")}
        failed = [f for f in mine if not f["ok"] or f["aborted"] or f["skipped"] or f["completed"] < 1]
        row = {"strategy": name, "backend": mine[0]["backend"], "runs": len(timed), "checks": checks,
               "failed_runs": len(failed), "why_failed": [f.get("why") or f.get("aborted") or f.get("skipped") for f in failed]}
        for key in ("steady_p50", "steady_p99", "stall_p99", "stall_max", "after_p50", "p99_ratio", "max_ratio", "after_ratio",
                    "passes_to_live", "stall_passes", "commit_cost_ms", "tick_max_ms", "gbps", "gbps_big", "peer_frac",
                    "layer_mb", "staging_mb", "extra_ms", "gain_ms", "payoff_passes", "agreement_late"):
            vals = [f[key] for f in timed if f[key] == f[key]]  # drop NaN
            row[key] = (float(np.median(vals)), float(min(vals)), float(max(vals))) if vals else (float("nan"),) * 3
        rows.append(row)
    return rows, {"per_run": per_run}


def _mr(t, fmt="{:.2f}", suffix="") -> str:
    med, lo, hi = t
    if med != med:
        return "n/a"
    if lo == hi:
        return fmt.format(med) + suffix
    return f"{fmt.format(med)}{suffix} [{fmt.format(lo)}-{fmt.format(hi)}]"


def targets(row: dict, args) -> dict:
    """Issue 11's targets, on the medians."""
    budget = args.layers + 4 * args.agreement_lag + 4
    big = row["layer_mb"][0] >= args.big_layer_mb
    return {
        "p99<=1.10": row["p99_ratio"][0] <= 1.10,
        "max<=1.25": row["max_ratio"][0] <= 1.25,
        f"live<={budget}": row["passes_to_live"][0] <= budget,
        ">=80% peer": (row["peer_frac"][0] >= 0.80) if big and row["peer_frac"][0] == row["peer_frac"][0] else None,
    }


def print_table(rows, results, args) -> None:
    r0 = results[0]
    world = len(results)
    hw = r0.get("device_name", "CPU")
    shared = r0.get("shared_gpu")
    gpus = f"{r0.get('ngpu', 0)} x {hw}" if r0.get("ngpu") else "CPU (gloo)"
    print(f"# {world} ranks on {gpus}" + (f"  SHARED: {world // max(1, r0['ngpu'])} ranks per GPU, timings include the other ranks' work" if shared else ""))
    print(f"# {args.layers} MoE layers resident ({args.depth or args.layers} of compute per pass) x {args.experts} experts + "
          f"{args.redundant} redundant, hidden {args.hidden}, expert inter {args.inter}, {args.tokens} tokens x top-{args.top_k}, "
          f"policy {args.policy}, zipf {args.zipf}, layers/step {args.layers_per_pass}, agreement lag {args.agreement_lag}, "
          f"plan order {args.plan_order}")
    if r0.get("peer_copy_gbps"):
        pc = r0["peer_copy_gbps"]
        print(f"# peer-copy limit (CUDA IPC pull of {args.peer_copy_mb} MB, GPU {0} <- GPU {1 % max(1, r0['ngpu'])}): one rank "
              f"{pc['one']:.0f} GB/s, every rank at once {pc['all']:.0f} GB/s per rank (the reference for transfers)")
    for name, why in r0.get("skipped", {}).items():
        print(f"# {name}: not run ({why})")
    print(f"# stop-the-world moves through {r0['stop_the_world_backend']}; runs per strategy: {rows[0]['runs'] if rows else 0} "
          f"timed (interleaved) + 1 checked for {','.join(args.checked) or 'none'}; median [min-max] over timed runs")
    if r0.get("deadline_hit"):
        print(f"# DEADLINE ({args.deadline:.0f} s) hit: ranks stopped, the runs every rank finished are reported")
    if r0.get("budget_stopped"):
        print("# time budget spent: fewer runs than asked")
    hdr = ("strategy", "backend", "runs", "steady p99 ms", "stall p99/steady p99", "stall max/steady p99", "passes to live",
           "commit pass +ms", "GB/s/layer", "of limit", "after/steady p50", "payoff passes", "staging MB", "checks")
    print("| " + " | ".join(hdr) + " |")
    print("|" + "---|" * len(hdr))
    for r in rows:
        c = r["checks"]
        ok = ("ok" if c["slots"] == c["maps"] == c["outputs"] == 0 and c["checks"] > 0 and not r["failed_runs"]
              else f"FAIL {c} failed runs {r['failed_runs']} {r['why_failed']}")
        print("| " + " | ".join([
            r["strategy"], r["backend"], str(r["runs"]), _mr(r["steady_p99"]), _mr(r["p99_ratio"], suffix="x"),
            _mr(r["max_ratio"], suffix="x"), _mr(r["passes_to_live"], "{:.0f}"), _mr(r["commit_cost_ms"]),
            _mr(r["gbps_big"] if r["gbps_big"][0] == r["gbps_big"][0] else r["gbps"], "{:.0f}"),
            _mr(r["peer_frac"], "{:.0%}"), _mr(r["after_ratio"], "{:.3f}"), _mr(r["payoff_passes"], "{:.0f}"),
            f"{r['staging_mb'][2]:.0f}", f"{ok} ({c['checks']})",
        ]) + " |")
    print(f"stall = every pass from the window's end to live + {args.tail}; steady = passes {args.skip + 1} to the window's "
          "end, check passes excluded; commit pass +ms = median of (a committing pass - median of the non-committing passes among the commits); GB/s/layer = bytes a "
          f"rank received in a step / device time of its copies, steps of >= {args.big_layer_mb} MB (gloo: not timed on "
          "the device); of limit = that / every-rank-at-once peer-copy limit; payoff = passes until the stall's extra time "
          "is repaid by the balanced placement's faster passes")
    print("targets (on medians): " + "; ".join(
        f"{r['strategy']}: " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in targets(r, args).items() if v is not None)
        for r in rows if r["strategy"] != "stop-the-world"))


def plot(per_run, path: str, args, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    for f in per_run:
        if f["name"] not in names:
            names.append(f["name"])
    names.sort(key=lambda n: args.strategies.index(n) if n in args.strategies else len(args.strategies))
    fig, axes = plt.subplots(len(names), 1, figsize=(10, 2.4 * len(names)), sharex=True)
    axes = np.atleast_1d(axes)
    for ax, name in zip(axes, names):
        runs = [f for f in per_run if f["name"] == name and f["mode"] == "timed" and f["ok"]]
        ymax = 0.0
        for f in runs:
            t = np.asarray(f["times_ms"])
            xs = np.arange(1, len(t) + 1) - f["window_end"]  # 0 = the window's end
            ax.plot(xs, t, lw=0.7, alpha=0.8)
            ymax = max(ymax, t.max())
        if runs:
            ax.axvspan(0, float(np.median([f["live"] - f["window_end"] for f in runs])) + args.tail, color="red", alpha=0.08,
                       label="stall window (median)")
        ax.set_ylabel("pass ms")
        ax.set_ylim(0, ymax * 1.05 if ymax else 1)
        ax.set_title(f"{name} ({runs[0]['backend'] if runs else '-'}), {len(runs)} runs", fontsize=9)
        ax.legend(loc="lower left", fontsize=7)
    axes[-1].set_xlabel("forward pass, 0 = the load window's end")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
