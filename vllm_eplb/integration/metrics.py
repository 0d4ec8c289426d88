"""vllm:eplb_* metrics, written by each worker, served by vLLM's /metrics.

Workers are separate processes. prometheus_client's multiprocess mode carries
their values to the API server: a worker writes its samples to files in a
directory, and the API server reads them through a MultiProcessCollector.

- Started by vllm-eplb's `vllm` launcher (or with PROMETHEUS_MULTIPROC_DIR set by
  the operator), every process of the server runs in multiprocess mode and vLLM's
  own /metrics reads the directory: nothing more to do.
- Started another way (e.g. `python -m vllm.entrypoints.openai.api_server`), the API
  server already imported prometheus_client in single-process mode when the plugin
  loads. The plugin then makes a directory of its own (EPLB_METRICS_DIR, inherited
  by the engine and workers) and adds a collector for it to the registry vLLM serves
  (`bridge_worker_metrics`), and workers write their balancer metrics there.

Every series carries the expert-parallel `rank`. Gauges use the "mostrecent"
mode, so a rank's latest value is reported as is.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import struct
import tempfile

from prometheus_client import Counter, Gauge, Histogram, values

from vllm_eplb.core.state_machine import TOP_STATES

_PREFIX = "vllm:eplb_"

# `stall_warning_windows` (eplb.json): once more than this many windows pass while no
# cycle completed or was skipped (a skip is a decision: nothing worth moving), the
# balancer is stalled. Its default, for tests and docs:
STALL_WARNING_WINDOWS = 3

log = logging.getLogger("vllm.eplb")
_GAUGE = dict(multiprocess_mode="mostrecent", registry=None)
_OTHER = dict(registry=None)


class _Families:
    """The metric families, made once per worker process (after the value class is set)
    and registered nowhere: in multiprocess mode the values travel through files."""

    def __init__(self):
        self.STATE = Gauge(
            _PREFIX + "state", f"1 for the balancer's current state, 0 for the others ({', '.join(TOP_STATES)}).",
            ["rank", "state"], **_GAUGE,
        )
        self.STATE_ENTERED = Gauge(
            _PREFIX + "state_entered_pass",
            "Pass at which each state was last entered: one scrape shows the order of the last cycle.",
            ["rank", "state"],
            **_GAUGE,
        )
        self.LAYER = Gauge(_PREFIX + "transfer_layer", "Next MoE layer to move while transferring, -1 otherwise.", ["rank"], **_GAUGE)
        self.MOE_LAYERS = Gauge(_PREFIX + "moe_layers", "MoE layers the balancer places: transfer_layer counts up to it.", ["rank"], **_GAUGE)
        self.PASS = Gauge(_PREFIX + "pass", "Forward passes (ticks) seen by the balancer.", ["rank"], **_GAUGE)
        self.ENABLED = Gauge(_PREFIX + "enabled", "1 while rebalancing is on; 0 after the balancer stopped itself.", ["rank"], **_GAUGE)
        self.BALANCEDNESS = Gauge(
            _PREFIX + "balancedness",
            "mean/max tokens per rank: observed over the last window (a cycle's, or the load trigger's while idle); "
            "mean over a cycle window's sampled passes of each pass's (pass), and of those passes' summed load "
            "(sampled: the bound `1 - vllm:eplb_straggler_share` keeps); predicted on the window's load for the "
            "placement in force (current), for the last plan (planned) and for the start-up placement (initial); "
            "predicted for the placement in force on the load trigger's last watch window (watch).",
            ["rank", "kind"],
            **_GAUGE,
        )
        self.STRAGGLER_SHARE = Gauge(
            _PREFIX + "straggler_share",
            "Share of MoE expert time the last window's passes spent waiting for their most loaded rank, if a "
            "layer's time follows its most loaded rank's tokens: 1 - sum(mean)/sum(max) of per-pass rank loads.",
            ["rank"],
            **_GAUGE,
        )
        self.PASS_SECONDS = Gauge(
            _PREFIX + "pass_seconds",
            "Predicted MoE expert seconds per forward pass, summed over layers of the slowest rank's (token work plus "
            "one weight read per activated replica: the cost model), on the last plan's window: for the placement in "
            "force (current) and for the plan (planned).",
            ["rank", "kind"],
            **_GAUGE,
        )
        self.LOAD_TRIGGERS = Counter(
            _PREFIX + "load_triggers",
            "Cycles started early by the load trigger (the placement in force fell short of its plan's promise).",
            ["rank"],
            **_OTHER,
        )
        self.CYCLES = Counter(
            _PREFIX + "cycles", "Rebalancing cycles by outcome (completed, skipped, aborted) and reason.", ["rank", "outcome", "reason"], **_OTHER
        )
        self.PLAN_SECONDS = Histogram(
            _PREFIX + "plan_seconds",
            "Time the policy took to plan.",
            ["rank"],
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30),
            **_OTHER,
        )
        self.LAYER_TRANSFER_SECONDS = Histogram(
            _PREFIX + "layer_transfer_seconds",
            "Per transfer step, divided by its layers: from posting the sends/receives to this rank's data complete.",
            ["rank"],
            buckets=(0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5),
            **_OTHER,
        )
        self.BYTES = Counter(_PREFIX + "moved_bytes", "Expert weight bytes received by this rank.", ["rank"], **_OTHER)
        self.EXPERTS = Counter(_PREFIX + "moved_experts", "Experts received by this rank.", ["rank"], **_OTHER)
        self.LAYERS = Counter(_PREFIX + "committed_layers", "Layer commits (weights and maps of a layer switched).", ["rank"], **_OTHER)
        self.AGREEMENT_WAIT = Counter(
            _PREFIX + "agreement_wait_seconds", "Time the forward loop waited for agreement rounds not complete when read.", ["rank"], **_OTHER
        )
        self.STEP_SECONDS = Counter(
            _PREFIX + "step_seconds", "CPU time the forward loop spent in the balancer's per-pass step (tick and metrics).", ["rank"], **_OTHER
        )
        self.SLOT_CHECKS = Counter(
            _PREFIX + "slot_checks",
            "verify_slots: local slots checked after commits, by result (ok: holds the bytes of the expert its map names).",
            ["rank", "result"],
            **_OTHER,
        )
        self.WEIGHT_UPDATES = Counter(
            _PREFIX + "weight_updates",
            "Weight updates written into the expert slots (one per forward pass that had one); each ends the cycle in flight.",
            ["rank"],
            **_OTHER,
        )
        self.SUSPENSIONS = Counter(
            _PREFIX + "suspensions",
            "Times rebalancing paused on every rank for a transient cause (planner dead, transfer group broken, "
            "weight updates applied at different passes, agreement timeouts in a row), by reason.",
            ["rank", "reason"],
            **_OTHER,
        )
        self.REENABLED = Counter(
            _PREFIX + "reenabled",
            "Times rebalancing resumed after a suspension (every rank voted ready after the back-off).",
            ["rank"],
            **_OTHER,
        )
        self.MAPS_HEALED = Counter(
            _PREFIX + "maps_healed",
            "Rounds that showed routing maps differing across ranks, each healed at once to the last agreed placement.",
            ["rank"],
            **_OTHER,
        )
        self.UNRECORDED = Counter(
            _PREFIX + "unrecorded_windows",
            "Windows in which this rank routed tokens and no rank's MoE layers recorded any expert load: "
            "the model's MoE layers do not report to EPLB, nothing can be balanced (warned once in the log).",
            ["rank"],
            **_OTHER,
        )
        self.STAGING = Gauge(_PREFIX + "staging_bytes_max", "Largest staging memory one transfer step held.", ["rank"], **_GAUGE)
        # Why, not only whether: vllm:eplb_enabled 0 alone does not say what stopped it.
        self.DISABLED = Gauge(
            _PREFIX + "disabled_info",
            "1 once the balancer stopped itself, labelled with the reason and the error (truncated).",
            ["rank", "reason", "detail"],
            **_GAUGE,
        )
        self.LAST_ABORT = Gauge(
            _PREFIX + "last_abort_info", "1 for the reason of the latest aborted cycle, 0 for earlier reasons.", ["rank", "reason"], **_GAUGE
        )
        self.LAST_ABORT_PASS = Gauge(_PREFIX + "last_abort_pass", "Pass at which the latest cycle was aborted, -1 if none.", ["rank"], **_GAUGE)
        self.WINDOWS_WITHOUT_CYCLE = Gauge(
            _PREFIX + "windows_without_cycle",
            "Windows (step_interval passes) since a cycle last completed or was skipped (nothing worth moving).",
            ["rank"],
            **_GAUGE,
        )
        self.STALLED = Gauge(
            _PREFIX + "stalled", "1 while windows_without_cycle exceeds stall_warning_windows: rebalancing makes no progress.", ["rank"], **_GAUGE
        )
        self.RELAYED = Gauge(
            _PREFIX + "relayed_pass",
            "For a rank of another host (its series reach this /metrics through EP rank 0's relay, "
            "metrics_relay.py): the pass its figures here were taken at. Absent for ranks that write here themselves.",
            ["rank"],
            **_GAUGE,
        )


README_BEGIN, README_END = "<!-- BEGIN METRICS -->", "<!-- END METRICS -->"


def metrics_markdown() -> str:
    """The table of README.md's Metrics section, from the families above (their help
    text): one row per series, labels but `rank` shown (every series has it)."""
    rows = ["| series | kind | what |", "| --- | --- | --- |"]
    for family in vars(_Families()).values():
        name = family._name + ("_total" if family._type == "counter" else "")
        labels = [x for x in family._labelnames if x != "rank"]
        shown = f"{name}{{{','.join(labels)}}}" if labels else name
        rows.append(f"| `{shown}` | {family._type} | {family._documentation} |")
    return "\n".join(rows)


def readme_block() -> str:
    return f"{README_BEGIN}\n{metrics_markdown()}\n{README_END}"


def exported_series() -> dict[str, tuple[str, ...]]:
    """{sample name as it appears on /metrics: its label names} for every series the workers
    export: what the dashboard's queries and the status tool may name. Built from the
    families above, so a new series is known to the dashboard test without a hand list."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    out = {}
    for family in vars(_Families()).values():
        for suffix in suffixes[family._type]:
            out[family._name + suffix] = tuple(family._labelnames) + (("le",) if suffix == "_bucket" else ())
    return out


