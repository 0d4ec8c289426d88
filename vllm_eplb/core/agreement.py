"""Cross-rank agreement without stalling the forward loop (invariant 1, docs/architecture.md),
and the layouts of every round the balancer posts.

A *round* is a non-blocking all-reduce over a gloo CPU group, posted by every
rank at the same forward-pass number and read a fixed number of passes later
(`lag`). By then it has long completed (the forward passes in between run the
MoE collectives, which every rank must have reached, so every rank has posted);
if not, the reader waits at most `timeout_s` and the wait is counted. Every rank
reads the same reduced value at the same pass, so a decision taken from it is
taken at the same pass everywhere, from values every rank has seen.

Votes travel as one int64 vector reduced with MIN, laid out by a `VoteLayout`
that names each field and how it combines across ranks:

  all    every rank said yes          encoded x,      read min(x) == 1
  any    some rank said yes           encoded 1 - x,  read min(1 - x) == 0
  equal  every rank holds one value   encoded x, -x,  read min(x) == -min(-x)
  max    the largest value of a rank  encoded -x,     read -min(-x)

Every layout starts with six fields the protocol reads in every round:
`pass_no` (equal: the pass the round was scheduled for, so a rank on another
schedule is caught), `fault` (max: faults.encode(code, rank) of the worst local
failure since the last round, 0 for none; every rank reads the same code, so
every rank ends the cycle at the same round with the same reason), `skew`
(any: some rank's driver ticked more or less often than its forward passes ran),
`clock` (equal: the pass clock's offset between its two counts, the same on
every rank unless one rank's count drifted; core/pass_clock.py), `weights`
(equal: the weight updates this rank has applied, so a rank that applied one at
another pass than its peers is caught) and `maps` (equal: a digest of the routing
maps this rank routes with at the pass it posts, so maps that differ across ranks,
whatever made them differ, are seen in the next round read and healed there).

The balancer's rounds (one layout each, defined here):
  LoadLayout  the window's load (SUM), every rank's fault, pass, clock and maps digest at its own index
  READINESS   every rank has its plan; or a rank's plan ran past planning_timeout_s
  DIGEST      every rank holds the same plan, and it is worth moving
  COMMIT      which of the steps in flight (up to MAX_IN_FLIGHT) this rank has ready, and
              a digest of their layers (a step is never committed as different layers)
  WatchLayout while idle, the load trigger's watch window load (SUM; core/load_trigger.py)
  TRIGGER     some rank found the placement in force short of the last plan's promise
  RESUME      while suspended: every rank is ready to rebalance again

A slow rank is not a broken one. gloo times a collective out `timeout_s` after it
was posted on this rank: that is how far one rank may lag its peers (a long pass, a
pause, a slow host) while a round waits for it. Past it the round fails on every
rank: the ranks that timed out close their connections, so the late rank's post
fails too, and every rank sees the failure when it reads the round, at the same
pass. The cycle ends there on every rank and the group is rebuilt (its connections
are gone) for the next cycle, through the default group's store, over the same
ranks only (`rebuild`).

Limits of what a timeout can promise: if a round completes on some ranks while
another rank gave up waiting for it (the late post lands just as the timeout
fires), the two cannot learn each other's view (the two generals' problem). The
ranks that saw it complete fail at their next round instead, a round later.

A rank that cannot vote (its tick failed twice without posting: `mute`) posts nothing
more: its peers' next round never completes and fails on every rank at its read (the
muted rank reads its own unposted round as failed at the same pass), so the cycle ends
everywhere by the timeout path and the group is rebuilt.
"""

from __future__ import annotations

import hashlib
import itertools
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from types import SimpleNamespace

import torch
import torch.distributed as dist

from .faults import FAULT_RANKS, Fault
from .protocol import short_digest


class AgreementError(RuntimeError):
    """A round failed: a peer lagged past the timeout, is stuck or is gone."""


