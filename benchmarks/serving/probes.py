"""The probes that check outputs: fixed prompts of the topics, greedy, against a reference run
(EPLB off, same dtype and quantization), in two measures:

- greedy: whole generations identical to the reference's;
- teacher-forced: the log-probability of every token of the reference's sequences given the
  ones before it (vLLM's prompt_logprobs), so one flipped argmax does not change what the rest is
  measured on; the largest change of any token (`drift`, nats).

What may differ (`within_noise`): in float32 on CPU nothing but the last bits; in bf16 a token's
expert outputs are summed across ranks in an order the placement sets (DESIGN, invariant 5), so
log-probabilities move by what a placement change alone moves them (measured in the run: the
start-up placement against the reference, before anything moved) and greedy choices flip at
near-ties. A slot holding the wrong expert moves log-probabilities by nats.
"""

from __future__ import annotations

import random
import time

from vllm_eplb.harness.server import http_post

from .model import topic_range

PROBES = 8


def probe_prompts(a, vocab: int) -> list[list[int]]:
    rng = random.Random(7)
    out = []
    for i in range(PROBES):
        lo, hi = topic_range(vocab, a.groups, i % a.groups)
        out.append([rng.randrange(lo, hi) for _ in range(12)])
    return out


def greedy(s, model: str, prompts: list[list[int]], tokens: int) -> list[list[int]]:
    body = {"model": model, "prompt": prompts, "max_tokens": tokens, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
    choices = sorted(http_post(s.url + "/v1/completions", body)["choices"], key=lambda c: c["index"])
    return [c.get("token_ids") or c["text"] for c in choices]


def forced_logprobs(server, model: str, seqs: list[list[int]]) -> list[list[float]]:
    """Teacher-forced: the log-probability of each token of each sequence given the ones before
    it (vLLM's prompt_logprobs), so one flipped argmax does not change what the rest is measured on."""
    body = {"model": model, "prompt": seqs, "max_tokens": 1, "temperature": 0, "prompt_logprobs": 0}
    choices = sorted(http_post(server.url + "/v1/completions", body)["choices"], key=lambda c: c["index"])
    return [[d[str(t)]["logprob"] for t, d in zip(seq[1:], c["prompt_logprobs"][1:])] for c, seq in zip(choices, seqs)]


def drift(a: list[list[float]], b: list[list[float]]) -> float:
    """Largest |log-probability change| of any token."""
    return max(abs(x - y) for u, v in zip(a, b) for x, y in zip(u, v))


def probe_rounds(server, model: str, prompts, tokens: int, ref: dict, seconds: float) -> dict:
    """Rounds of the probes sent for `seconds` while traffic runs: greedy outputs identical to
    `ref["greedy"]`, and the largest teacher-forced drift from `ref["logprobs"]` (of the
    sequences `ref["forced"]`)."""
    same = total = 0
    worst = 0.0
    t0 = time.monotonic()
    while time.monotonic() < t0 + seconds or total < 3 * len(prompts):
        out = greedy(server, model, prompts, tokens)
        same += sum(x == y for x, y in zip(out, ref["greedy"]))
        total += len(prompts)
        worst = max(worst, drift(forced_logprobs(server, model, ref["forced"]), ref["logprobs"]))
    return {"identical": f"{same}/{total}", "share": same / total, "drift": worst}


def reference_probes(server, model: str, prompts, tokens: int) -> dict:
    out = greedy(server, model, prompts, tokens)
    forced = [p + list(o) for p, o in zip(prompts, out)]
    return {"greedy": out, "forced": forced, "logprobs": forced_logprobs(server, model, forced)}


# A teacher-forced log-probability may move by DRIFT_FLOOR, or by DRIFT_FACTOR x what a placement
# change alone moves it or what the reference's own repeats move it, whichever is larger.
DRIFT_FLOOR, DRIFT_FACTOR = 0.05, 4.0


def within_noise(probes: dict, static_drift: float, ref_repeats: dict) -> tuple[bool, float]:
    """(ok, bound) for probe rounds against the reference: exact where the reference repeats
    exactly and a placement change alone moves nothing, else drift within the bound."""
    if ref_repeats["share"] == 1.0 and ref_repeats["drift"] == 0.0 and static_drift == 0.0:
        return probes["share"] == 1.0 and probes["drift"] == 0.0, 0.0
    bound = max(DRIFT_FLOOR, DRIFT_FACTOR * max(static_drift, ref_repeats["drift"]))
    return probes["drift"] <= bound, bound
