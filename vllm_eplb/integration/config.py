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

from vllm_eplb.core.config import PROTOCOL_KEYS, BalancerConfig
from vllm_eplb.core.policies import broken_reason, policy_names
from vllm_eplb.core.transfer.select import BACKENDS
from vllm_eplb.kernels.replica_dispatch import DEFAULT as DEFAULT_DISPATCH, DISPATCHES

ENV_VAR = "EPLB_PLUGIN_CONFIG"

# Every key of upstream vLLM's EPLBConfig in the releases vllm-eplb knows (0.30-0.33), the
# first release that has it, and what vllm-eplb does with it: honoured with upstream's
# meaning, or refused (one line naming the key) where vllm-eplb cannot give that meaning.
# docs/configuration.md prints this table; tests/test_config.py checks it against the
# EPLBConfig of the installed vLLM and of each release's sdist.
UPSTREAM: dict[str, tuple[str, str]] = {
    "window_size": ("0.30", "honoured: passes of expert load a plan is based on"),
    "step_interval": ("0.30", "honoured: passes from one cycle's start to the next"),
    "num_redundant_experts": ("0.30", "honoured: extra expert slots for replicas"),
    "log_balancedness": (
        "0.30",
        "`false` honoured; `true` refused: upstream logs balancedness every pass at the cost of an all-reduce "
        "per pass; vllm-eplb measures it once per window at no extra cost, logs it and exports "
        "`vllm:eplb_balancedness`",
    ),
    "log_balancedness_interval": (
        "0.30",
        "`1` honoured; other values refused: the interval of upstream's per-pass log, which vllm-eplb does "
        "not have (set `window_size` to change how often balancedness is measured)",
    ),
    "use_async": (
        "0.30",
        "`true` honoured (vllm-eplb is always asynchronous, one layer per step); `false` refused: for "
        "upstream's synchronous EPLB run with `EPLB_PLUGIN_DISABLE=1`",
    ),
    "policy": (
        "0.30",
        "honoured: `\"default\"` is DeepSeek's EPLB, as in vLLM; vllm-eplb adds `\"deepseek\"` (the same), "
        "`\"min-move\"` (used when the key is absent, said at start-up) and `\"greedy\"`",
    ),
    "communicator": (
        "0.30",
        "mapped onto `transfer_backend`: `torch_gloo` -> `gloo`, `torch_nccl` and `pynccl` -> `nccl`; "
        "`nixl` refused (use `transfer_backend` `cuda_ipc` within a node or `nccl` across nodes); "
        "`torch_xccl` (0.32+, XPU) refused: vllm-eplb has no XPU backend",
    ),
    "enable_migration_batching": (
        "0.32",
        "`false` honoured; `true` refused: vllm-eplb's transfer plan schedules each layer's moves itself "
        "(upstream's conflict-free batching is not offered)",
    ),
}
UPSTREAM_KEYS = tuple(UPSTREAM)

# Keys every rank of the EP group must read alike, compared at start-up (a difference: no rank
# balances, `config_mismatch`): the core's protocol keys, and those the integration turns into
# the topology, the backend and the start-up placement (the file's placement is compared, not
# its path).
SHARED_KEYS = (
    *PROTOCOL_KEYS, "num_redundant_experts", "communicator", "transfer_backend", "initial_placement_path",
    "replica_dispatch",  # a token goes to one replica: every rank must choose it alike
    "verify_slots",  # its start-up gather is collective
)

_COMMUNICATOR_BACKEND = {"torch_gloo": "gloo", "torch_nccl": "nccl", "pynccl": "nccl"}
_DEFAULT_POLICY = "min-move"  # vllm-eplb's choice when the key is absent


class EplbConfigError(ValueError):
    """A one-line, user-facing configuration error."""


def _core(name: str):
    """Field of the core config, reused so both stay in one place."""
    f = BalancerConfig.model_fields[name]
    return Field(f.default, description=f.description, **{k: v for k, v in _bounds(f).items()})


def _bounds(field) -> dict:
    out = {}
    for m in field.metadata:
        for attr in ("ge", "gt", "le", "lt", "min_length"):
            if getattr(m, attr, None) is not None:
                out[attr] = getattr(m, attr)
    return out


