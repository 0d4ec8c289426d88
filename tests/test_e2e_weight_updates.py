"""Weight updates under a moving placement, end to end on CPU: `vllm serve` of a tiny
Qwen3-MoE, TP=2 + expert parallelism, the balancer on (4 redundant slots).

After two rebalances, vLLM's own `reload_weights` RPC (POST /collective_rpc, dev mode)
loads a checkpoint whose routed experts differ, three times: while idle (A -> B), while
planning (B -> A) and while transferring, once the first layer committed (A -> B: the
later layers' steps are in flight, voted ready in rounds not read yet). After each, the
greedy float32 outputs are those of the checkpoint loaded (B: a server fresh from it with
EPLB off; A: this server's own before any rebalance) and every slot, read from the
workers, holds the bytes of the expert its map
names (slot_rpc fingerprints, against the EPLB-off server's or the start-up ones). The
cycles caught in flight end on both ranks at one pass with reason weight_update; the next
cycle moves the new weights, which verify_slots checks at every commit against the
reference it took again after each update. A kernel-format reload is refused in one line
once experts moved, and the server goes on."""

from __future__ import annotations

import json
import random
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from vllm_eplb.harness.server import Load, Server, http_post, metric
from vllm_eplb.integration.slot_rpc import check_slots, expert_fingerprints
from vllm_eplb.harness.tiny_model import WORDS, build, new_experts

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

PROMPTS = ["the model of the expert", "one two three four", "load on a rank is", "great old year off come"]
RPC_SERVER = {
    "extra": ["--worker-extension-cls", "vllm_eplb.integration.slot_rpc.SlotRpc"],
    "env": {"VLLM_SERVER_DEV_MODE": "1"},  # /collective_rpc, /reset_prefix_cache
}
EPLB = {
    "window_size": 16, "step_interval": 32, "num_redundant_experts": 4, "agreement_lag": 2,
    # every plan that moves something is applied (deepseek re-plans each window from scratch),
    # so a cycle reaches transferring again after the updates
    "policy": "deepseek", "improvement_threshold": 0.0, "verify_slots": True,
}
RANKS = (0, 1)


def rpc(server: Server, method: str, **kwargs):
    return http_post(server.url + "/collective_rpc", {"method": method, "kwargs": kwargs})


def slots(server: Server) -> list[dict]:
    return rpc(server, "eplb_slot_fingerprints")["results"]


def reload(server: Server, path: str) -> None:
    """What an RL trainer does after writing a checkpoint: reload it, and drop the KV blocks
    cached with the old weights."""
    rpc(server, "reload_weights", weights_path=path)
    urllib.request.urlopen(urllib.request.Request(server.url + "/reset_prefix_cache", b"", method="POST"), timeout=60)


def outputs(server: Server) -> list:
    return [server.complete(p) for p in PROMPTS]


def at(ms: dict, state: str) -> bool:
    return all(metric(ms, "vllm:eplb_state", rank=r, state=state) == 1 for r in RANKS)


def step_until(server: Server, done, rng: random.Random, limit: int = 600) -> dict:
    """One forward pass at a time (a one-token request, nothing else in flight) until
    done(metrics); the balancer's state read between passes is the one an update RPC sent
    then meets."""
    for _ in range(limit):
        ms = server.metrics()
        if done(ms):
            return ms
        server.complete(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))), max_tokens=1)
    raise AssertionError(f"not reached in {limit} passes: {server.tail()}")


def count(ms: dict, name: str, rank: int, **labels) -> float:
    return metric(ms, name, rank=rank, **labels) or 0


def aborted_for_update(ms: dict, rank: int) -> float:
    return count(ms, "vllm:eplb_cycles_total", rank, outcome="aborted", reason="weight_update")


def run_load_until(server: Server, done, deadline_s: float = 300) -> dict:
    load = Load(server, clients=6)
    load.start()
    try:
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            ms = server.metrics()
            if done(ms):
                return ms
            time.sleep(0.2)
        raise AssertionError(f"not reached under load in {deadline_s:.0f} s: {server.tail()}")
    finally:
        load.stop()
        assert not load.errors, load.errors[:3]


def moved(answers: list[dict]) -> bool:
    """Some slot holds another expert than at start-up (slot p held p % 16)."""
    return any(e != slot % 16 for a in answers for row in a["placement"] for slot, e in enumerate(row))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    a = build(str(d / "A"))
    return a, new_experts(a, str(d / "B"), seed=1)


@pytest.fixture(scope="module")
def reference_b(checkpoints, tmp_path_factory):
    """A server fresh from checkpoint B, EPLB off: its outputs and its experts' fingerprints."""
    _, b = checkpoints
    log = str(tmp_path_factory.mktemp("logs") / "off_b.log")
    with Server(b, 8261, None, log_path=log, **RPC_SERVER) as s:
        return outputs(s), expert_fingerprints(slots(s))


