"""The architecture matrix: a tiny checkpoint of each MoE architecture, built locally
(vllm_eplb/harness/tiny_model.py), served once with `vllm serve -tp 2
--enable-expert-parallel --eplb-config` (float32, CPU) under 4 concurrent clients until the
balancer has completed two cycles. Checked on that one server: no request failed, every
rank completed the cycles and committed layers, the MoE layers placed are the model's MoE
layers (dense layers and shared experts left out), the adapter balanced the classes that
lack vLLM's MixtureOfExperts interface, and the greedy outputs of fixed prompts after the
rebalancing are the reference's.

The reference: transformers' own float32 greedy decoding of the checkpoint, the same
tokens vLLM with EPLB off gives for these checkpoints (measured for each; the EPLB-off
servers of EPLB_TEST_ARCH_EPLB_OFF=1 check it again). DeepSeek's transformers
implementation (MLA) decodes other tokens than vLLM's, so its reference is an EPLB-off server
(its sequential greedy outputs are reproducible; batched ones vary run to run).

A model vLLM serves but vllm-eplb cannot balance as configured stops at start-up, before
/health answers, with one line (test_refused_at_load_in_one_line). Qwen3-MoE, the default
tiny model, is covered by test_e2e_vllm.py."""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass

import pytest

from vllm_eplb.harness.server import Load, Server, metric
from vllm_eplb.harness.tiny_model import build

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

PROMPTS = ["the model of the expert", "one two three four", "load on a rank is", "great old year off come"]
TOKENS = 24


@dataclass(frozen=True)
class Case:
    arch: str  # tiny_model.ARCHITECTURES
    redundant: int  # num_redundant_experts
    moe_layers: int  # of the 4 decoder layers
    adapted: bool  # no MixtureOfExperts in vLLM 0.32: balanced through moe_adapter
    reference: str  # "transformers" or "eplb_off"


CASES = [
    # a shared expert per MoE layer; layer 1 a dense MLP between MoE layers
    Case("qwen2_moe", 2, 3, True, "transformers"),
    Case("olmoe", 2, 4, True, "transformers"),
    Case("mixtral", 2, 4, False, "transformers"),
    # DeepSeek-V3's class (DeepSeek-R1, Kimi K2): sigmoid routing with a per-expert correction bias
    # (drawn nonzero) within groups, MLA (kv_lora_rank 512 + rope 64, the CPU MLA kernel's size), a
    # shared expert, layer 0 dense. DeepSeek-V2 runs the same vLLM class with softmax routing.
    Case("deepseek_v3", 2, 3, False, "eplb_off"),
    # GLM-4.5's MoE: the same routing under GQA, a shared expert, layer 0 dense
    Case("glm4_moe", 2, 3, False, "transformers"),
    # Phi-3.5-MoE: sparsemixer, a custom routing function; vLLM's class lacks the interface
    Case("phimoe", 2, 4, True, "transformers"),
    # vLLM's GPT-OSS loader cannot fill redundant slots (refused with them, below)
    Case("gpt_oss", 0, 4, True, "transformers"),
    # every second layer MoE, top-1 with the router weight on the input; vLLM's Llama-4
    # loader cannot fill redundant slots either
    Case("llama4", 0, 2, False, "transformers"),
    # classes that declare the interface but build their layers without EPLB (Gemma 4's MoE: a
    # dense MLP beside the experts in every layer; GLM-4.7-Flash: MLA, GLM-4.5's block built
    # without passing enable_eplb): balanced only because moe_adapter builds them with EPLB
    # layers. Neither loader fills redundant slots (refused with them, in one line)
    Case("gemma4", 0, 4, False, "transformers"),
    Case("glm4_moe_lite", 0, 3, False, "eplb_off"),
]


