"""One rank of the GPU rebalance benchmark: its device, groups, synthetic MoE (the rig's gated
model of DeepSeek-V3's expert shapes), the transfer backend of every strategy (made by the
integration's own selector), the interconnect's measured limit, and the checks."""

from __future__ import annotations

import torch
import torch.distributed as dist

from vllm_eplb.core import Topology, new_gloo_group
from vllm_eplb.core.transfer.select import make_backend
from vllm_eplb.harness.checks import InvariantChecker
from vllm_eplb.harness.synthetic_moe import SyntheticMoE

from .load import Load

STRATEGIES = ["stop-the-world", "gloo", "cuda_ipc", "nccl"]


def peer_copy_limit(cpu_group, rank: int, world: int, device, nbytes: int) -> dict:
    """GB/s of one rank pulling a peer's buffer over CUDA IPC (one direction), and of
    every rank pulling at once (per rank): the interconnect's limit, measured here."""
    from torch.multiprocessing.reductions import reduce_tensor

    buf = torch.ones(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(buf)
    handles: list = [None] * world
    dist.all_gather_object(handles, reduce_tensor(buf), group=cpu_group)
    fn, args = handles[(rank + 1) % world]
    src = fn(*args)
    result = {}
    for mode in ("one", "all"):
        samples = []
        for _ in range(5):
            dist.barrier(group=cpu_group)
            if mode == "all" or rank == 0:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                dst.copy_(src, non_blocking=True)
                end.record()
                end.synchronize()
                samples.append(nbytes / (start.elapsed_time(end) / 1e3) / 1e9)
            dist.barrier(group=cpu_group)
        result[mode] = max(samples) if samples else 0.0
    vals: list = [None] * world
    dist.all_gather_object(vals, result["all"], group=cpu_group)
    result["all"] = min(vals)  # the slowest rank's, when all pull at once
    del src
    torch.cuda.synchronize()
    return result


class Rank:
    """One process's model, groups, backends and checks."""

    def __init__(self, rank: int, world: int, args):
        self.rank, self.world, self.args = rank, world, args
        self.cuda = args.device == "cuda"
        self.ngpu = torch.cuda.device_count() if self.cuda else 0
        self.shared_gpu = self.cuda and self.ngpu < world
        self.device = f"cuda:{rank % self.ngpu}" if self.cuda else "cpu"
        if self.cuda:
            torch.cuda.set_device(self.device)
        else:
            torch.set_num_threads(1)
        ranks = list(range(world))  # the launcher's default group is gloo; NCCL groups follow the device pin
        self.cpu_group = new_gloo_group(ranks, 300)
        self.model_group = self.nccl_group = None
        if self.cuda and not self.shared_gpu:
            self.model_group = dist.new_group(ranks, backend="nccl")
            self.nccl_group = dist.new_group(ranks, backend="nccl")
        self.topo = Topology(world, args.experts, args.experts + args.redundant, ranks_per_node=args.ranks_per_node)
        dtype = torch.bfloat16 if self.cuda else torch.float32
        self.model = SyntheticMoE.gated_model(self.topo, args.layers, args.hidden, args.inter, rank, self.device, dtype, args.seed)
        self.model.dispatch = args.dispatch
        self.load = Load(args, self.device, dtype)
        self.reference = self._probe()  # before any rebalance: every run's checks compare with it
        self.info = {"rank": rank, "shared_gpu": self.shared_gpu, "ngpu": self.ngpu, "skipped": {}}
        if self.cuda:
            self.info["device_name"] = torch.cuda.get_device_name()
            self.info["peer_copy_gbps"] = peer_copy_limit(self.cpu_group, rank, world, self.device, args.peer_copy_mb << 20)
        self._backends()

    def _backends(self) -> None:
        args, ranks = self.args, list(range(self.world))

        def backend(name):  # the same selector the vLLM integration uses
            return make_backend(name, torch.device(self.device), self.topo, self.rank, self.model.weights_of, args.layers,
                                gloo_group=new_gloo_group(ranks, 300), cpu_group=self.cpu_group, nccl_group=lambda: self.nccl_group)

        ipc = backend("cuda_ipc") if self.cuda and self.topo.num_nodes == 1 else None
        p2p = backend("nccl") if self.nccl_group is not None else None
        gloo = backend("gloo")
        self.strategies = []
        for name in args.strategies:
            base = name.split(":")[0]
            if base == "cuda_ipc" and ipc is None:
                self.info["skipped"][name] = "needs CUDA"
            elif base == "nccl" and p2p is None:
                self.info["skipped"][name] = "NCCL refuses two ranks on one GPU" if self.cuda else "needs CUDA"
            else:
                self.strategies.append(name)
        fastest = ipc or p2p or gloo
        self.backends = {"stop-the-world": fastest, "gloo": gloo, "cuda_ipc": ipc, "nccl": p2p}
        self.info["stop_the_world_backend"] = fastest.name

    def combine(self, t):
        dist.all_reduce(t, group=self.model_group)

    def _probe(self) -> torch.Tensor:
        out = self.model.probe(self.load.probe_x, self.load.probe_routing)
        dist.all_reduce(out, group=self.cpu_group)
        return out

    def checker(self) -> InvariantChecker:
        """The rig's invariant checks: weights match the map, maps equal everywhere, probe
        outputs unchanged since before any rebalance."""
        return InvariantChecker(self.model.maps, self.model.slot_mismatches, self._probe, self.world, self.reference)

    def check(self, checker: InvariantChecker, p: int, fault: bool = False) -> None:
        if fault and self.rank == 0:  # the smoke test's proof that the checks see a wrong slot
            self.model.weights[0][0][0].add_(1.0)
        if self.cuda:
            torch.cuda.synchronize()
        checker.check(p)