_families: _Families | None = None


PASS_EVERY = 16  # refresh the pass gauge every N passes; everything else on transitions


class BalancerMetrics:
    """One rank's series. `logs`: this process logs the rank's stall warning (not for a rank
    another host relays here: that rank logs its own)."""

    def __init__(self, rank: int, owner=None, logs: bool = True):
        global _families
        use_multiprocess_values()
        if _families is None:
            _families = _Families()
        self.m = _families
        self.rank = str(rank)
        self.owner = owner  # has .step_ns: time spent in step()
        self._step_ns = 0
        self._seen: dict = {}
        self._plans = 0
        self._steps = 0
        self._wait = 0.0
        self._transitions = 0
        self._disabled_seen = False
        self._progress = 0  # cycles completed + skipped, at the last update
        self._progress_pass: int | None = None  # pass at which that count last rose (or the first update)
        self._stall_warned = False
        self._logs = logs

    def _delta(self, key, value) -> float:
        prev = self._seen.get(key, 0)
        self._seen[key] = value
        return value - prev

    def update(self, balancer, transitioned: bool = True) -> None:
        """Cheap on ordinary passes; the full refresh runs on transitions."""
        r, m = self.rank, self.m
        if balancer.pass_no % PASS_EVERY == 0 or transitioned:
            m.PASS.labels(r).set(balancer.pass_no)
            if self.owner is not None and self.owner.step_ns > self._step_ns:
                m.STEP_SECONDS.labels(r).inc((self.owner.step_ns - self._step_ns) / 1e9)
                self._step_ns = self.owner.step_ns
            self._watch_stall(balancer)
            s = balancer.stats
            if s.observed_history and s.observed_history[-1] != self._seen.get("observed"):
                self._seen["observed"] = s.observed_history[-1]  # a watch window while idle: refresh balance
                self._balance(s)
        if not transitioned:
            return
        s = balancer.stats
        new = balancer.transitions_total - self._transitions
        self._transitions = balancer.transitions_total
        for rec in _newest(s.history, new):
            m.STATE_ENTERED.labels(r, rec.dest).set(rec.pass_no)
        for state in TOP_STATES:
            m.STATE.labels(r, state).set(1 if balancer.state == state else 0)
        m.LAYER.labels(r).set(balancer.layer if balancer.state == "transferring" else -1)
        m.MOE_LAYERS.labels(r).set(balancer.layout.num_layers)
        m.ENABLED.labels(r).set(1 if balancer.enabled else 0)
        if s.straggler_share == s.straggler_share:  # not NaN
            m.STRAGGLER_SHARE.labels(r).set(s.straggler_share)
        self._balance(s)
        for kind, v in (("current", s.pass_seconds_current), ("planned", s.pass_seconds_predicted)):
            if v == v and v > 0:  # not NaN, and a cost model
                m.PASS_SECONDS.labels(r, kind).set(v)
        d = self._delta("completed", s.cycles_completed)
        if d:
            m.CYCLES.labels(r, "completed", "").inc(d)
        aborted_now = []
        for outcome, counts in (("skipped", s.cycles_skipped), ("aborted", s.cycles_aborted)):
            for reason, n in counts.items():
                d = self._delta((outcome, reason), n)
                if d:
                    m.CYCLES.labels(r, outcome, reason).inc(d)
                    if outcome == "aborted":
                        aborted_now.append(reason)
        if aborted_now:
            for reason in s.cycles_aborted:
                m.LAST_ABORT.labels(r, reason).set(1 if reason == aborted_now[-1] else 0)
            m.LAST_ABORT_PASS.labels(r).set(balancer.pass_no)
        elif not s.cycles_aborted:
            m.LAST_ABORT_PASS.labels(r).set(-1)
        if not balancer.enabled and not self._disabled_seen:
            self._disabled_seen = True
            reason, _, detail = balancer.disabled_reason.partition(": ")
            m.DISABLED.labels(r, reason, detail[:200]).set(1)
        # the histories are bounded: the totals say how many entries are new
        for t in _newest(s.plan_seconds, s.plans_total - self._plans):
            m.PLAN_SECONDS.labels(r).observe(t)
        self._plans = s.plans_total
        new_steps = s.steps_total - self._steps
        for t, layers in zip(_newest(s.transfer_seconds, new_steps), _newest(s.transfer_layers, new_steps)):
            m.LAYER_TRANSFER_SECONDS.labels(r).observe(t / max(1, layers))
        self._steps = s.steps_total
        for counter, key, value in (
            (m.BYTES, "bytes", s.bytes_moved),
            (m.EXPERTS, "experts", s.experts_moved),
            (m.LAYERS, "layers", s.layers_committed),
            (m.WEIGHT_UPDATES, "weight_updates", s.weight_updates),
            (m.LOAD_TRIGGERS, "load_triggers", s.load_triggers),
            (m.REENABLED, "reenabled", s.reenabled),
            (m.MAPS_HEALED, "maps_healed", s.maps_healed),
            (m.UNRECORDED, "unrecorded_windows", s.unrecorded_windows),
        ):
            d = self._delta(key, value)
            if d:
                counter.labels(r).inc(d)
        for reason, n in s.suspensions.items():
            d = self._delta(("suspended", reason), n)
            if d:
                m.SUSPENSIONS.labels(r, reason).inc(d)
        w = balancer.agreement.stats.wait_seconds_total
        if w > self._wait:
            m.AGREEMENT_WAIT.labels(r).inc(w - self._wait)
            self._wait = w
        m.STAGING.labels(r).set(s.max_staging_bytes)
        verifier = getattr(self.owner, "verifier", None)
        if verifier is not None:
            bad = len(verifier.mismatches)
            for result, value in (("ok", verifier.checked - bad), ("mismatch", bad)):
                d = self._delta(("slot_checks", result), value)
                if d:
                    m.SLOT_CHECKS.labels(r, result).inc(d)

    def _balance(self, s) -> None:
        for kind, v in (
            ("observed", s.balancedness_observed),
            ("pass", s.balancedness_pass),
            ("sampled", s.balancedness_sampled),
            ("current", s.balancedness_current),
            ("planned", s.balancedness_predicted),
            ("initial", s.balancedness_initial),
            ("watch", s.balancedness_watch),
        ):
            if v == v:  # not NaN
                self.m.BALANCEDNESS.labels(self.rank, kind).set(v)

    def _watch_stall(self, balancer) -> None:
        """vLLM's own async EPLB can stop rebalancing with no sign. Here the pass clock
        says how many windows (step_interval passes each) went by since a cycle last
        completed or was skipped; more than the limit raises a gauge and logs one WARNING.
        Counted in passes, not in cycles ended, so a balancer stuck inside a cycle shows
        too; passes only advance while the server runs forward passes."""
        s, r = balancer.stats, self.rank
        progress = s.cycles_completed + sum(s.cycles_skipped.values())
        if progress != self._progress or self._progress_pass is None:
            self._progress, self._progress_pass = progress, balancer.pass_no
            self._stall_warned = False
        since = (balancer.pass_no - self._progress_pass) // max(1, balancer.config.step_interval)
        limit = balancer.config.stall_warning_windows
        stalled = since > limit and balancer.enabled  # disabling logs its own line
        self.m.WINDOWS_WITHOUT_CYCLE.labels(r).set(since)
        self.m.STALLED.labels(r).set(1 if stalled else 0)
        if stalled and not self._stall_warned and self._logs:
            self._stall_warned = True
            aborted = ", ".join(f"{k} x{v}" for k, v in sorted(s.cycles_aborted.items())) or "none"
            log.warning(
                "EPLB rank %s pass %d: no rebalancing cycle completed over the last %d windows "
                "(%d passes; stall_warning_windows=%d); aborted cycles so far: %s",
                r, balancer.pass_no, since, balancer.pass_no - self._progress_pass, limit, aborted,
            )