def transformers_greedy(model_dir: str) -> list[list[int]]:
    """Float32 greedy tokens of transformers' implementation, EOS not special (vLLM's
    ignore_eos)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    outs = []
    for p in PROMPTS:
        ids = tok(p, return_tensors="pt").input_ids
        new = []
        with torch.no_grad():
            for _ in range(TOKENS):
                nxt = int(model(ids).logits[0, -1].argmax())
                new.append(nxt)
                ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
        outs.append(new)
    return outs


def sample(server: Server) -> list[list[int]]:
    return [server.complete(p, max_tokens=TOKENS) for p in PROMPTS]


def eplb_off(model_dir: str, log: str, port: int) -> list[list[int]]:
    with Server(model_dir, port, None, log_path=log) as s:
        return sample(s)


def cycles(ms: dict, rank: int) -> float:
    return metric(ms, "vllm:eplb_cycles_total", rank=rank, outcome="completed") or 0


@pytest.fixture(scope="module", params=CASES, ids=[c.arch for c in CASES])
def served(request, tmp_path_factory):
    case: Case = request.param
    d = tmp_path_factory.mktemp(case.arch)
    model = build(str(d / "model"), arch=case.arch)
    reference = transformers_greedy(model) if case.reference == "transformers" else eplb_off(model, str(d / "off.log"), 8272)
    cfg = d / "eplb.json"
    cfg.write_text(json.dumps({"window_size": 16, "step_interval": 24, "num_redundant_experts": case.redundant}))
    log = str(d / "serve.log")
    t0 = time.monotonic()
    with Server(model, 8271, str(cfg), log_path=log) as s:
        started = time.monotonic() - t0
        load = Load(s, clients=4)
        load.start()
        try:
            deadline = time.monotonic() + 300  # bounds a broken run; a loaded CI box is slow
            while time.monotonic() < deadline and min(cycles(s.metrics(), r) for r in (0, 1)) < 2:
                time.sleep(0.5)
        finally:
            load.stop()
        outputs = sample(s)  # sequential, after the rebalancing: no batch effects
        final = s.metrics()
    with open(log) as fh:
        text = fh.read()
    aborted = sum(v for (n, ls), v in final.items() if n == "vllm:eplb_cycles_total" and ("outcome", "aborted") in ls)
    pace = (
        f"{case.arch}: healthy after {started:.0f} s, {load.done} requests, {aborted:.0f} cycles aborted, "
        f"{time.monotonic() - t0:.0f} s in all"
    )
    return dict(case=case, reference=reference, outputs=outputs, final=final, log=text, errors=load.errors, pace=pace)


def test_balances_without_a_failed_request(served):
    final, pace = served["final"], served["pace"]
    assert not served["errors"], served["errors"][:3]
    for rank in (0, 1):
        assert cycles(final, rank) >= 2, pace
        assert (metric(final, "vllm:eplb_committed_layers_total", rank=rank) or 0) >= 1, pace
        assert (metric(final, "vllm:eplb_unrecorded_windows_total", rank=rank) or 0) == 0, pace  # its layers report load
    assert re.search(r"window of \d+ passes \([1-9]\d* of them routed tokens here\)", served["log"]), pace
    assert sum(metric(final, "vllm:eplb_moved_bytes_total", rank=r) or 0 for r in (0, 1)) > 0


def test_greedy_outputs_are_the_reference(served):
    case = served["case"]
    assert served["outputs"] == served["reference"], f"{case.arch}: greedy tokens differ from {case.reference}"


def test_places_the_moe_layers_only(served):
    """Dense layers and shared experts are no FusedMoE routed experts: the placement holds
    the model's MoE layers and nothing else."""
    case, log = served["case"], served["log"]
    for rank in (0, 1):
        assert metric(served["final"], "vllm:eplb_moe_layers", rank=rank) == case.moe_layers
    m = re.search(r"vllm-eplb: EP rank 0/2, (\d+) MoE layers, 16 logical experts in (\d+) slots", log)
    assert m, log[-3000:]
    assert (int(m.group(1)), int(m.group(2))) == (case.moe_layers, 16 + case.redundant)
    adapted = re.search(r"vllm-eplb: (\w+) lacks vLLM's MixtureOfExperts interface: balancing its (\d+) FusedMoE layers", log)
    assert bool(adapted) == case.adapted, adapted
    if adapted:
        assert int(adapted.group(2)) == case.moe_layers


@pytest.mark.skipif(os.environ.get("EPLB_TEST_ARCH_EPLB_OFF") != "1", reason="EPLB_TEST_ARCH_EPLB_OFF=1: one more serve per architecture")
@pytest.mark.parametrize("case", [c for c in CASES if c.reference == "transformers"], ids=lambda c: c.arch)
def test_transformers_reference_is_eplb_off(case, tmp_path):
    """vLLM with EPLB off decodes the transformers reference's tokens for these checkpoints."""
    model = build(str(tmp_path / "model"), arch=case.arch)
    assert eplb_off(model, str(tmp_path / "off.log"), 8273) == transformers_greedy(model)


def test_refused_at_load_in_one_line(tmp_path):
    """GPT-OSS's weight loader (vLLM 0.32) cannot fill redundant expert slots: with
    num_redundant_experts 2 the server stops while the model loads, before /health answers,
    exit code 2, and its last line (but for the warnings of Python's resource tracker about
    shared memory vLLM leaves at a failed start) names the architecture and the way out."""
    model = build(str(tmp_path / "model"), arch="gpt_oss")
    cfg = tmp_path / "eplb.json"
    cfg.write_text(json.dumps({"window_size": 16, "step_interval": 24, "num_redundant_experts": 2}))
    s = Server(model, 8274, str(cfg), log_path=str(tmp_path / "serve.log"))
    with pytest.raises(RuntimeError, match=r"vllm serve \(.*serve.log\) exited with 2"):
        s.start()  # polls /health every second until the process exits
    s.stop()
    lines = [ln for ln in s.tail(400).splitlines() if ln.strip() and "resource_tracker" not in ln and "warnings.warn(" not in ln]
    assert lines[-1].startswith(
        "error: --eplb-config: vllm-eplb cannot balance GptOssForCausalLM: its weight loader fails with redundant expert slots"
    ), lines[-5:]
    assert lines[-1].endswith('set "num_redundant_experts": 0 in --eplb-config, or serve it without --eplb-config'), lines[-1]