class EplbConfig(BaseModel):
    """Every key `eplb.json` accepts. Unknown keys are errors.

    Strict: no coercion across types (`true` is not a count, `"5"` is not a number, `1.5`
    is not an int); an int is accepted where a float is expected. No NaN or infinity."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    # ---- vLLM's EPLBConfig keys (same meaning as upstream, or refused: see UPSTREAM)
    window_size: int = _core("window_size")
    step_interval: int = _core("step_interval")
    num_redundant_experts: int = Field(
        0, ge=0, le=1_000_000, description="Extra physical expert slots, for replicas of hot experts."
    )
    log_balancedness: bool = Field(False, description="Upstream's per-pass balancedness log: only false (see below).")
    log_balancedness_interval: int = Field(1, ge=1, description="Interval of upstream's per-pass log: only 1 (see below).")
    use_async: bool = Field(True, description="vllm-eplb is always asynchronous (layer-wise): only true.")
    policy: str = Field(
        _DEFAULT_POLICY,
        description="Placement policy: 'default' (as in vLLM: DeepSeek's EPLB), 'deepseek' (the same), 'min-move' "
        "(vllm-eplb's default when the key is absent) or 'greedy'.",
    )
    communicator: Literal["torch_nccl", "torch_gloo", "torch_xccl", "pynccl", "nixl"] | None = Field(
        None, description="vLLM's name for the weight-transfer backend; mapped onto transfer_backend (see below)."
    )
    enable_migration_batching: bool = Field(False, description="Upstream's conflict-free migration batching: only false.")

    # ---- vllm-eplb's own keys
    layers_per_pass: int = _core("layers_per_pass")
    min_move_tolerance: float = _core("min_move_tolerance")
    trigger_margin: float = _core("trigger_margin")
    trigger_min_spacing: int | None = _core("trigger_min_spacing")
    cost_tflops: float = _core("cost_tflops")
    cost_read_gbps: float = _core("cost_read_gbps")
    cost_move_gbps: float = _core("cost_move_gbps")
    planner: Literal["process", "thread"] = Field("process", description=BalancerConfig.model_fields["planner"].description)
    improvement_threshold: float = _core("improvement_threshold")
    agreement_lag: int = _core("agreement_lag")
    agreement_timeout_s: float = _core("agreement_timeout_s")
    planning_timeout_s: float = _core("planning_timeout_s")
    transfer_timeout_s: float = _core("transfer_timeout_s")
    planner_max_restarts: int = _core("planner_max_restarts")
    stall_warning_windows: int = _core("stall_warning_windows")
    transfer_backend: Literal[BACKENDS] = Field(
        "auto", description="How expert weights move: 'auto' picks gloo on CPU, CUDA IPC on GPU within a node, IPC + NCCL across nodes; 'gloo' on GPU stages through pinned host memory."
    )
    replica_dispatch: Literal[DISPATCHES] = Field(
        DEFAULT_DISPATCH,
        description="Which replica of an expert each token goes to: 'hash' (upstream vLLM's: a hash of the token "
        "index) or 'balanced' (each expert's tokens in a batch dealt to its replicas in turn, so the replicas get "
        "even shares); docs/benchmarks.md compares them.",
    )
    metrics: bool = Field(True, description="Export vllm:eplb_* metrics on /metrics.")
    verify_slots: bool = Field(
        False,
        description="After every committed layer, check on each rank that every slot holds the bytes (weights and "
        "scales) of the expert its map names; counted in vllm:eplb_slot_checks_total. Costs a device sync and a read of "
        "the layer's expert weights per commit: for tests and benchmarks.",
    )
    record_placement_path: str | None = Field(
        None, min_length=1, description=BalancerConfig.model_fields["record_placement_path"].description
    )
    initial_placement_path: str | None = Field(
        None,
        min_length=1,
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
        self._check_upstream_keys()
        if self.initial_placement_path is not None and not os.path.isfile(self.initial_placement_path):
            raise ValueError(f"'initial_placement_path': file {self.initial_placement_path!r} not found")
        if self.record_placement_path is not None:
            parent = os.path.dirname(os.path.abspath(self.record_placement_path))
            if not os.path.isdir(parent):
                raise ValueError(
                    f"'record_placement_path': folder {parent!r} does not exist; create it or choose another path"
                )
        # the core's own cross-field checks (window inside interval, ...)
        self.balancer_config()
        return self

    def _check_upstream_keys(self) -> None:
        """Upstream keys whose upstream meaning vllm-eplb cannot give: refused, with the way out."""
        if self.log_balancedness:
            raise ValueError(
                "'log_balancedness': true is upstream's per-pass balancedness log (an all-reduce every pass); "
                "vllm-eplb logs balancedness once per window and exports vllm:eplb_balancedness: remove the key"
            )
        if self.log_balancedness_interval != 1:
            raise ValueError(
                f"'log_balancedness_interval' ({self.log_balancedness_interval}) belongs to upstream's per-pass log, "
                "which vllm-eplb does not have: remove the key (balancedness is measured every window_size passes)"
            )
        if not self.use_async:
            raise ValueError(
                "'use_async': false asks for upstream's synchronous EPLB; vllm-eplb is always asynchronous: "
                "remove the key, or run vLLM's own EPLB with EPLB_PLUGIN_DISABLE=1"
            )
        if self.enable_migration_batching:
            raise ValueError(
                "'enable_migration_batching': true is not offered by vllm-eplb (its transfer plan schedules each "
                "layer's moves itself): remove the key"
            )
        if self.communicator == "nixl":
            raise ValueError(
                "'communicator': 'nixl' has no vllm-eplb backend: use \"transfer_backend\": \"cuda_ipc\" "
                "(GPUs of one node) or \"nccl\" (across nodes) instead"
            )
        if self.communicator == "torch_xccl":
            raise ValueError(
                "'communicator': 'torch_xccl' (XPU) has no vllm-eplb backend: vllm-eplb runs on CUDA GPUs and CPU only"
            )
        if self.communicator is not None and "transfer_backend" in self.model_fields_set:
            mapped = _COMMUNICATOR_BACKEND[self.communicator]
            if self.transfer_backend != mapped:
                raise ValueError(
                    f"'communicator' ({self.communicator!r}, i.e. transfer_backend {mapped!r}) and 'transfer_backend' "
                    f"({self.transfer_backend!r}) disagree: keep one of them"
                )

    def resolved_policy(self) -> str:
        return "deepseek" if self.policy == "default" else self.policy

    def resolved_backend(self) -> str:
        if self.transfer_backend != "auto":
            return self.transfer_backend
        return _COMMUNICATOR_BACKEND.get(self.communicator or "", "auto")

    def startup_notes(self) -> list[str]:
        """What the operator did not say and vllm-eplb chose, or translated: logged once at start-up."""
        notes = []
        if "policy" not in self.model_fields_set:
            notes.append(
                f"'policy' not set: using {_DEFAULT_POLICY!r} (vllm-eplb's default; \"policy\": \"default\" "
                "selects DeepSeek's EPLB, as in vLLM)"
            )
        elif self.policy == "default":
            notes.append("'policy': 'default' is DeepSeek's EPLB, as in vLLM (vllm-eplb's 'deepseek')")
        if self.communicator is not None:
            notes.append(f"'communicator': {self.communicator!r} moves experts with vllm-eplb's {self.resolved_backend()!r} backend")
        return notes

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


def _json(value) -> str:
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


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
    # the JSON spelling of what was given: `true`, not Python's True
    return f"{source}: {loc!r}: {msg} (got {_json(e.get('input'))})"


def _no_duplicates(pairs: list) -> dict:
    seen = {}
    for k, v in pairs:
        if k in seen:
            raise EplbConfigError(f"key {k!r} appears twice; keep one")
        seen[k] = v
    return seen


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
            try:
                with open(value, encoding="utf-8") as fh:
                    text = fh.read()
            except (OSError, UnicodeDecodeError) as exc:
                raise EplbConfigError(f"{source}: cannot be read as UTF-8 text: {exc}") from None
        try:
            # NaN/Infinity are not JSON; Python's parser would accept them
            data = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_refuse_constant)
        except EplbConfigError as exc:
            raise EplbConfigError(f"{source}: {exc}") from None
        except json.JSONDecodeError as exc:
            raise EplbConfigError(f"{source}: not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise EplbConfigError(f"{source}: must hold a JSON object of keys, got {type(data).__name__}")
    try:
        return EplbConfig(**data)
    except ValidationError as exc:
        raise EplbConfigError(_format_error(source, exc)) from None


def _refuse_constant(name: str):
    raise EplbConfigError(f"{name} is not a JSON number; give a finite number")


def publish(cfg: EplbConfig) -> None:
    """Make the config visible to the engine and worker processes started from here.
    Only the keys the operator set travel, so every process knows which were absent."""
    os.environ[ENV_VAR] = cfg.model_dump_json(exclude_unset=True)


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
        if name in SHARED_KEYS:
            desc += " Same on every rank (checked at start-up)."
        rows.append(f"| `{name}` | {ann} | `{json.dumps(f.default)}` | {origin}: {desc} |")
    return "\n".join(rows)


def upstream_markdown() -> str:
    """The table of upstream's EPLBConfig keys in docs/configuration.md, from UPSTREAM."""
    rows = ["| upstream key | in vLLM since | what vllm-eplb does with it |", "| --- | --- | --- |"]
    for name, (since, what) in UPSTREAM.items():
        rows.append(f"| `{name}` | {since} | {what} |")
    return "\n".join(rows)


if __name__ == "__main__":  # python -m vllm_eplb.integration.config: the two tables of docs/configuration.md
    print(upstream_markdown())
    print()
    print(reference_markdown())