# ---------------------------------------------------------------- ranks of other hosts


def snapshot(balancer, owner) -> dict:
    """What BalancerMetrics.update reads of a rank, as plain data for metrics_relay."""
    from .metrics_relay import _cut_histories, identity

    verifier = getattr(owner, "verifier", None)
    return dict(
        identity=identity(),
        stats=_cut_histories(balancer.stats),
        pass_no=balancer.pass_no,
        transitions_total=balancer.transitions_total,
        state=balancer.state,
        layer=balancer.layer,
        num_layers=balancer.layout.num_layers,
        enabled=balancer.enabled,
        disabled_reason=balancer.disabled_reason,
        wait=balancer.agreement.stats.wait_seconds_total,
        step_interval=balancer.config.step_interval,
        stall_warning_windows=balancer.config.stall_warning_windows,
        step_ns=getattr(owner, "step_ns", 0),
        verifier=(verifier.checked, len(verifier.mismatches)) if verifier is not None else None,
    )


class _Relayed:
    """A snapshot with the attributes BalancerMetrics.update reads of a balancer and its owner."""

    def __init__(self, snap: dict):
        from types import SimpleNamespace as NS

        self.__dict__.update({k: v for k, v in snap.items() if k not in ("wait", "num_layers", "verifier")})
        self.layout = NS(num_layers=snap["num_layers"])
        self.agreement = NS(stats=NS(wait_seconds_total=snap["wait"]))
        self.config = NS(step_interval=snap["step_interval"], stall_warning_windows=snap["stall_warning_windows"])
        checked = snap["verifier"]
        self.verifier = None if checked is None else NS(checked=checked[0], mismatches=[None] * checked[1])


