"""One protocol on every rank: what the ranks of the expert-parallel group must hold alike,
compared once at start-up, before any round is posted.

Rounds pair by the order they are posted in and are read by pass number, steps pair by
message tags: ranks whose configs schedule, step, vote, plan or move differently would read
each other's rounds as their own, commit different layers for one step, or exchange
messages of different sizes (gloo aborts the process on those). In a real deployment the
config is read per host (several nodes, headless data-parallel engines, the Python API), so
that is one typo away. So at start-up every rank publishes its protocol fields (the
BalancerConfig keys of `config.PROTOCOL_KEYS`, the topology and weight shapes, the transfer
backend, the pass clock's source, the vote layouts, the start-up placement, and what the
integration adds) and compares them with every peer's. Any difference: no rank balances,
each logs one line naming the keys and which ranks hold which value, serving goes on.
"""

from __future__ import annotations

import hashlib

import torch.distributed as dist

from .config import PROTOCOL_KEYS, BalancerConfig
from .faults import Reason, describe


def protocol_fields(config: BalancerConfig, **shared) -> dict[str, str]:
    """The fields a rank publishes: every protocol key of `config`, then `shared` (name ->
    anything with a stable repr)."""
    fields = {k: str(getattr(config, k)) for k in PROTOCOL_KEYS}
    fields.update({k: str(v) for k, v in shared.items()})
    return fields


def short_digest(data: bytes) -> str:
    """A field for something large (a placement): equal bytes, equal digest."""
    return hashlib.sha256(data).hexdigest()[:16]


def differences(everyone: list[dict[str, str]]) -> str:
    """'' when every rank published the same fields; else one line: for each key that
    differs, which ranks hold which value, e.g.
    `layers_per_pass differs (rank 0: 1 | rank 1: 2); step_interval differs (...)`."""
    keys = sorted({k for fields in everyone for k in fields})
    parts = []
    for key in keys:
        holders: dict[str, list[int]] = {}
        for rank, fields in enumerate(everyone):
            holders.setdefault(fields.get(key, "<absent>"), []).append(rank)
        if len(holders) > 1:
            said = " | ".join(f"rank{'s' if len(r) > 1 else ''} {', '.join(map(str, r))}: {_clip(v)}" for v, r in holders.items())
            parts.append(f"{key} differs ({said})")
    return "; ".join(parts)


def _clip(value: str, n: int = 80) -> str:
    return value if len(value) <= n else value[: n - 3] + "..."


def exchange(group, world_size: int, fields: dict[str, str]) -> list[dict[str, str]]:
    """Every rank's fields, in rank order. Collective (blocking) over `group`: called once,
    at start-up, where every rank of the group builds its balancer."""
    if world_size == 1:
        return [fields]
    everyone: list = [None] * world_size
    dist.all_gather_object(everyone, fields, group=group)
    return everyone


def startup_check(config: BalancerConfig, layout, comm, clock, placement, protocol: str, shared: dict):
    """Compare every field that shapes the protocol with every peer's, at start-up (collective
    over the EP group). None when every rank holds the same; else (reason, detail): a
    difference, or peers that cannot be reached; rebalancing is off then, as it is on every
    rank (each read the same fields). `layout`, `comm`: the balancer's MoELayout and Comm;
    `protocol`: the vote layouts' digest (core/agreement.py)."""
    t = layout.topo
    shapes = sorted({repr([(tuple(w.shape), str(w.dtype)) for w in layout.weights_of(layer)])
                     for layer in range(layout.num_layers)})
    fields = protocol_fields(
        config,
        protocol=protocol,
        ep_size=comm.world_size,
        topology=(f"{t.num_ranks} ranks x {t.slots_per_rank} slots, {t.num_logical} experts, "
                  f"ranks per node: {t.ranks_per_node or 'all'}, expert groups: {t.num_groups}"),
        moe_layers=layout.num_layers,
        weights=" + ".join(shapes),
        backend=comm.backend.name,
        device=layout.weights_of(0)[0].device.type,
        clock=clock.source,
        placement=short_digest(placement.tobytes()),
        **shared,
    )
    try:
        everyone = exchange(comm.agreement_group, comm.world_size, fields)
    except Exception as exc:  # a peer that never gets here: nothing can be agreed with it
        return Reason.AGREEMENT_TIMEOUT, describe(exc)
    diff = differences(everyone)
    if diff:
        return Reason.CONFIG_MISMATCH, diff
    return None
