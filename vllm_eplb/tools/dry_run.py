"""Dry-run a placement policy on a recorded load: what would move, and the balance before/after.

    python -m vllm_eplb.tools.dry_run RECORD.json [--policy min-move] [--nodes 1] [--groups 1] [--png out.png]

RECORD.json is what the balancer writes with `record_placement_path` in eplb.json: the
placement in force and the per-expert load of the window it was planned from. The
policy plans from that placement on that load; nothing is sent anywhere. Any installed
policy works, plug-ins included. `--png` draws per-rank load before and after the plan
(needs matplotlib: pip install 'vllm-eplb[plot]').
"""

from __future__ import annotations

import argparse
import os
import sys


from vllm_eplb.core import records
from vllm_eplb.core.placement import rank_loads
from vllm_eplb.core.policies import PlanInput, get_policy, policy_names
from vllm_eplb.core.transfer import plan_layer


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("record")
    ap.add_argument("--policy", default="min-move", choices=policy_names())
    ap.add_argument("--tolerance", type=float, default=0.01, help="min-move: balancedness shortfall allowed vs deepseek")
    ap.add_argument("--nodes", type=int, default=1, help="nodes the ranks span (hierarchical policies)")
    ap.add_argument("--groups", type=int, default=1, help="expert groups of the model (hierarchical policies)")
    ap.add_argument("--expert-bytes", type=float, default=0, help="bytes of one expert, to report bytes moved")
    ap.add_argument("--png", metavar="PATH", help="write per-rank load before and after the plan as a PNG")
    args = ap.parse_args(argv)
    try:
        rec = records.load(args.record)
    except records.RecordError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if rec.logical_load is None:
        print(f"error: {args.record}: the record holds no load to plan from", file=sys.stderr)
        return 2
    rpn = rec.num_ranks // args.nodes if args.nodes > 1 else 0
    topo = rec.topology(ranks_per_node=rpn, num_groups=args.groups)
    load, current = rec.logical_load, rec.placement
    new = get_policy(args.policy, tolerance=args.tolerance).place(PlanInput(load, current, topo))

    before, after = rank_loads(current, load, topo), rank_loads(new, load, topo)
    print(f"{args.record}: {rec.num_layers} layers, {rec.num_logical} experts in {rec.num_physical} slots on {rec.num_ranks} ranks; policy {args.policy}")
    print(f"{'layer':>5} {'slots changed':>13} {'experts sent':>12} {'balancedness now':>16} {'after':>7}")
    total_slots = total_sent = 0
    for layer in range(rec.num_layers):
        lp = plan_layer(layer, current[layer], new[layer], topo)
        changed = int((current[layer] != new[layer]).sum())
        total_slots += changed
        total_sent += lp.experts_moved
        b0 = before[layer].mean() / before[layer].max() if before[layer].max() > 0 else 1.0
        b1 = after[layer].mean() / after[layer].max() if after[layer].max() > 0 else 1.0
        print(f"{layer:>5} {changed:>13} {lp.experts_moved:>12} {b0:>16.3f} {b1:>7.3f}")
    agg0 = before.mean(axis=1).sum() / before.max(axis=1).sum()
    agg1 = after.mean(axis=1).sum() / after.max(axis=1).sum()
    moved_bytes = f", {total_sent * args.expert_bytes / 1e9:.2f} GB" if args.expert_bytes else ""
    print(f"total: {total_slots} slots change, {total_sent} experts cross ranks{moved_bytes}; "
          f"balancedness {agg0:.4f} -> {agg1:.4f} ({(agg1 / agg0 - 1) * 100:+.1f}%)")
    if args.png:
        from .plot import PlotUnavailable, balance_png

        title = (f"{os.path.basename(args.record)}: policy {args.policy}, balancedness {agg0:.3f} -> {agg1:.3f}, "
                 f"{total_sent} experts cross ranks")
        try:
            w, h = balance_png(args.png, before, after, title)
        except PlotUnavailable as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except OSError as exc:
            print(f"error: {args.png}: {exc.strerror or exc}", file=sys.stderr)
            return 2
        print(f"wrote {args.png} ({w} x {h} px)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
