"""One protocol and one clock on every rank (core/protocol.py, core/pass_clock.py), the parts
that need no second process. The multi-rank behaviour (a config differing at start-up, an
uncounted pass, a slow pass) is in the fault matrix."""

from __future__ import annotations

import torch

from vllm_eplb.core import BalancerConfig, ForwardCounter, PassClock
from vllm_eplb.core.config import LOCAL_KEYS, PROTOCOL_KEYS
from vllm_eplb.core.pass_clock import advance_if_first_layer
from vllm_eplb.core.protocol import differences, protocol_fields
from vllm_eplb.integration.config import SHARED_KEYS, EplbConfig


def test_every_key_is_either_protocol_or_local():
    """A new key must say whether the ranks have to agree on it."""
    assert set(PROTOCOL_KEYS) | set(LOCAL_KEYS) == set(BalancerConfig.model_fields)
    assert not set(PROTOCOL_KEYS) & set(LOCAL_KEYS)
    assert set(SHARED_KEYS) <= set(EplbConfig.model_fields)


def test_differences_name_the_keys_and_the_ranks():
    base = protocol_fields(BalancerConfig(), topology="4 ranks")
    other = protocol_fields(BalancerConfig(layers_per_pass=2, step_interval=4000), topology="4 ranks")
    assert differences([base, base, base]) == ""
    assert differences([base, other, base, base]) == (
        "layers_per_pass differs (ranks 0, 2, 3: 1 | rank 1: 2); step_interval differs (ranks 0, 2, 3: 3000 | rank 1: 4000)"
    )
    # a field one rank does not publish at all (another release) is a difference too
    assert differences([base, {k: v for k, v in base.items() if k != "topology"}]) == (
        "topology differs (rank 0: 4 ranks | rank 1: <absent>)"
    )


def test_clock_on_host_counts_moe_layers_and_checks_the_runner():
    runner = [0]
    layers = ForwardCounter()
    clock = PassClock(lambda: runner[0], layers)
    assert clock.source == "moe_layers"
    for _ in range(3):  # three passes, each counted by both
        runner[0] += 1
        layers.advance()
    assert (clock.now(), clock.offset()) == (3, 0)
    layers.advance()  # a pass the runner never counted: the schedule has it, the offset says so
    assert (clock.now(), clock.offset()) == (4, -1)


def test_clock_counts_micro_batches_once_per_pass():
    runner, layers = [2], ForwardCounter()
    for _ in range(4):  # the first layer runs once per micro-batch: 2 passes of 2
        layers.advance()
    clock = PassClock(lambda: runner[0], layers, layer_runs_per_pass=2)
    assert (clock.now(), clock.offset()) == (2, 0)


def test_clock_without_a_counter_is_the_runners_unchecked():
    runner = [5]
    clock = PassClock(lambda: runner[0])
    assert (clock.source, clock.now(), clock.offset()) == ("runner", 5, 0)


def test_router_advances_the_counter_of_the_first_layer_only():
    load = torch.zeros((3, 8), dtype=torch.int32)
    counter = ForwardCounter()
    counter.watch(load[0])
    try:
        for layer in range(3):  # one pass through three MoE layers
            advance_if_first_layer(load[layer])
        assert counter.read() == 1
    finally:
        counter.unwatch()
    advance_if_first_layer(load[0])  # no longer watched
    assert counter.read() == 1


def test_balancer_without_a_clock_is_refused_before_anything_starts():
    """No clock: one clear error at once, before the planner, the rounds or a group exist."""
    import pytest

    from vllm_eplb.core import Balancer

    with pytest.raises(TypeError, match="PassClock"):
        Balancer(BalancerConfig(), None, None, clock=None)
