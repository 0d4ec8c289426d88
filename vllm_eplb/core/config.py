"""Settings of the balancer core.

These are the knobs the state machine itself reads. The integration layer
(`vllm_eplb.integration.config`) adds vLLM's own EPLB keys on top and maps an
`eplb.json` file onto this model.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


# Upper bounds. Each says how far a number can go before it stops meaning anything:
# a timeout past an hour is a hang nobody would wait out, a lag or layer step that large
# is a cycle that never happens. (The bounds that depend on the model or the deployment,
# e.g. window_size against int32 load counters, are checked by the integration.)
MAX_TIMEOUT_S = 3600.0
MAX_PASSES = 1_000_000_000  # benchmarks use 10**9 passes as "never"


class BalancerConfig(BaseModel):
    # No NaN/inf: a NaN threshold compares false with everything, an infinite timeout
    # never fires.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    window_size: int = Field(
        1000, ge=1, le=MAX_PASSES, description="Forward passes of expert load a plan is based on."
    )
    step_interval: int = Field(
        3000,
        ge=1,
        le=MAX_PASSES,
        description="Forward passes from the start of one cycle to the start of the next.",
    )
    layers_per_pass: int = Field(
        1, ge=1, le=64, description="MoE layers moved per transfer step; a step goes live 1 + agreement_lag passes after it starts, and up to agreement_lag + 1 steps, 6 at the most (a commit vote's width), are in flight at once."
    )
    improvement_threshold: float = Field(
        0.05,
        ge=0.0,
        description="Minimum relative balancedness gain (predicted/current - 1) for a plan to be applied.",
    )
    policy: str = Field("min-move", description="Placement policy name (see vllm_eplb.core.policies).")
    min_move_tolerance: float = Field(
        0.01,
        ge=0.0,
        le=1.0,
        description="min-move: how far above a lower bound on any packing's slowest rank a plan may leave a rank, as a share of a mean rank's token work (weight reads, alike on every rank, excluded).",
    )
    trigger_margin: float = Field(
        0.02,
        ge=0.0,
        le=1.0,
        description="Load trigger: a cycle starts early when the placement in force, predicted on the last watch window "
        "(window_size/4 passes, watched while idle), balances worse than the last plan promised by more than this "
        "(balancedness); 0 turns it and its rounds off, 1 watches without triggering.",
    )
    trigger_min_spacing: int | None = Field(
        None,
        ge=1,
        le=MAX_PASSES,
        description="Load trigger: fewest forward passes from the start of one cycle to a cycle the trigger starts "
        "(null: window_size); at most step_interval.",
    )
    cost_tflops: float = Field(
        100.0,
        gt=0,
        le=1e6,
        description="Cost model: effective expert GEMM rate (TFLOPS) of one token through one expert; the default is "
        "measured on one H200 (docs/benchmarks.md, section 5).",
    )
    cost_read_gbps: float = Field(
        4800.0,
        gt=0,
        le=1e6,
        description="Cost model: rate (GB/s) at which an activated expert replica's weights are read (H200 HBM).",
    )
    cost_move_gbps: float = Field(
        1300.0,
        gt=0,
        le=1e6,
        description="Cost model: pass time a moved expert slot costs, as bytes at this rate (a peer copy's 250 GB/s "
        "over the 19% it slows the forward pass); a slot moves when it saves more over step_interval passes.",
    )
    planner: Literal["process", "thread"] = Field(
        "process", description="Where plans are computed: a child process (no GIL contention) or a thread."
    )
    agreement_lag: int = Field(
        2,
        ge=1,
        le=1000,
        description="Passes between posting a cross-rank agreement round and reading its result.",
    )
    agreement_timeout_s: float = Field(
        60.0,
        gt=0,
        le=MAX_TIMEOUT_S,
        description="Longest one rank may lag its peers at an agreement round (a slow pass, a pause): the round "
        "waits that long; past it the round fails on every rank, the cycle ends there and the next cycle runs on "
        "a rebuilt agreement group.",
    )
    planning_timeout_s: float = Field(
        60.0, gt=0, le=MAX_TIMEOUT_S, description="A plan not ready on every rank after this long aborts the cycle."
    )
    planner_max_restarts: int = Field(
        3,
        ge=0,
        le=1000,
        description="Times a planner process that died is started again; past that, rebalancing is suspended on every rank (the resume vote starts a fresh one).",
    )
    transfer_timeout_s: float = Field(
        120.0, gt=0, le=MAX_TIMEOUT_S, description="Longest a rank waits for one transfer step's data."
    )

    stall_warning_windows: int = Field(
        3,
        ge=1,
        le=1_000_000,
        description="Warn (log and vllm:eplb_stalled) once more than this many windows (step_interval passes each) pass with no cycle completed or skipped.",
    )

    record_placement_path: str | None = Field(
        None, min_length=1, description="Write the placement in force and the load it was planned from to this JSON file after every plan decision (rank 0)."
    )

    @property
    def trigger_spacing(self) -> int:
        """trigger_min_spacing, its default resolved."""
        return self.trigger_min_spacing if self.trigger_min_spacing is not None else self.window_size

    @model_validator(mode="after")
    def _window_fits_interval(self) -> "BalancerConfig":
        if self.window_size > self.step_interval:
            raise ValueError(
                f"window_size ({self.window_size}) must not exceed step_interval "
                f"({self.step_interval}): the load window is collected inside each cycle"
            )
        if self.trigger_min_spacing is not None and self.trigger_min_spacing > self.step_interval:
            raise ValueError(
                f"trigger_min_spacing ({self.trigger_min_spacing}) must not exceed step_interval ({self.step_interval}): "
                "the schedule starts a cycle every step_interval passes anyway; lower it, or set trigger_margin 0 to "
                "turn the load trigger off"
            )
        if self.agreement_timeout_s >= self.transfer_timeout_s:
            raise ValueError(
                f"agreement_timeout_s ({self.agreement_timeout_s:g}) must be less than transfer_timeout_s "
                f"({self.transfer_timeout_s:g}): a rank lagging that long would leave steps' messages to time out"
            )
        if self.agreement_lag >= self.step_interval:
            raise ValueError(
                f"agreement_lag ({self.agreement_lag}) must be less than step_interval ({self.step_interval}): "
                "a round would be read after the next cycle began"
            )
        return self


# Every key, by whether it shapes the cross-rank protocol. PROTOCOL_KEYS change a schedule
# (when rounds are posted and read), a step (which layers move together), a vote (what a rank
# votes) or a plan: every rank of the EP group must hold the same values, and the balancer
# checks that at start-up (core/protocol.py). LOCAL_KEYS only change what one rank does on
# its own. tests/test_config.py checks that every key is in exactly one of them.
PROTOCOL_KEYS = (
    "window_size",
    "step_interval",
    "agreement_lag",
    "layers_per_pass",
    "improvement_threshold",
    "policy",
    "min_move_tolerance",
    "agreement_timeout_s",
    "planning_timeout_s",
    "transfer_timeout_s",
    "planner_max_restarts",
    "trigger_margin",
    "trigger_min_spacing",
    "cost_tflops",
    "cost_read_gbps",
    "cost_move_gbps",
)
LOCAL_KEYS = (
    "planner",  # where this rank computes the plan (the plan is the same)
    "stall_warning_windows",  # this rank's warning
    "record_placement_path",  # written by rank 0 only
)
