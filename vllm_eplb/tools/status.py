"""Live status of a server's balancer, per expert-parallel rank, read from its /metrics.

    python -m vllm_eplb.tools.status http://127.0.0.1:8000            # refresh every 2 s until Ctrl-C
    python -m vllm_eplb.tools.status http://127.0.0.1:8000 --once     # one snapshot, for scripts
    vllm-eplb status http://127.0.0.1:8000

Shows, per rank: the state and the pass it was entered at, the layer being moved with a
progress bar, cycles completed / skipped / aborted with their reasons, balancedness
(observed over the last window; per pass, the mean over that window's sampled passes;
predicted on that load for the placement in force, the last plan and the start-up
placement), the share of MoE time stragglers cost per pass, plan and transfer times, and
why the balancer stopped or stalled if it did. Reads only the vllm:eplb_* series (see README's Metrics).
Exit status with --once: 0, or 2 with one line on stderr if the server cannot be read or
exports no balancer metrics.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
import urllib.error
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

PREFIX = "vllm:eplb_"
KINDS = ("observed", "pass", "current", "planned", "initial")


class StatusError(Exception):
    """One line for the operator: the server cannot be read, or shows no balancer."""


@dataclass
class Rank:
    """One rank's series: name -> list of (labels without rank, value)."""

    rank: str
    series: dict = field(default_factory=lambda: defaultdict(list))

    def get(self, name: str, default=None, **labels) -> float | None:
        for ls, v in self.series.get(name, ()):
            if all(ls.get(k) == str(val) for k, val in labels.items()):
                return v
        return default

    def each(self, name: str) -> list[tuple[dict, float]]:
        return self.series.get(name, [])


def parse(text: str) -> dict[str, Rank]:
    """The vllm:eplb_* samples of a /metrics text, per rank label, ranks in numeric order."""
    ranks: dict[str, Rank] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if not s.name.startswith(PREFIX) or "rank" not in s.labels:
                continue
            labels = {k: v for k, v in s.labels.items() if k != "rank"}
            r = ranks.setdefault(s.labels["rank"], Rank(s.labels["rank"]))
            r.series[s.name].append((labels, s.value))
    return dict(sorted(ranks.items(), key=lambda kv: (not kv[0].isdigit(), int(kv[0]) if kv[0].isdigit() else kv[0])))


def fetch(url: str, timeout: float = 5.0) -> str:
    if not url.startswith(("http://", "https://")):
        url = "http://" + url
    if not url.rstrip("/").endswith("/metrics"):
        url = url.rstrip("/") + "/metrics"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.read().decode()
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise StatusError(f"cannot read {url}: {reason}") from None


def bar(done: float, total: float, width: int = 20) -> str:
    frac = 0.0 if total <= 0 else min(1.0, max(0.0, done / total))
    n = round(frac * width)
    return "[" + "#" * n + "-" * (width - n) + "]"


def _reasons(r: Rank, outcome: str) -> tuple[int, str]:
    per = {ls.get("reason", ""): v for ls, v in r.each("vllm:eplb_cycles_total") if ls.get("outcome") == outcome}
    total = int(sum(per.values()))
    detail = ", ".join(f"{k or '?'} {int(v)}" for k, v in sorted(per.items()) if v)
    return total, f" ({detail})" if detail and outcome != "completed" else ""


def _seconds(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x * 1e3:.1f} ms" if x < 1 else f"{x:.2f} s"


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""  # unreachable


def _mean(r: Rank, hist: str) -> tuple[float | None, int]:
    total, count = r.get(hist + "_sum"), r.get(hist + "_count")
    if not count:
        return None, 0
    return total / count, int(count)


