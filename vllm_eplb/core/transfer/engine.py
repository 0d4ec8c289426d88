"""Runs transfer steps and commits them.

A step is started (backend posts sends/receives into staging), later finished
(wait for this rank's data), and, after the ranks agreed every rank finished,
committed: staged experts and local copies are written into the weight slots.
The routing maps of the same layers are written by the balancer at the same
pass, so weights and maps change together (invariant 2).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .backend import TAG_LAYERS, LayerJob, TransferBackend, TransferError, TransferHandle, expert_nbytes, job_tag
from .plan import LayerPlan


@dataclass
class StepResult:
    layers: list[int]
    experts_received: int
    bytes_received: int
    bytes_sent: int
    staging_bytes: int
    seconds: float  # from start to data complete on this rank, as seen by the CPU
    device_seconds: float | None = None  # copy time on the GPU (GPU backends)


@dataclass
class InFlightStep:
    jobs: list[LayerJob]
    handle: TransferHandle
    started: float
    received: dict | None = None
    result: StepResult | None = None
    local: list[dict] | None = None  # per job: expert -> snapshot of its old local slot


@dataclass
class TransferTotals:
    steps: int = 0
    experts_received: int = 0
    bytes_received: int = 0
    bytes_sent: int = 0
    max_staging_bytes: int = 0
    step_seconds: list[float] = field(default_factory=list)


class TransferEngine:
    def __init__(self, backend: TransferBackend, weights_of: Callable[[int], list[torch.Tensor]], rank: int):
        self.backend = backend
        self.weights_of = weights_of
        self.rank = rank
        self.totals = TransferTotals()
        self._seq = 0  # steps started

    def start(self, plans: list[LayerPlan], seq: int | None = None) -> InFlightStep:
        """Start one step. `seq` numbers its messages (the balancer's step number, the same
        on every rank); without it, the steps this engine started."""
        assert len(plans) <= TAG_LAYERS, f"at most {TAG_LAYERS} layers per step"
        if seq is None:
            seq, self._seq = self._seq, self._seq + 1
        jobs = [LayerJob(p, self.weights_of(p.layer), job_tag(seq, p.layer)) for p in plans]
        handle = self.backend.start(jobs, self.rank)
        return InFlightStep(jobs, handle, time.perf_counter())

    def finish(self, step: InFlightStep) -> StepResult:
        """Wait for this rank's data and prepare its commit. Raises TransferError (or an
        allocation error from prepare)."""
        received = step.handle.wait()
        for job in step.jobs:
            for t in job.plan.part(self.rank).recvs:
                for e in t.experts:
                    if (job.plan.layer, e) not in received:
                        raise TransferError(f"layer {job.plan.layer}: expert {e} was not received")
        step.received = received
        seconds = time.perf_counter() - step.started
        n_recv = sum(len(t.experts) for j in step.jobs for t in j.plan.part(self.rank).recvs)
        b_recv = sum(
            len(t.experts) * expert_nbytes(j.weights) for j in step.jobs for t in j.plan.part(self.rank).recvs
        )
        b_sent = sum(
            len(t.experts) * expert_nbytes(j.weights) for j in step.jobs for t in j.plan.part(self.rank).sends
        )
        step.result = StepResult(
            [j.plan.layer for j in step.jobs], n_recv, b_recv, b_sent, step.handle.staging_bytes, seconds,
            step.handle.device_seconds(),
        )
        self.prepare(step)
        return step.result

    def prepare(self, step: InFlightStep) -> None:
        """Everything the commit allocates, done before the commit vote: snapshots of
        local sources (a slot copied from may itself be overwritten). After this, commit
        only copies into existing memory, so it cannot fail part-way."""
        assert step.received is not None, "prepare before finish"
        step.local = []
        for job in step.jobs:
            part = job.plan.part(self.rank)
            step.local.append({e: [w[s].clone() for w in job.weights] for e, s in part.local_sources.items()})

    def commit(self, step: InFlightStep) -> None:
        """Write staged and locally copied experts into their slots (copies only)."""
        assert step.local is not None, "commit before prepare"
        for job, local in zip(step.jobs, step.local):
            for slot, e in job.plan.part(self.rank).writes.items():
                src = local.get(e) or step.received[(job.plan.layer, e)]
                for w, t in zip(job.weights, src):
                    w[slot].copy_(t)
        step.handle.release()  # its staging serves a later step once these copies ran
        r = step.result
        if r is not None:
            tot = self.totals
            tot.steps += 1
            tot.experts_received += r.experts_received
            tot.bytes_received += r.bytes_received
            tot.bytes_sent += r.bytes_sent
            tot.max_staging_bytes = max(tot.max_staging_bytes, r.staging_bytes)
            tot.step_seconds.append(r.seconds)
            del tot.step_seconds[:-1000]
