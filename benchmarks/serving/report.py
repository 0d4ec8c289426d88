"""The table of a run's rows (median [min-max] over reps; ratios within a rep against its 'off')."""

from __future__ import annotations

import statistics

def _mr(xs: list[float], fmt: str = "{:.2f}") -> str:
    xs = [x for x in xs if x == x]
    if not xs:
        return "n/a"
    m = statistics.median(xs)
    return fmt.format(m) + (f" [{fmt.format(min(xs))}-{fmt.format(max(xs))}]" if len(xs) > 1 else "")


def report(rows: list[dict]) -> str:
    lines = []
    timed = [r for r in rows if "tokens_per_s" in r and "deployment" in r]
    # one table per deployment and size: an EP=4 run is never compared with an EP=2 'off'
    for dep, n in sorted({(r["deployment"], r["ranks"]) for r in timed}):
        runs = [r for r in timed if r["deployment"] == dep and r["ranks"] == n]
        lines += [f"\n{dep.upper()}={n} + EP ({runs[0]['device']}), median [min-max] over reps; ratios against that rep's 'off'",
                  "| config | tok/s | tok/s vs off | ITL p50 ms | ITL p99 ms | TTFT p99 ms | ITL p99 in rebalances / steady | "
                  "rebalances | balancedness | cycles | layers moved | failed |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        off = {r["rep"]: r for r in runs if r["config"] == "off"}
        for cfg in [c for c in dict.fromkeys(r["config"] for r in runs)]:
            rs = [r for r in runs if r["config"] == cfg]
            vs = [r["tokens_per_s"] / off[r["rep"]]["tokens_per_s"] for r in rs if r["rep"] in off]
            stall = [r["itl_p99_rebalance_ms"] / r["itl_p99_steady_ms"] for r in rs if r["rebalances"] and r["itl_p99_steady_ms"]]
            lines.append(
                f"| {cfg} | {_mr([r['tokens_per_s'] for r in rs], '{:.0f}')} | {_mr(vs, '{:.3f}')} | {_mr([r['itl_p50_ms'] for r in rs])} "
                f"| {_mr([r['itl_p99_ms'] for r in rs])} | {_mr([r['ttft_p99_ms'] for r in rs], '{:.0f}')} | {_mr(stall)} "
                f"| {_mr([r['rebalances'] for r in rs], '{:.0f}')} | {_mr([r['balancedness'] for r in rs], '{:.3f}')} "
                f"| {_mr([r['cycles'] or 0 for r in rs], '{:.0f}')} | {_mr([r['layers_moved'] or 0 for r in rs], '{:.0f}')} "
                f"| {sum(r['failed'] for r in rs)} of {sum(r['requests'] for r in rs)} |"
            )
    checks = [r for r in rows if r.get("kind") == "correctness"]
    if checks:
        lines += ["\ncorrectness against EPLB off, same dtype/quantization (greedy identical; teacher-forced: largest "
                  "log-prob change of any token, nats); slots checked after every commit",
                  "| deployment | config | dtype | quant | greedy identical | drift | start-up placement's drift | EPLB off's repeats "
                  "(identical, drift) | bound | pass | cycles | slot checks ok | mismatches |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in checks:
            off = r["off_repeats"]
            lines.append(f"| {r['deployment']} | {r['config']} | {r['dtype']} | {r['quant']} | {r['outputs_identical']} "
                         f"| {r['drift']:.2g} | {r['static_placement_drift']:.2g} | {off['identical']}, {off['drift']:.2g} "
                         f"| {r['bound']:.2g} | {'yes' if r['within_noise'] else 'NO'} | {r['cycles']:.0f} "
                         f"| {r['slot_checks_ok']:.0f} | {r['slot_checks_mismatch']:.0f} |")
    single = [r for r in rows if r.get("kind", "").startswith(("llm_", "tp1"))]
    if single:
        lines.append("\none GPU")
        timing = [r for r in single if r["kind"] == "llm_timing" and "tokens_per_s" in r]
        by_rep = {}
        for r in timing:
            by_rep.setdefault(r["rep"], {})[r["plugin"]] = r["tokens_per_s"]
        ratios = [d["loaded"] / d["absent"] for d in by_rep.values() if len(d) == 2]
        if ratios:
            lines.append(f"- plugin loaded, EPLB off / plugin absent, tokens/s: {_mr(ratios, '{:.3f}')} over {len(ratios)} interleaved pairs")
        for r in single:
            if r["kind"] == "tp1_refused":
                lines.append(f"- TP=1 with --eplb-config, vLLM's own CLI: exit {r['rc']}, last line: {r['last_line']!r}, traceback: {r['traceback']}")
            elif r["kind"] != "llm_timing":
                if "error" in r:
                    lines.append(f"- {r['kind']}: error {r['error'][-300:]!r}")
                    continue
                n = r["prompts"]
                lines.append(f"- slot swap {r['kind'][4:]}: repeat {r['repeat_identical']}/{n}, all tensors swapped "
                             f"{r['after_swap_identical']}/{n}, swapped back {r['after_swap_back_identical']}/{n}, weights without "
                             f"scales {r['weights_without_scales_identical']}/{n} identical; expert tensors {r['swap']['expert_tensors']}")
                if "repeat_drift" in r:  # teacher-forced: the largest |log-prob change| of any prompt token
                    lines.append(f"  max |prompt log-prob change|: repeat {r['repeat_drift']:.4f}, all tensors swapped "
                                 f"{r['after_swap_drift']:.4f}, swapped back {r['after_swap_back_drift']:.4f}, weights without "
                                 f"scales {r['weights_without_scales_drift']:.4f}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main