# How long a rebuild waits for every rank to come to it (at least; 10 x the round timeout if
# longer): a pause on the rebuild pass is a slow rank, not a lost one.
REBUILD_PATIENCE_S = 60.0


@dataclass
class WaitStats:
    rounds: int = 0
    late_rounds: int = 0  # result not there when read: the forward loop waited
    wait_seconds_total: float = 0.0
    wait_seconds_max: float = 0.0

    def record(self, seconds: float, late: bool) -> None:
        self.rounds += 1
        if late:
            self.late_rounds += 1
        self.wait_seconds_total += seconds
        self.wait_seconds_max = max(self.wait_seconds_max, seconds)


_WIDTH = {"all": 1, "any": 1, "equal": 2, "max": 1}
VOTE_WIDTH = 20  # every vote round has this many int64s, whatever its layout


class VoteLayout:
    """Named fields of one kind of vote round (see the module docstring)."""

    COMMON = (
        ("pass_no", "equal"), ("fault", "max"), ("skew", "any"), ("clock", "equal"), ("weights", "equal"),
        ("maps", "equal"),
    )

    def __init__(self, name: str, *fields: tuple[str, str]):
        self.name = name
        self.fields = self.COMMON + fields
        # One width for every layout, common fields first: a rank that is (by a bug) one
        # phase behind its peers still posts a round they can match and read the fault of.
        self.width = VOTE_WIDTH
        assert sum(_WIDTH[kind] for _, kind in self.fields) <= VOTE_WIDTH, name

    def encode(self, values: dict) -> list[int]:
        out: list[int] = []
        for name, kind in self.fields:
            x = int(values[name])
            if kind == "all":
                out.append(1 if x else 0)
            elif kind == "any":
                out.append(0 if x else 1)
            elif kind == "equal":
                out += [x, -x]
            else:  # max
                out.append(-x)
        return out + [0] * (self.width - len(out))

    def decode(self, tensor: torch.Tensor) -> SimpleNamespace:
        """all/any -> bool; equal -> (smallest value, same everywhere, largest value); max -> int."""
        v = [int(x) for x in tensor.tolist()]
        out, i = {}, 0
        for name, kind in self.fields:
            if kind == "all":
                out[name] = v[i] == 1
            elif kind == "any":
                out[name] = v[i] == 0
            elif kind == "equal":
                out[name] = (v[i], v[i] == -v[i + 1], -v[i + 1])
            else:
                out[name] = -v[i]
            i += _WIDTH[kind]
        return SimpleNamespace(**out)

    def pass_mismatch(self, v, posted_at: int) -> str:
        return f"round posted at pass {posted_at} on this rank was posted at another pass elsewhere"

    def clock_spread(self, v) -> str:
        return f"from {v.clock[0]} to {v.clock[2]} across ranks"


