"""eplb.json schema and loader (no vLLM needed)."""

import json
from pathlib import Path

import pytest

from vllm_eplb.integration.config import (
    UPSTREAM,
    EplbConfig,
    EplbConfigError,
    load_eplb_config,
    ENV_VAR,
    publish,
    published,
    reference_markdown,
    upstream_markdown,
)


def test_file_and_inline_json(tmp_path):
    p = tmp_path / "eplb.json"
    p.write_text(json.dumps({"window_size": 10, "step_interval": 20, "layers_per_pass": 2}))
    a = load_eplb_config(str(p))
    b = load_eplb_config('{"window_size": 10, "step_interval": 20, "layers_per_pass": 2}')
    assert a == b
    assert a.balancer_config().layers_per_pass == 2
    assert a.upstream_kwargs()["window_size"] == 10
    assert a.upstream_kwargs()["use_async"] is False


# Each malformed eplb.json is refused with one line that starts with the file's path and
# names the key (issue 10: no coercion across types, every number bounded to mean something).
MALFORMED = [
    # unknown or misspelt keys
    ({"windowsize": 1}, "unknown key 'windowsize'; allowed keys: window_size"),
    ({"window_size": 10, "step_interval": 20, "layers-per-pass": 2}, "unknown key 'layers-per-pass'"),
    # no coercion across types
    ({"window_size": True}, "'window_size': Input should be a valid integer (got true)"),
    ({"step_interval": "3000"}, "'step_interval': Input should be a valid integer (got \"3000\")"),
    ({"num_redundant_experts": 2.0}, "'num_redundant_experts': Input should be a valid integer (got 2.0)"),
    ({"layers_per_pass": 1.5}, "'layers_per_pass': Input should be a valid integer"),
    ({"metrics": 1}, "'metrics': Input should be a valid boolean (got 1)"),
    ({"use_async": "true"}, "'use_async': Input should be a valid boolean"),
    ({"improvement_threshold": False}, "'improvement_threshold': Input should be a valid number (got false)"),
    ({"agreement_timeout_s": "60"}, "'agreement_timeout_s': Input should be a valid number"),
    ({"policy": 1}, "'policy': Input should be a valid string (got 1)"),
    ({"record_placement_path": ["a.json"]}, "'record_placement_path': Input should be a valid string"),
    ({"planner": None}, "'planner': Input should be 'process' or 'thread' (got null)"),
    # bounds
    ({"window_size": 0}, "'window_size': Input should be greater than or equal to 1 (got 0)"),
    ({"window_size": 5000}, "window_size (5000) must not exceed step_interval (3000)"),
    ({"step_interval": 2_000_000_000}, "'step_interval': Input should be less than or equal to 1000000000"),
    ({"num_redundant_experts": -1}, "'num_redundant_experts': Input should be greater than or equal to 0"),
    ({"layers_per_pass": 0}, "'layers_per_pass': Input should be greater than or equal to 1"),
    ({"improvement_threshold": -0.1}, "'improvement_threshold': Input should be greater than or equal to 0"),
    ({"min_move_tolerance": 1.5}, "'min_move_tolerance': Input should be less than or equal to 1"),
    ({"agreement_lag": 0}, "'agreement_lag': Input should be greater than or equal to 1"),
    ({"window_size": 10, "step_interval": 20, "agreement_lag": 20}, "agreement_lag (20) must be less than step_interval (20)"),
    ({"agreement_timeout_s": 0}, "'agreement_timeout_s': Input should be greater than 0"),
    ({"planning_timeout_s": 86400}, "'planning_timeout_s': Input should be less than or equal to 3600"),
    ({"transfer_timeout_s": 1e400}, "'transfer_timeout_s': Input should be a finite number"),
    ({"record_placement_path": ""}, "'record_placement_path': String should have at least 1 character"),
    ({"record_placement_path": "/no/such/dir/rec.json"}, "'record_placement_path': folder '/no/such/dir' does not exist"),
    ({"initial_placement_path": "/no/such/file.json"}, "'initial_placement_path': file '/no/such/file.json' not found"),
    # names
    ({"policy": "nope"}, "'policy' must be one of default, "),
    ({"transfer_backend": "rdma"}, "'transfer_backend': Input should be 'auto', 'gloo', 'nccl' or 'cuda_ipc'"),
    ({"communicator": "mpi"}, "'communicator': Input should be 'torch_nccl', 'torch_gloo', 'torch_xccl', 'pynccl' or 'nixl'"),
    # upstream keys whose upstream meaning vllm-eplb cannot give
    ({"communicator": "nixl"}, "'communicator': 'nixl' has no vllm-eplb backend: use \"transfer_backend\": \"cuda_ipc\""),
    ({"communicator": "torch_xccl"}, "'communicator': 'torch_xccl' (XPU) has no vllm-eplb backend"),
    ({"communicator": "torch_gloo", "transfer_backend": "nccl"}, "'communicator' ('torch_gloo', i.e. transfer_backend 'gloo') and 'transfer_backend' ('nccl') disagree"),
    ({"use_async": False}, "'use_async': false asks for upstream's synchronous EPLB"),
    ({"log_balancedness": True}, "'log_balancedness': true is upstream's per-pass balancedness log"),
    ({"log_balancedness_interval": 10}, "'log_balancedness_interval' (10) belongs to upstream's per-pass log"),
    ({"enable_migration_batching": True}, "'enable_migration_batching': true is not offered by vllm-eplb"),
    # timeouts out of order: a rank lagging past transfer_timeout_s would leave steps' messages to time out
    ({"agreement_timeout_s": 120}, "agreement_timeout_s (120) must be less than transfer_timeout_s (120)"),
]
# Malformed as text: not JSON, not an object, NaN, a key twice.
MALFORMED_TEXT = [
    ("{oops", "not valid JSON"),
    ("", "not valid JSON"),
    ("[1, 2]", "must hold a JSON object of keys, got list"),
    ("null", "must hold a JSON object of keys, got NoneType"),
    ('{"window_size": NaN}', "NaN is not a JSON number; give a finite number"),
    ('{"agreement_timeout_s": Infinity}', "Infinity is not a JSON number"),
    ('{"window_size": 10, "window_size": 20}', "key 'window_size' appears twice; keep one"),
]