@pytest.fixture(scope="module")
def run(checkpoints, reference_b, tmp_path_factory):
    a, b = checkpoints
    d = tmp_path_factory.mktemp("eplb")
    cfg = d / "eplb.json"
    cfg.write_text(json.dumps(EPLB))
    rng = random.Random(0)
    seen: dict = {"log": str(d / "serve.log")}
    with Server(a, 8262, str(cfg), log_path=seen["log"], **RPC_SERVER) as s:
        start = slots(s)
        seen["start_moved"] = moved(start)
        ref = {"A": expert_fingerprints(start), "B": reference_b[1]}
        seen["outputs_a"] = outputs(s)

        # two rebalances that moved experts
        ms = run_load_until(s, lambda ms: all(count(ms, "vllm:eplb_cycles_total", r, outcome="completed") >= 2 for r in RANKS))
        seen["completed_before"] = count(ms, "vllm:eplb_cycles_total", 0, outcome="completed")
        seen["moved_before"] = moved(slots(s))

        updates = []  # (when, checkpoint, metrics after, outputs after, slots the map names wrongly)

        def update(when: str, path: str, name: str, before: dict) -> None:
            reload(s, path)
            # a few passes: the round carrying the fault is read (agreement_lag 2, rounds every 2)
            for _ in range(8):
                s.complete(" ".join(rng.choice(WORDS) for _ in range(4)), max_tokens=1)
            after = s.metrics()
            updates.append((when, name, before, after, outputs(s), check_slots(slots(s), ref[name])))

        update("idle", b, "B", step_until(s, lambda ms: at(ms, "idle"), rng))
        update("planning", a, "A", step_until(s, lambda ms: at(ms, "planning"), rng))

        def first_layer_committed(ms: dict) -> bool:
            # the layers after it are in flight, voted ready in rounds not read yet
            return at(ms, "transferring") and all(count(ms, "vllm:eplb_transfer_layer", r) >= 1 for r in RANKS)

        update("transferring", b, "B", step_until(s, first_layer_committed, rng))
        seen["updates"] = updates
        seen["moved_at_updates"] = moved(slots(s))

        # a kernel-format reload cannot be placed once experts moved: refused, nothing written
        try:
            rpc(s, "reload_weights", weights_path=b, is_checkpoint_format=False)
            seen["kernel_format"] = "accepted"
        except urllib.error.HTTPError as exc:
            seen["kernel_format"] = f"refused: HTTP {exc.code}"
        seen["kernel_format_outputs"] = outputs(s)

        # the next cycle moves the new weights
        done = count(s.metrics(), "vllm:eplb_cycles_total", 0, outcome="completed")
        seen["final"] = run_load_until(
            s, lambda ms: all(count(ms, "vllm:eplb_cycles_total", r, outcome="completed") > done for r in RANKS)
        )
        seen["outputs_final"] = outputs(s)
        seen["slots_final"] = check_slots(slots(s), ref["B"])
        seen["final"] = s.metrics()
    return seen


def test_updates_land_in_every_slot_of_each_expert(run, reference_b):
    assert not run["start_moved"] and run["moved_before"] and run["moved_at_updates"], "no rebalance moved experts"
    assert run["completed_before"] >= 2
    expected = {"A": run["outputs_a"], "B": reference_b[0]}
    for when, name, _, _, outs, wrong in run["updates"]:
        assert not wrong, f"after the update while {when}: slots hold other bytes than their expert's in {name}: {wrong[:5]}"
        assert outs == expected[name], f"greedy outputs after the update while {when} are not those of checkpoint {name}"


def test_update_in_flight_ends_the_cycle_on_both_ranks(run):
    results = {when: (before, after) for when, _, before, after, _, _ in run["updates"]}
    before, after = results["idle"]
    for r in RANKS:
        assert aborted_for_update(after, r) == 0, "an update while idle aborted a cycle"
    for n, when in enumerate(("planning", "transferring"), start=1):
        before, after = results[when]
        assert at(before, when)
        for r in RANKS:
            assert aborted_for_update(after, r) == n, (when, r, aborted_for_update(after, r))
            assert count(after, "vllm:eplb_weight_updates_total", r) == n + 1
        # one pass on both ranks, after the update's
        assert count(after, "vllm:eplb_last_abort_pass", 0) == count(after, "vllm:eplb_last_abort_pass", 1)
        assert count(after, "vllm:eplb_last_abort_pass", 0) > count(before, "vllm:eplb_pass", 0)
    log = Path(run["log"]).read_text()
    assert log.count("weight_update; voting to end the cycle") >= 4  # 2 cycles x 2 ranks


def test_commits_caught_in_flight_do_not_land(run):
    """The transferring update came while steps voted ready were in flight: no layer
    committed between the update and the end of the cycle."""
    _, after = {when: (b, a) for when, _, b, a, _, _ in run["updates"]}["transferring"]
    before = {when: b for when, _, b, _, _, _ in run["updates"]}["transferring"]
    for r in RANKS:
        assert count(after, "vllm:eplb_committed_layers_total", r) == count(before, "vllm:eplb_committed_layers_total", r)


def test_next_cycle_moves_the_new_weights(run, reference_b):
    final = run["final"]
    assert run["outputs_final"] == reference_b[0]
    assert not run["slots_final"], run["slots_final"][:5]
    for r in RANKS:
        assert count(final, "vllm:eplb_enabled", r) == 1
        assert count(final, "vllm:eplb_slot_checks_total", r, result="mismatch") == 0
        assert count(final, "vllm:eplb_slot_checks_total", r, result="ok") > 0
        assert count(final, "vllm:eplb_weight_updates_total", r) == 3


def test_kernel_format_reload_refused_once_experts_moved(run, reference_b):
    assert run["kernel_format"].startswith("refused"), run["kernel_format"]
    line = "vllm-eplb: reload_weights(is_checkpoint_format=False) copies expert tensors as given, and experts of MoE layers"
    assert line in Path(run["log"]).read_text()
    assert run["kernel_format_outputs"] == reference_b[0], "the refused reload changed the weights"