class LoadLayout:
    """The load round, reduced with SUM: the window's (layers, slots) load and its sampled
    passes' (passes, layers, ranks) load, then per rank, at the rank's own index, its fault,
    the pass it posted at, its clock offset and its maps digest (the SUM hands every rank all
    of them). Decoded with the vote layouts' common fields, so one read checks every round."""

    name = "load"
    TAIL = 4  # per rank: fault, pass number, clock offset, maps digest

    def __init__(self, load_shape: tuple, per_pass_shape: tuple, world_size: int):
        self.load_shape, self.per_pass_shape, self.world_size = tuple(load_shape), tuple(per_pass_shape), world_size

    def encode(self, load: torch.Tensor, per_pass: torch.Tensor, rank: int, fault: int, pass_no: int, clock: int,
               maps: int = 0) -> torch.Tensor:
        n = self.world_size
        tail = torch.zeros(self.TAIL * n, dtype=torch.int64)
        tail[rank], tail[n + rank], tail[2 * n + rank], tail[3 * n + rank] = fault, pass_no, clock, maps
        return torch.cat([load.reshape(-1), per_pass.reshape(-1), tail])

    def zeros(self) -> tuple[torch.Tensor, torch.Tensor]:
        """What a rank whose window copy failed contributes: no load."""
        return torch.zeros(self.load_shape, dtype=torch.int64), torch.zeros(self.per_pass_shape, dtype=torch.int64)

    def decode(self, value: torch.Tensor) -> SimpleNamespace:
        n = self.world_size
        size = int(torch.Size(self.load_shape).numel())
        faults, passes, clocks, maps = value[-self.TAIL * n:].reshape(self.TAIL, n)
        return SimpleNamespace(
            load=value[:size].reshape(self.load_shape),
            per_pass=value[size : -self.TAIL * n].reshape(self.per_pass_shape),
            passes=passes.tolist(), clocks=clocks.tolist(),
            pass_no=_spread(passes), clock=_spread(clocks), maps=_spread(maps),
            fault=int(faults.max()), skew=False,
            weights=(0, True, 0),  # not carried: the votes of the cycle check it
        )

    def pass_mismatch(self, v, posted_at: int) -> str:
        return (f"{self.name} round posted at pass {posted_at} here was posted at passes {v.passes} "
                f"by ranks 0..{self.world_size - 1}")

    def clock_spread(self, v) -> str:
        return f"by ranks 0..{self.world_size - 1}: {v.clocks}"


class WatchLayout(LoadLayout):
    """The load trigger's watch round (core/load_trigger.py), reduced with SUM: a watch window's
    (layers, slots) load, then per rank, at its own index: its fault (always 0: faults belong to
    cycles), the pass it posted at, its clock offset, its maps digest, and 1 if its window's
    load is spoiled (a local failure: the window cannot be judged). No sampled passes."""

    name = "watch"
    TAIL = 5  # per rank: fault, pass number, clock offset, maps digest, spoiled

    def __init__(self, load_shape: tuple, world_size: int):
        super().__init__(load_shape, (0,), world_size)

    def encode(self, load: torch.Tensor, rank: int, pass_no: int, clock: int, spoiled: bool, maps: int = 0) -> torch.Tensor:
        n = self.world_size
        tail = torch.zeros(self.TAIL * n, dtype=torch.int64)
        tail[n + rank], tail[2 * n + rank], tail[3 * n + rank], tail[4 * n + rank] = pass_no, clock, maps, int(spoiled)
        return torch.cat([load.reshape(-1), tail])

    def decode(self, value: torch.Tensor) -> SimpleNamespace:
        n = self.world_size
        faults, passes, clocks, maps, spoiled = value[-self.TAIL * n:].reshape(self.TAIL, n)
        return SimpleNamespace(
            load=value[: -self.TAIL * n].reshape(self.load_shape), spoiled=bool(spoiled.any()),
            passes=passes.tolist(), clocks=clocks.tolist(),
            pass_no=_spread(passes), clock=_spread(clocks), maps=_spread(maps),
            fault=int(faults.max()), skew=False, weights=(0, True, 0),
        )


def _spread(per_rank: torch.Tensor) -> tuple[int, bool, int]:
    """(smallest, same on every rank, largest) of a per-rank field, as an `equal` field reads."""
    lo, hi = int(per_rank.min()), int(per_rank.max())
    return lo, lo == hi, hi


