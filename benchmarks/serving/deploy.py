"""The deployments a run serves on, and the servers that serve them.

  tp      one `vllm serve`, TP=N + EP (N GPUs)
  dp      one `vllm serve`, DP=N + EP (N engines, one per GPU)
  hosts   N `vllm serve` processes as the N hosts of one DP=N + EP deployment (vLLM's multi-node
          launch: a front end and N-1 `--headless` hosts, one engine each), engine i on GPU
          i % GPUs. With fewer GPUs than hosts the engines share GPUs: each gets its own
          `NCCL_HOSTID` (NCCL refuses two ranks of one communicator on one device of one
          host, not of two hosts) and a KV cache sized in bytes (each engine's memory
          profiling would count its neighbours' allocations). On one GPU the ranks share the
          SMs and NCCL runs over sockets (loopback): such a run measures the balancer's cost
          and correctness inside real vLLM, not the throughput balance buys.

Configurations: off (vLLM, EPLB off, plugin disabled on GPU), vllm-sync / vllm-async (vLLM's own
EPLB), vllm-eplb[:backend].
"""

from __future__ import annotations

import json
import os
import random
import socket
import sys
import threading

from vllm_eplb.harness.server import Hosts, Server, vllm_bin

DEPLOYMENTS = ("tp", "dp", "hosts")


def server_argv(a, model: str, deployment: str, config: str, eplb_path: str | None, dtype: str, quant: str | None,
                extra=()) -> list[str]:
    """The serve command without --port (and, for `hosts`, without the data-parallel flags)."""
    n = a.ranks
    cmd = [vllm_bin(), "serve"] if a.device == "cpu" else [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve"]
    cmd += [model, "--dtype", dtype, "--max-model-len", str(a.max_model_len), "--seed", "0",
            "--no-enable-prefix-caching", "--enable-expert-parallel"]
    cmd += {"tp": ["-tp", str(n)], "dp": ["-tp", "1", "--data-parallel-size", str(n)], "hosts": ["-tp", "1"]}[deployment]
    if a.device == "cpu":
        cmd += ["--enforce-eager"]
    else:
        # no engine runs more sequences than the run has clients; vLLM captures CUDA graphs up to
        # twice max_num_seqs (512 at its default): 21-32 s of each engine's start-up on a shared
        # GPU went to capturing batch sizes no run reaches
        cmd += ["--max-num-seqs", str(max(1, a.clients))]
        if deployment == "hosts" and a.ranks > a.gpus or getattr(a, "side_by_side", False):
            # engines sharing a GPU: several hosts of one deployment, or deployments started side by
            # side (gpu_check's, --resident's). --gpu-memory-utilization is then only vLLM's
            # start-up floor on free memory (share x the GPU): at its default 0.92 an engine that
            # starts after another on an 80 GB H100 is refused ("Free memory on device ... less than
            # desired GPU memory utilization")
            cmd += ["--kv-cache-memory-bytes", str(int(a.kv_cache_gib * 2**30)), "--gpu-memory-utilization", "0.25"]
        else:
            cmd += ["--gpu-memory-utilization", str(a.gpu_memory_utilization)]
    if quant:
        cmd += ["--quantization", quant]
    if config.startswith("vllm-sync") or config.startswith("vllm-async"):
        up = {"window_size": a.window, "step_interval": a.interval, "num_redundant_experts": a.redundant,
              "use_async": config.startswith("vllm-async")}
        cmd += ["--enable-eplb", "--eplb-config", json.dumps(up)]
    elif eplb_path:
        cmd += ["--eplb-config", eplb_path]
    return cmd + list(extra)


def eplb_json(a, config: str, path: str, verify: bool, window: int | None = None, interval: int | None = None,
              more: dict | None = None) -> str | None:
    if not config.startswith("vllm-eplb"):
        return None
    cfg = {"window_size": window or a.window, "step_interval": interval or a.interval, "num_redundant_experts": a.redundant,
           "verify_slots": verify, **(more or {})}
    if ":" in config:
        cfg["transfer_backend"] = config.split(":", 1)[1]
    json.dump(cfg, open(path, "w"))
    return path


def host_env(a, host: int) -> dict[str, str]:
    """What host `host` of a `hosts` deployment gets: its GPU; where GPUs are shared, a host
    identity of its own for NCCL, over loopback sockets."""
    if a.device == "cpu":
        return {"VLLM_CPU_OMP_THREADS_BIND": str(host % (os.cpu_count() or 1))}
    env = {"CUDA_VISIBLE_DEVICES": str(host % max(1, a.gpus))}
    if a.ranks > a.gpus:
        env.update(NCCL_HOSTID=f"vllm-eplb-host{host}", NCCL_IB_DISABLE="1", NCCL_SOCKET_IFNAME="lo")
    return env


_TAKEN: set[int] = set()
_TAKEN_LOCK = threading.Lock()


def free_port(lo: int, span: int) -> int:
    """A port in [lo, lo + span) that nothing listens on and that no server this process started
    was given: servers started side by side (gpu_check's deployments, --resident) must not meet."""
    with _TAKEN_LOCK:
        for _ in range(200):
            port = lo + random.randrange(span)
            if port in _TAKEN:
                continue
            with socket.socket() as probe:
                try:
                    probe.bind(("127.0.0.1", port))
                except OSError:
                    continue
            _TAKEN.add(port)
            return port
    raise RuntimeError(f"no free port in {lo}-{lo + span - 1}")


def start_server(a, workdir: str, model: str, deployment: str, config: str, tag: str, verify=False, dtype=None, quant=None,
                 window=None, interval=None, eplb_more: dict | None = None, extra=(), env: dict | None = None):
    """Start a deployment and wait until it serves: a Server, or for `hosts` a Hosts (its front
    end answers as a Server does: url, port, log_path of rank 0's host, metrics())."""
    port = free_port(8300, 600)
    path = eplb_json(a, config, os.path.join(workdir, f"{tag}.eplb.json"), verify, window, interval, eplb_more)
    argv = server_argv(a, model, deployment, config, path, dtype or a.serve_dtype, quant, extra)
    env = {"VLLM_USE_FLASHINFER_SAMPLER": "0", **(env or {})}
    if not config.startswith("vllm-eplb") and a.device == "cuda":
        # EPLB off and vLLM's own EPLB: vLLM as shipped. On CPU the plugin stays loaded without
        # --eplb-config: vLLM's CPU expert parallelism crashes without its CPU kernel fixes.
        env["EPLB_PLUGIN_DISABLE"] = "1"
    if dtype == "float32" and a.device == "cuda":
        env["VLLM_ATTENTION_BACKEND"] = "TRITON_ATTN"  # FlashAttention serves no float32
    if deployment == "hosts":
        hosts = Hosts(model, argv, a.ranks, port, free_port(13000, 2000), workdir, tag=f"{tag}-host",
                      env_of=lambda h: {**env, **host_env(a, h)})
        return hosts.start(a.start_timeout)
    s = Server(model, port, log_path=os.path.join(workdir, f"{tag}.log"), argv=argv + ["--port", str(port)], env=env)
    return s.start(timeout=a.start_timeout)