def render_rank(r: Rank) -> list[str]:
    state = next((ls["state"] for ls, v in r.each("vllm:eplb_state") if v == 1), "?")
    entered = r.get("vllm:eplb_state_entered_pass", state=state)
    pass_no = r.get("vllm:eplb_pass")
    head = f"rank {r.rank}  {state.upper():<13}"
    head += f" pass {pass_no:.0f}" if pass_no is not None else ""
    head += f", since pass {entered:.0f}" if entered is not None else ""
    relayed = r.get("vllm:eplb_relayed_pass")
    head += f"  (another host: relayed by rank 0, as of pass {relayed:.0f})" if relayed is not None else ""
    lines = [head]
    if r.get("vllm:eplb_enabled") == 0:
        why = next(((ls.get("reason", "?"), ls.get("detail", "")) for ls, v in r.each("vllm:eplb_disabled_info") if v == 1), None)
        lines.append("  DISABLED: " + (f"{why[0]}{': ' + why[1] if why[1] else ''}" if why else "reason not exported"))
    if state == "suspended":
        why = ", ".join(f"{ls.get('reason', '?')} x{v:.0f}" for ls, v in r.each("vllm:eplb_suspensions_total") if v)
        lines.append("  SUSPENDED (a transient cause; the ranks vote to resume after a back-off): " + (why or "reason not exported"))
    healed = r.get("vllm:eplb_maps_healed_total")
    if healed:
        lines.append(f"  maps healed {healed:.0f} time(s): they differed across ranks, every rank went back to the agreed placement")
    unrecorded = r.get("vllm:eplb_unrecorded_windows_total")
    if unrecorded:
        lines.append(f"  NO LOAD RECORDED in {unrecorded:.0f} window(s) that routed tokens: the model's MoE layers do not report to EPLB")
    if r.get("vllm:eplb_stalled") == 1:
        n = r.get("vllm:eplb_windows_without_cycle", 0)
        lines.append(f"  STALLED: no cycle completed over the last {n:.0f} windows")
    layer, layers = r.get("vllm:eplb_transfer_layer", -1), r.get("vllm:eplb_moe_layers")
    if layer is not None and layer >= 0:
        # layers move in ascending order: the ones below the one in flight are done
        of = f" of {layers:.0f}" if layers else ""
        lines.append(f"  moving layer {layer + 1:.0f}{of} (index {layer:.0f})  {bar(layer, layers or 0)}")
    done, _ = _reasons(r, "completed")
    skipped, why_skipped = _reasons(r, "skipped")
    aborted, why_aborted = _reasons(r, "aborted")
    last = next((ls["reason"] for ls, v in r.each("vllm:eplb_last_abort_info") if v == 1), None)
    last_pass = r.get("vllm:eplb_last_abort_pass", -1)
    last_txt = f"; last: {last} at pass {last_pass:.0f}" if last and last_pass is not None and last_pass >= 0 else ""
    lines.append(f"  cycles: {done} completed, {skipped} skipped{why_skipped}, {aborted} aborted{why_aborted}{last_txt}")
    kinds = [(k, r.get("vllm:eplb_balancedness", kind=k)) for k in KINDS]
    lines.append("  balancedness: " + "  ".join(f"{k} {'-' if v is None else f'{v:.3f}'}" for k, v in kinds))
    share, summed = r.get("vllm:eplb_straggler_share"), r.get("vllm:eplb_balancedness", kind="sampled")
    if share is not None:
        window = f" (the same passes' summed load would say {1 - summed:.1%})" if summed is not None else ""
        lines.append(f"  stragglers: {share:.1%} of MoE time per pass waits for the most loaded rank{window}")
    plan, plans = _mean(r, "vllm:eplb_plan_seconds")
    step, steps = _mean(r, "vllm:eplb_layer_transfer_seconds")
    moved = r.get("vllm:eplb_moved_bytes_total", 0)
    experts = r.get("vllm:eplb_moved_experts_total", 0)
    layers_done = r.get("vllm:eplb_committed_layers_total", 0)
    wait = r.get("vllm:eplb_agreement_wait_seconds_total", 0)
    lines.append(f"  plan: {_seconds(plan)} mean over {plans}   transfer: {_seconds(step)} per layer, mean over {steps} steps")
    lines.append(
        f"  moved: {experts:.0f} experts, {_bytes(moved)}, {layers_done:.0f} layer commits   agreement wait: {_seconds(wait)} total"
    )
    return lines


def render(text: str, source: str = "") -> str:
    try:
        ranks = parse(text)
    except ValueError as exc:  # prometheus_client's parser: a line that is not exposition format
        raise StatusError(f"{source or 'the metrics'}: not Prometheus text ({exc})") from None
    if not ranks:
        raise StatusError(f"{source or 'the metrics'}: no {PREFIX}* series (is vllm-eplb installed and 'metrics' on in eplb.json?)")
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    out = ["  ".join(x for x in ("vllm-eplb status", source, stamp) if x)]
    for r in ranks.values():
        out.append("")
        out += render_rank(r)
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:  # `status ... | head`: the reader left; no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _main(argv) -> int:
    ap = argparse.ArgumentParser(
        prog="vllm-eplb status", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("url", help="the server (http://HOST:PORT) or its /metrics URL")
    ap.add_argument("--once", action="store_true", help="print one snapshot and exit")
    ap.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes (default 2)")
    args = ap.parse_args(argv)
    if args.interval <= 0:
        ap.error("--interval must be positive")
    if args.once:
        try:
            sys.stdout.write(render(fetch(args.url), args.url))
        except StatusError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return 0
    tty = sys.stdout.isatty()
    # Ctrl-C ends the refresh even where the tool was started with SIGINT ignored (a
    # background job of a shell without job control), where Python raises no KeyboardInterrupt
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        while True:
            try:
                screen = render(fetch(args.url), args.url)
            except StatusError as exc:  # a restarting server: say so and keep trying
                screen = f"vllm-eplb status  {args.url}  {time.strftime('%H:%M:%S')}\nerror: {exc}\n"
            # on a terminal redraw in place; into a pipe or file, one snapshot after another
            sys.stdout.write(("\033[H\033[2J" if tty else "\n") + screen)
            sys.stdout.flush()
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
