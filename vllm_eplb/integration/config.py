"""`eplb.json`: vLLM's own EPLB keys plus vllm-eplb's, validated before any model loads.

`--eplb-config` takes a path to a JSON file or an inline JSON object. Errors are one
line naming the source, the key and what is allowed, e.g.

    eplb.json: unknown key 'windowsize'; allowed keys: window_size, step_interval, ...
    eplb.json: 'layers_per_pass' must be greater than or equal to 1 (got 0)

The validated config travels to the engine-core and worker processes in the
environment variable EPLB_PLUGIN_CONFIG (JSON), set by the process that parsed it.
This module imports no vLLM: it is the schema, the loader and the reference docs.
"""

from __future__ import annotations

import json
import os
from typing import Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from vllm_eplb.core.config import BalancerConfig
from vllm_eplb.core.policies import broken_reason, policy_names

ENV_VAR = "EPLB_PLUGIN_CONFIG"

UPSTREAM_KEYS = (
    "window_size",
    "step_interval",
    "num_redundant_experts",
    "log_balancedness",
    "log_balancedness_interval",
    "use_async",
    "policy",
    "communicator",
)


class EplbConfigError(ValueError):
    """A one-line, user-facing configuration error."""


def _core(name: str):
    """Field of the core config, reused so both stay in one place."""
    f = BalancerConfig.model_fields[name]
    return Field(f.default, description=f.description, **{k: v for k, v in _bounds(f).items()})


def _bounds(field) -> dict:
    out = {}
    for m in field.metadata:
        for attr in ("ge", "gt", "le", "lt"):
            if getattr(m, attr, None) is not None:
                out[attr] = getattr(m, attr)
    return out


class EplbConfig(BaseModel):
    """Every key `eplb.json` accepts. Unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # ---- vLLM's EPLBConfig keys (same meaning as upstream)
    window_size: int = _core("window_size")
    step_interval: int = _core("step_interval")
    num_redundant_experts: int = Field(
        0, ge=0, description="Extra physical expert slots, for replicas of hot experts."
    )
    log_balancedness: bool = Field(False, description="Log the balancedness measured over each window.")
    log_balancedness_interval: int = Field(1, gt=0, description="Accepted for compatibility; balancedness is logged once per window.")
    use_async: bool = Field(True, description="Accepted for compatibility; vllm-eplb is always asynchronous (layer-wise).")
    policy: str = Field(
        "default",
        description="Placement policy: 'default' (vLLM's name; means 'min-move' here), 'min-move', 'deepseek' (vLLM's default algorithm) or 'greedy'.",
    )
    communicator: Literal["torch_nccl", "torch_gloo", "pynccl", "nixl"] | None = Field(
        None, description="vLLM's name for the weight-transfer backend; mapped onto transfer_backend."
    )

    # ---- vllm-eplb's own keys
    layers_per_pass: int = _core("layers_per_pass")
    min_move_tolerance: float = _core("min_move_tolerance")
    planner: Literal["process", "thread"] = Field("process", description=BalancerConfig.model_fields["planner"].description)
    improvement_threshold: float = _core("improvement_threshold")
    agreement_lag: int = _core("agreement_lag")
    agreement_timeout_s: float = _core("agreement_timeout_s")
    planning_timeout_s: float = _core("planning_timeout_s")
    transfer_timeout_s: float = _core("transfer_timeout_s")
    planner_max_restarts: int = _core("planner_max_restarts")
    transfer_backend: Literal["auto", "gloo", "nccl", "cuda_ipc"] = Field(
        "auto", description="How expert weights move: 'auto' picks gloo on CPU, CUDA IPC on GPU within a node, IPC + NCCL across nodes; 'gloo' on GPU stages through pinned host memory."
    )
    metrics: bool = Field(True, description="Export vllm:eplb_* metrics on /metrics.")
    record_placement_path: str | None = Field(
        None, description=BalancerConfig.model_fields["record_placement_path"].description
    )
    initial_placement_path: str | None = Field(
        None,
        description="Start serving on the placement recorded in this file (a record_placement_path file); "
        "its shape must match the model and the expert-parallel size.",
    )

    @model_validator(mode="after")
    def _check(self) -> "EplbConfig":
        names = ["default", *policy_names()]
        if self.policy not in names:
            # an installed plug-in that failed to load says why, rather than "unknown"
            why = broken_reason(self.policy)
            raise ValueError(f"'policy': {why}" if why else f"'policy' must be one of {', '.join(names)} (got {self.policy!r})")
        if self.initial_placement_path is not None and not os.path.isfile(self.initial_placement_path):
            raise ValueError(f"'initial_placement_path': file {self.initial_placement_path!r} not found")
        if self.communicator == "nixl":
            raise ValueError("'communicator': nixl is not supported by vllm-eplb; use transfer_backend")
        # the core's own cross-field checks (window inside interval, ...)
        self.balancer_config()
        return self

    def resolved_policy(self) -> str:
        return "min-move" if self.policy == "default" else self.policy

    def resolved_backend(self) -> str:
        if self.transfer_backend != "auto":
            return self.transfer_backend
        return {"torch_gloo": "gloo", "torch_nccl": "nccl", "pynccl": "nccl"}.get(self.communicator or "", "auto")

    def balancer_config(self) -> BalancerConfig:
        keys = BalancerConfig.model_fields.keys() - {"policy"}
        return BalancerConfig(policy=self.resolved_policy(), **{k: getattr(self, k) for k in keys})

    def upstream_kwargs(self) -> dict:
        """What vLLM's own EPLBConfig gets: its keys, with the async worker off (vllm-eplb
        replaces it) and vLLM's policy name."""
        return dict(
            window_size=self.window_size,
            step_interval=self.step_interval,
            num_redundant_experts=self.num_redundant_experts,
            log_balancedness=False,
            use_async=False,
            policy="default",
        )