READINESS = VoteLayout("readiness", ("ready", "all"), ("expired", "any"))
DIGEST = VoteLayout("digest", ("digest_a", "equal"), ("digest_b", "equal"), ("worth", "all"))
MAX_IN_FLIGHT = 6  # steps a commit vote can name (its layout's width)
# `layers`: a digest of the layers of every step it names, so a step is never committed as
# different layers on different ranks
COMMIT = VoteLayout(
    "commit", ("first_seq", "equal"), ("layers", "equal"), *((f"ready{i}", "all") for i in range(MAX_IN_FLIGHT))
)
# the load trigger's verdict: some rank found the placement in force short of its promise
TRIGGER = VoteLayout("trigger", ("start", "any"), ("alone", "all"))
# while suspended: every rank ready to rebalance again (its planner alive, its transfer group healthy)
RESUME = VoteLayout("resume", ("ready", "all"))
# What the ranks' rounds mean: equal on every rank (compared at start-up) or no round pairs.
PROTOCOL = short_digest(repr((VOTE_WIDTH, FAULT_RANKS, [(f.name, f.value) for f in Fault],
                              [(v.name, v.fields) for v in (READINESS, DIGEST, COMMIT, TRIGGER, RESUME)])).encode())


def layers_digest(steps: list[tuple[int, list[int]]]) -> int:
    """(sequence number, layers) of steps, as one int64 every rank computes alike."""
    text = repr(list(steps)).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 2


class Round:
    def __init__(
        self, tensor: torch.Tensor, work, posted_at: int, due_at: int, agreement: "Agreement", layout=None, error=None
    ):
        self.tensor = tensor
        self._work = work
        self._error = error  # the post itself failed (a torn-down group): raised when read
        self.sent: dict = {}  # a vote's fields as this rank posted them
        self.posted_at = posted_at
        self.due_at = due_at
        self.layout = layout
        self._agreement = agreement
        self._value: torch.Tensor | None = None

    def result(self) -> torch.Tensor:
        """The reduced tensor. Waits (measured) at most the agreement timeout if the
        collective is still in flight; raises AgreementError if it failed or timed out."""
        if self._value is not None:
            return self._value
        if self._error is not None:
            raise AgreementError(f"agreement round posted at pass {self.posted_at} failed: {self._error}") from self._error
        stats = self._agreement.stats
        late = self._work is not None and not self._work.is_completed()
        t0 = time.perf_counter()
        try:
            if self._work is not None:
                ok = self._work.wait(timeout=timedelta(seconds=self._agreement.timeout_s))
                if ok is False:
                    raise TimeoutError(f"no result within {self._agreement.timeout_s:g} s")
        except Exception as exc:  # gloo raises RuntimeError subclasses on timeout / peer loss
            stats.record(time.perf_counter() - t0, True)
            raise AgreementError(f"agreement round posted at pass {self.posted_at} failed: {exc}") from exc
        stats.record(time.perf_counter() - t0, late)
        self._value = self.tensor
        return self._value

    def votes(self) -> SimpleNamespace:
        value = self.result()  # a failed round raises before its layout is read (a stand-in has none)
        return self.layout.decode(value)


