"""eplb.json schema and loader (no vLLM needed)."""

import json
from pathlib import Path

import pytest

from vllm_eplb.integration.config import EplbConfig, EplbConfigError, load_eplb_config, reference_markdown


def test_file_and_inline_json(tmp_path):
    p = tmp_path / "eplb.json"
    p.write_text(json.dumps({"window_size": 10, "step_interval": 20, "layers_per_pass": 2}))
    a = load_eplb_config(str(p))
    b = load_eplb_config('{"window_size": 10, "step_interval": 20, "layers_per_pass": 2}')
    assert a == b
    assert a.balancer_config().layers_per_pass == 2
    assert a.upstream_kwargs()["window_size"] == 10
    assert a.upstream_kwargs()["use_async"] is False


@pytest.mark.parametrize(
    "data, fragment",
    [
        ({"windowsize": 1}, "unknown key 'windowsize'; allowed keys: window_size"),
        ({"window_size": 0}, "'window_size'"),
        ({"window_size": 5000}, "window_size (5000) must not exceed step_interval (3000)"),
        ({"policy": "nope"}, "'policy' must be one of default, "),
        ({"transfer_backend": "rdma"}, "'transfer_backend': Input should be 'auto', 'gloo', 'nccl' or 'cuda_ipc'"),
        ({"communicator": "nixl"}, "nixl is not supported"),
        ({"improvement_threshold": -1}, "'improvement_threshold'"),
    ],
)
def test_errors_are_one_line_naming_file_and_key(tmp_path, data, fragment):
    p = tmp_path / "eplb.json"
    p.write_text(json.dumps(data))
    with pytest.raises(EplbConfigError) as e:
        load_eplb_config(str(p))
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(str(p))
    assert fragment in msg


def test_missing_file_and_bad_json(tmp_path):
    with pytest.raises(EplbConfigError, match="not found"):
        load_eplb_config(str(tmp_path / "nope.json"))
    with pytest.raises(EplbConfigError, match="not valid JSON"):
        load_eplb_config("{oops")
    with pytest.raises(EplbConfigError, match="must hold a JSON object"):
        load_eplb_config("[1, 2]")


def test_upstream_names_map_onto_ours():
    c = EplbConfig(policy="default", communicator="torch_nccl")
    assert c.resolved_policy() == "min-move"
    assert c.resolved_backend() == "nccl"


def test_docs_reference_is_current():
    with open(Path(__file__).parents[1] / "docs" / "configuration.md") as fh:
        doc = fh.read()
    table = doc.split("<!-- BEGIN KEYS -->\n")[1].split("<!-- END KEYS -->")[0].strip()
    assert table == reference_markdown().strip(), "regenerate: python -m vllm_eplb.integration.config"