def _format_error(source: str, err: ValidationError) -> str:
    e = err.errors()[0]
    loc = ".".join(str(x) for x in e["loc"])
    if e["type"] == "extra_forbidden":
        return f"{source}: unknown key {loc!r}; allowed keys: {', '.join(EplbConfig.model_fields)}"
    msg = e["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if not loc:
        return f"{source}: {msg}"
    return f"{source}: {loc!r}: {msg} (got {e.get('input')!r})"


def load_eplb_config(value: str | dict) -> EplbConfig:
    """Parse `--eplb-config`: a JSON file path, an inline JSON object, or a dict.
    Raises EplbConfigError with one line naming the source and the key."""
    if isinstance(value, dict):
        source, data = "eplb config", value
    else:
        text = value.strip()
        if text.startswith(("{", "[")):
            source = "--eplb-config (inline JSON)"
        else:
            source = value
            if not os.path.isfile(value):
                raise EplbConfigError(
                    f"--eplb-config: file {value!r} not found; give a path to a JSON file or an inline JSON object"
                )
            with open(value) as fh:
                text = fh.read()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise EplbConfigError(f"{source}: not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise EplbConfigError(f"{source}: must hold a JSON object of keys, got {type(data).__name__}")
    try:
        return EplbConfig(**data)
    except ValidationError as exc:
        raise EplbConfigError(_format_error(source, exc)) from None


def publish(cfg: EplbConfig) -> None:
    """Make the config visible to the engine and worker processes started from here."""
    os.environ[ENV_VAR] = cfg.model_dump_json()


def published() -> EplbConfig | None:
    raw = os.environ.get(ENV_VAR)
    return EplbConfig.model_validate_json(raw) if raw else None


def _type_name(annotation) -> str:
    args = [a for a in get_args(annotation) if a is not type(None)]
    if get_origin(annotation) is Literal:
        return " \\| ".join(json.dumps(a) for a in args)
    if args:  # Optional[...]
        return _type_name(args[0]) + " \\| null"
    return getattr(annotation, "__name__", str(annotation))


def reference_markdown() -> str:
    """The key reference of docs/configuration.md, generated from the schema."""
    rows = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for name, f in EplbConfig.model_fields.items():
        ann = _type_name(f.annotation)
        bounds = ", ".join(f"{k} {v}" for k, v in _bounds(f).items())
        origin = "vLLM" if name in UPSTREAM_KEYS else "vllm-eplb"
        desc = f.description or ""
        if bounds:
            desc += f" ({bounds})"
        rows.append(f"| `{name}` | {ann} | `{json.dumps(f.default)}` | {origin}: {desc} |")
    return "\n".join(rows)


if __name__ == "__main__":  # python -m vllm_eplb.integration.config > table for docs/configuration.md
    print(reference_markdown())