class Agreement:
    """Posts rounds on a gloo group. `group=None` with world size 1 runs locally."""

    _instances = itertools.count()  # numbers this process's agreements alike on every rank

    def __init__(self, group, world_size: int, lag: int, timeout_s: float = 60.0):
        self.group = group
        self.world_size = world_size
        self.lag = lag
        self.timeout_s = timeout_s
        self.stats = WaitStats()
        self.rebuilds = 0
        self.posts = 0  # rounds posted (or, muted, not posted): a pass's work posted something or not
        self.muted = ""  # why this rank stopped voting until the group is rebuilt ("" while it votes)
        self._instance = next(Agreement._instances)
        self._ranks = dist.get_process_group_ranks(group) if world_size > 1 else [0]
        self._rebuilding: threading.Thread | None = None
        self._rebuilt: dict = {}  # the rebuild in progress: "group", or the "error" that stopped it

    def post(self, values, pass_no: int, op=dist.ReduceOp.MIN, layout: VoteLayout | None = None) -> Round:
        tensor = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=torch.int64)
        work = error = None
        self.posts += 1
        if self.muted:
            # nothing goes out: the peers' round fails at its read, this rank's at the same pass
            error = AgreementError(self.muted)
        elif self.world_size > 1 and self.group is None:
            # never the default group: a round that pairs with nothing fails like a lost peer
            error = AgreementError("no agreement group: its rebuild did not complete")
        elif self.world_size > 1:
            try:
                work = dist.all_reduce(tensor, op=op, group=self.group, async_op=True)
            except Exception as exc:  # reported when the round is read, at the same pass as on every rank
                error = exc
        return Round(tensor, work, pass_no, pass_no + self.lag, self, layout, error)

    def mute(self, why: str) -> None:
        """This rank cannot vote (its schedule is lost): post nothing more until the group is
        rebuilt, so every rank's next round fails at its read, at the same pass (the timeout path)."""
        self.muted = why

    def vote(self, layout: VoteLayout, values: dict, pass_no: int) -> Round:
        values = {**values, "pass_no": pass_no}
        r = self.post(layout.encode(values), pass_no, layout=layout)
        r.sent = values
        return r

    # ---- after a failed round

    def rebuild(self) -> None:
        """Start building a new group over the same ranks, in the background (a failed
        round tore the old one's connections down). Every rank calls it at the same pass;
        `wait_rebuilt` before the next post.

        The ranks meet first (a counter in the default store), with far more patience than a
        round's timeout: a rank that pauses on the rebuild pass (a slow host, a stop) must not
        make its peers give the rebuild up. Only once all are there is the gloo group built,
        with the round timeout. A rebuild that still fails leaves no group: the next round
        fails on every rank at its read, the cycle ends, and the next rebuild is the retry
        (with the back-off of repeated failures: the `suspended` state)."""
        self.muted = ""  # a new group, a new schedule: the rank votes again
        if self.world_size == 1:
            return
        self.rebuilds += 1
        self.group = None
        prefix = f"vllm_eplb/agreement/{self._instance}/{'_'.join(map(str, self._ranks))}/{self.rebuilds}/"
        me, n, timeout_s = self._ranks.index(dist.get_rank()), len(self._ranks), self.timeout_s
        box: dict = {}  # this rebuild's outcome; a later rebuild gets its own (a stale thread writes here only)
        self._rebuilt = box

        def build():
            try:
                store = dist.PrefixStore(prefix, dist.distributed_c10d._get_default_store())
                store.add("arrived", 1)
                patience = max(REBUILD_PATIENCE_S, 10 * timeout_s)
                deadline, delay = time.monotonic() + patience, 0.005
                while (arrived := store.add("arrived", 0)) < n:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"{n - arrived} of {n} ranks did not come to rebuild it within {patience:g} s")
                    time.sleep(delay)
                    delay = min(2 * delay, 0.25)
                box["group"] = dist.ProcessGroupGloo(store, me, n, timedelta(seconds=timeout_s))
            except Exception as exc:
                box["error"] = exc

        self._rebuilding = threading.Thread(target=build, name="eplb-agreement-rebuild", daemon=True)
        self._rebuilding.start()

    def wait_rebuilt(self) -> None:
        """Wait (at most timeout_s) for the group `rebuild` started; AgreementError if it is
        not there (a peer still away, or gone). Returns at once when there is nothing to wait for."""
        if self._rebuilding is None:
            return
        t0 = time.perf_counter()
        self._rebuilding.join(self.timeout_s)
        waited = time.perf_counter() - t0
        self.stats.wait_seconds_total += waited
        self.stats.wait_seconds_max = max(self.stats.wait_seconds_max, waited)
        self._rebuilding, box = None, self._rebuilt
        if "group" not in box:
            why = box.get("error", f"not built within {self.timeout_s:g} s")
            raise AgreementError(f"the agreement group could not be rebuilt: {why}")
        self.group = box["group"]


def new_gloo_group(ranks: list[int], timeout_s: float):
    """A dedicated gloo group; must be called by every process of the default group."""
    return dist.new_group(ranks=ranks, backend="gloo", timeout=timedelta(seconds=timeout_s))