def _refused(path) -> str:
    with pytest.raises(EplbConfigError) as e:
        load_eplb_config(str(path))
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(str(path) + ": "), msg
    return msg


@pytest.mark.parametrize("data, fragment", MALFORMED)
def test_errors_are_one_line_naming_file_and_key(tmp_path, data, fragment):
    p = tmp_path / "eplb.json"
    p.write_text(json.dumps(data) if not any(isinstance(v, float) and v > 1e308 for v in data.values()) else
                 json.dumps(data).replace("Infinity", "1e400"))
    msg = _refused(p)
    assert fragment in msg, msg
    key = fragment.split("'")[1] if "'" in fragment else fragment.split(" ")[0]
    assert key in msg, msg


@pytest.mark.parametrize("text, fragment", MALFORMED_TEXT)
def test_malformed_text_is_one_line_naming_the_file(tmp_path, text, fragment):
    p = tmp_path / "eplb.json"
    p.write_text(text)
    assert fragment in _refused(p)


def test_at_least_twenty_malformed_files():
    assert len(MALFORMED) + len(MALFORMED_TEXT) >= 20


def test_ints_are_numbers_and_upstream_values_are_accepted():
    c = load_eplb_config('{"improvement_threshold": 0, "agreement_timeout_s": 5, "use_async": true, '
                         '"log_balancedness": false, "log_balancedness_interval": 1, "enable_migration_batching": false}')
    assert c.improvement_threshold == 0.0 and c.agreement_timeout_s == 5.0


def test_missing_file_and_inline_json(tmp_path):
    with pytest.raises(EplbConfigError, match="not found"):
        load_eplb_config(str(tmp_path / "nope.json"))
    with pytest.raises(EplbConfigError, match=r"^--eplb-config \(inline JSON\): not valid JSON"):
        load_eplb_config("{oops")


def test_policy_keeps_upstream_meaning(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)  # publish() sets it: restored after the test
    # vLLM's "default" is DeepSeek's EPLB; the absent key is vllm-eplb's min-move, and said
    assert EplbConfig(policy="default").resolved_policy() == "deepseek"
    absent = EplbConfig()
    assert absent.resolved_policy() == "min-move"
    assert any("'policy' not set: using 'min-move'" in n for n in absent.startup_notes())
    assert not any("not set" in n for n in EplbConfig(policy="min-move").startup_notes())
    # the processes a server starts learn which keys were absent
    publish(absent)
    assert published().startup_notes() == absent.startup_notes()
    publish(EplbConfig(policy="greedy"))
    assert published().resolved_policy() == "greedy" and "policy" in published().model_fields_set


@pytest.mark.parametrize("communicator, backend", [("torch_gloo", "gloo"), ("torch_nccl", "nccl"), ("pynccl", "nccl"), (None, "auto")])
def test_communicator_maps_onto_transfer_backends(communicator, backend):
    c = EplbConfig(communicator=communicator)
    assert c.resolved_backend() == backend
    assert c.balancer_config() is not None


def test_upstream_table_lists_every_upstream_key():
    assert set(UPSTREAM) <= set(EplbConfig.model_fields)
    assert list(UPSTREAM) == list(EplbConfig.model_fields)[: len(UPSTREAM)]


def test_installed_vllm_eplbconfig_keys_are_all_listed():
    vllm_config = pytest.importorskip("vllm.config")
    fields = set(vllm_config.EPLBConfig.__dataclass_fields__)
    assert fields <= set(UPSTREAM), fields - set(UPSTREAM)


def test_docs_reference_is_current():
    with open(Path(__file__).parents[1] / "docs" / "configuration.md") as fh:
        doc = fh.read()
    table = doc.split("<!-- BEGIN KEYS -->\n")[1].split("<!-- END KEYS -->")[0].strip()
    assert table == reference_markdown().strip(), "regenerate: python -m vllm_eplb.integration.config"
    upstream = doc.split("<!-- BEGIN UPSTREAM -->\n")[1].split("<!-- END UPSTREAM -->")[0].strip()
    assert upstream == upstream_markdown().strip(), "regenerate: python -m vllm_eplb.integration.config"
