"""vllm:eplb_* metrics, written by each worker, served by vLLM's /metrics.

Workers are separate processes. prometheus_client's multiprocess mode carries
their values to the API server: each process writes its samples to files in
PROMETHEUS_MULTIPROC_DIR, and vLLM's /metrics reads them all through a
MultiProcessCollector. vllm-eplb's `vllm` launcher sets that directory before
anything starts (see cli.py), so every process of the server shares it.

Every series carries the expert-parallel `rank`. Gauges use the "mostrecent"
mode, so a rank's latest value is reported as is.
"""

from __future__ import annotations

import os

from prometheus_client import Counter, Gauge, Histogram

from vllm_eplb.core.state_machine import STATES

_PREFIX = "vllm:eplb_"
_GAUGE = dict(multiprocess_mode="mostrecent")

STATE = Gauge(_PREFIX + "state", "1 for the balancer's current state, 0 for the others.", ["rank", "state"], **_GAUGE)
STATE_ENTERED = Gauge(
    _PREFIX + "state_entered_pass",
    "Pass at which each state was last entered: one scrape shows the order of the last cycle.",
    ["rank", "state"],
    **_GAUGE,
)
LAYER = Gauge(_PREFIX + "transfer_layer", "Next MoE layer to move while transferring, -1 otherwise.", ["rank"], **_GAUGE)
PASS = Gauge(_PREFIX + "pass", "Forward passes (ticks) seen by the balancer.", ["rank"], **_GAUGE)
ENABLED = Gauge(_PREFIX + "enabled", "1 while rebalancing is on; 0 after the balancer stopped itself.", ["rank"], **_GAUGE)
BALANCEDNESS = Gauge(
    _PREFIX + "balancedness",
    "mean/max tokens per rank: observed over the last window, predicted for the placement in force "
    "(current) and for the last plan (planned).",
    ["rank", "kind"],
    **_GAUGE,
)
CYCLES = Counter(_PREFIX + "cycles", "Rebalancing cycles by outcome (completed, skipped, aborted) and reason.", ["rank", "outcome", "reason"])
PLAN_SECONDS = Histogram(
    _PREFIX + "plan_seconds", "Time the policy took to plan.", ["rank"], buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30)
)
LAYER_TRANSFER_SECONDS = Histogram(
    _PREFIX + "layer_transfer_seconds",
    "Per transfer step, divided by its layers: from posting the sends/receives to this rank's data complete.",
    ["rank"],
    buckets=(0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5),
)
BYTES = Counter(_PREFIX + "moved_bytes", "Expert weight bytes received by this rank.", ["rank"])
EXPERTS = Counter(_PREFIX + "moved_experts", "Experts received by this rank.", ["rank"])
LAYERS = Counter(_PREFIX + "committed_layers", "Layer commits (weights and maps of a layer switched).", ["rank"])
AGREEMENT_WAIT = Counter(
    _PREFIX + "agreement_wait_seconds", "Time the forward loop waited for agreement rounds not complete when read.", ["rank"]
)
STEP_SECONDS = Counter(
    _PREFIX + "step_seconds", "CPU time the forward loop spent in the balancer's per-pass step (tick and metrics).", ["rank"]
)
STAGING = Gauge(_PREFIX + "staging_bytes_max", "Largest staging memory one transfer step held.", ["rank"], **_GAUGE)

PASS_EVERY = 16  # refresh the pass gauge every N passes; everything else on transitions


class BalancerMetrics:
    def __init__(self, rank: int, owner=None):
        self.rank = str(rank)
        self.owner = owner  # has .step_ns: time spent in step()
        self._step_ns = 0
        self._seen: dict = {}
        self._plans = 0
        self._steps = 0
        self._wait = 0.0
        self._transitions = 0

    def _delta(self, key, value) -> float:
        prev = self._seen.get(key, 0)
        self._seen[key] = value
        return value - prev

    def update(self, balancer, transitioned: bool = True) -> None:
        """Cheap on ordinary passes; the full refresh runs on transitions."""
        r = self.rank
        if balancer.pass_no % PASS_EVERY == 0 or transitioned:
            PASS.labels(r).set(balancer.pass_no)
            if self.owner is not None and self.owner.step_ns > self._step_ns:
                STEP_SECONDS.labels(r).inc((self.owner.step_ns - self._step_ns) / 1e9)
                self._step_ns = self.owner.step_ns
        if not transitioned:
            return
        s = balancer.stats
        new = balancer.transitions_total - self._transitions
        self._transitions = balancer.transitions_total
        for rec in list(s.history)[-new:] if new > 0 else ():
            STATE_ENTERED.labels(r, rec.dest).set(rec.pass_no)
        for state in STATES:
            STATE.labels(r, state).set(1 if balancer.state == state else 0)
        LAYER.labels(r).set(balancer.layer if balancer.state == "transferring" else -1)
        ENABLED.labels(r).set(0 if balancer.disabled_reason else 1)
        for kind, v in (
            ("observed", s.balancedness_observed),
            ("current", s.balancedness_current),
            ("planned", s.balancedness_predicted),
        ):
            if v == v:  # not NaN
                BALANCEDNESS.labels(r, kind).set(v)
        d = self._delta("completed", s.cycles_completed)
        if d:
            CYCLES.labels(r, "completed", "").inc(d)
        for outcome, counts in (("skipped", s.cycles_skipped), ("aborted", s.cycles_aborted)):
            for reason, n in counts.items():
                d = self._delta((outcome, reason), n)
                if d:
                    CYCLES.labels(r, outcome, reason).inc(d)
        for t in s.plan_seconds[self._plans :]:
            PLAN_SECONDS.labels(r).observe(t)
        self._plans = len(s.plan_seconds)
        for t, layers in zip(s.transfer_seconds[self._steps :], s.transfer_layers[self._steps :]):
            LAYER_TRANSFER_SECONDS.labels(r).observe(t / max(1, layers))
        self._steps = len(s.transfer_seconds)
        for counter, key, value in (
            (BYTES, "bytes", s.bytes_moved),
            (EXPERTS, "experts", s.experts_moved),
            (LAYERS, "layers", s.layers_committed),
        ):
            d = self._delta(key, value)
            if d:
                counter.labels(r).inc(d)
        w = balancer.agreement.stats.wait_seconds_total
        if w > self._wait:
            AGREEMENT_WAIT.labels(r).inc(w - self._wait)
            self._wait = w
        STAGING.labels(r).set(s.max_staging_bytes)


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR")