class RelayedRanks:
    """On EP rank 0: the series of the ranks whose own series do not reach this /metrics."""

    def __init__(self):
        self._ranks: dict[int, BalancerMetrics] = {}
        self._here = None  # this process's identity (rank 0's)

    def apply(self, rank: int, snap: dict) -> None:
        from .metrics_relay import identity

        if self._here is None:
            self._here = identity()
        if tuple(snap["identity"]) == self._here:
            return  # its own series are read by this /metrics already
        view = _Relayed(snap)
        m = self._ranks.get(rank)
        if m is None:
            m = self._ranks[rank] = BalancerMetrics(rank, logs=False)
        m.owner = view
        m.update(view, transitioned=True)
        m.m.RELAYED.labels(str(rank)).set(snap["pass_no"])


def _newest(history, n: int) -> list:
    """The last n entries of a bounded history (fewer if it dropped some), oldest first,
    without copying the whole history (a deque is indexed cheaply from its ends)."""
    n = min(n, len(history))
    return [history[-i] for i in range(n, 0, -1)]


BRIDGE_DIR = "EPLB_METRICS_DIR"


def bridge_worker_metrics() -> None:
    """In the first process of a server (the API server), when prometheus multiprocess
    mode is off: create the directory workers will write to and serve it."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get(BRIDGE_DIR):
        return  # multiprocess mode is on already, or a parent process set the bridge up
    from prometheus_client import REGISTRY, multiprocess

    d = tempfile.mkdtemp(prefix="vllm-eplb-metrics-")
    atexit.register(shutil.rmtree, d, True)
    os.environ[BRIDGE_DIR] = d
    multiprocess.MultiProcessCollector(REGISTRY, path=d)


def empty_files_read_as_empty(read_all_values_from_file):
    """`MmapedDict.read_all_values_from_file`, for files another process is creating.

    prometheus_client's MmapedDict opens a process's file and only then sizes it, so a scrape
    can find it at 0 bytes: reading its header raised `struct.error` and the whole /metrics
    answered 500 (seen in this project's CI: a worker's first value of a new metric type,
    written while the test scraped; prometheus/client_python#1199, open in 0.26.0). A file
    shorter than its 8-byte header holds nothing yet, as MmapedDict itself treats a file of
    size 0; a longer file is read as before, corruption checks included. Returns a
    staticmethod, as the class holds it."""
    if getattr(read_all_values_from_file, "_vllm_eplb_empty_ok", False):
        return read_all_values_from_file

    def read(filename):
        try:
            return read_all_values_from_file(filename)
        except struct.error:
            if os.path.getsize(filename) >= 8:
                raise
            return []

    read._vllm_eplb_empty_ok = True
    return staticmethod(read)


def use_multiprocess_values() -> None:
    """In a worker: make this process's metric values live in the shared directory.
    Workers export no other Prometheus metrics, so the whole process switches."""
    if getattr(values.ValueClass, "_multiprocess", False):
        return  # PROMETHEUS_MULTIPROC_DIR was set before prometheus_client loaded
    d = os.environ.get(BRIDGE_DIR)
    if d:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = d
        values.ValueClass = values.MultiProcessValue()


if __name__ == "__main__":  # python -m vllm_eplb.integration.metrics [--write]: README.md's metrics table
    import sys
    from pathlib import Path

    readme = Path(__file__).resolve().parents[2] / "README.md"
    if sys.argv[1:] == ["--write"]:
        text = readme.read_text()
        i, j = text.index(README_BEGIN), text.index(README_END) + len(README_END)
        readme.write_text(text[:i] + readme_block() + text[j:])
        print(f"{readme}: metrics table rewritten")
    else:
        print(metrics_markdown())
