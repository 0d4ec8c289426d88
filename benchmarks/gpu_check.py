"""The GPU check: vllm-eplb inside real vLLM on this machine's GPU, in at most 8 minutes on one
H200. Run it whenever code that runs on GPU changes.

    python benchmarks/gpu_check.py --json docs/data/gpu_check/$(date +%F).json [--commit HASH]
    python benchmarks/gpu_check.py --device cpu          # the same path on CPU (float32, no fp8)

With the offline install of ../shared/gpu/wheelhouse.sh assembled (vLLM 0.26.0 on torch 2.11), it
runs, and writes as one JSON (naming the commit, vLLM, torch and the GPU) with `ok` per check:

  start-up    the plugin installs on this vLLM's runner classes (`preflight()` empty); every seam
              and every vLLM name vllm-eplb's code reads exists in the installed vLLM (the static
              seam check of tools/seams.py, run against the installed package instead of an sdist);
              one expert-parallel rank with --eplb-config is refused in one line by vLLM's CLI.
  bf16        two engines on the GPU as two hosts of one DP=2 + EP deployment (front end + headless,
              NCCL_HOSTID each: benchmarks/serving/deploy.py), the balancer cycling fast
              (window 32, interval 68 passes, 2 redundant experts, verify_slots), under load:
              cycles complete on both ranks, every committed slot holds the bytes of the expert its
              map names (verify_slots on every rank, 0 mismatches), the headless host's rank on the
              front end's /metrics and in `vllm-eplb status`, the pass clock checked by the MoE
              layers' device counter under CUDA-graph replay with no clock_mismatch and no missed-tick
              alarm in any host's log; probes against EPLB off (served beside it on the same GPU,
              the same prompts): teacher-forced log-probabilities within the noise a placement
              change alone makes in bf16 (measured in the run: the start-up placement against EPLB
              off, and EPLB off's own repeats; `verdict`), greedy identity reported; then a weight reload (vLLM's
              reload_weights) while a transfer is in flight (up to 8 tries, one per cycle, the two
              checkpoints in turn: a data-parallel pause lands only at a 32-step boundary;
              `reload.attempts`): the cycle ends on both ranks with reason weight_update, after
              every reload every slot of every rank holds the weights just loaded (replicas agree,
              each expert's new bytes differ from before), the next cycles
              move the new weights with 0 slot mismatches, and reloading the first checkpoint
              brings every slot back to its bytes.
  fp8         the same deployment on a checkpoint quantized ahead of time (fp8 e4m3 weights, 128 x 128
              block scales: benchmarks/serving/model.py): cycles complete, weights and scales move,
              0 slot mismatches on every rank.

The three deployments start together (six engines share the GPU; start-up is torch.compile and
CUDA-graph capture, mostly CPU) and each runs its phase in its own thread. Outputs of vLLM's fp8 MoE
are not reproducible run to run on this GPU (docs/benchmarks.md, 2026-12-01), so fp8 is checked by
bytes only. Exit status 0 when every check is ok.

On a machine of two or more GPUs the same command puts one engine on each of GPUs 0 and 1 (hosts on
one machine, NCCL between GPUs), and `--deployment tp` serves each deployment as one TP=2 + EP server
instead (its two ranks on one front end's /metrics directly, nothing relayed). Deployments that run
together share the GPUs, so every engine's KV cache is sized in bytes either way.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from benchmarks.gpu_vllm_serve import parse_args  # noqa: E402
from benchmarks.serving.deploy import start_server  # noqa: E402
from benchmarks.serving.load import Load  # noqa: E402
from benchmarks.serving.probes import drift, forced_logprobs, probe_prompts, probe_rounds, reference_probes, within_noise  # noqa: E402
from benchmarks.serving.model import build_model, quantize_fp8, redrawn_experts  # noqa: E402
from vllm_eplb.harness.server import http_post, metric  # noqa: E402
from vllm_eplb.integration.slot_rpc import check_slots, expert_fingerprints  # noqa: E402

RANKS = (0, 1)
EPLB = {"improvement_threshold": 0.0, "agreement_lag": 2}  # every plan that moves a slot is applied
INTERVAL = 68  # passes between cycles: not a multiple of 32 (reload_during_transfer says why)
RPC = {"extra": ["--worker-extension-cls", "vllm_eplb.integration.slot_rpc.SlotRpc"], "env": {"VLLM_SERVER_DEV_MODE": "1"}}


# --------------------------------------------------------------------------- reading a deployment


@contextlib.contextmanager
def paused(server):
    """vLLM's own pause around a call every engine must run at the same point of its passes:
    data-parallel engines keep running dummy passes for up to 32 steps after their last request
    (vLLM syncs "unfinished" only every 32 steps), so an RPC reaching one engine while another
    still steps would apply it passes apart. /pause?mode=wait drains and stops every engine."""
    http_post(server.url + "/pause?mode=wait", {}, timeout=600)
    try:
        yield
    finally:
        http_post(server.url + "/resume", {}, timeout=600)


def rpc(server, method: str, **kwargs):
    """A worker RPC on every engine, between the same two forward passes."""
    with paused(server):
        return http_post(server.url + "/collective_rpc", {"method": method, "kwargs": kwargs}, timeout=600)["results"]


def every_slot(server) -> list[dict]:
    """Every rank's slots and fingerprints (the first worker's answer: it gathered them all)."""
    return rpc(server, "eplb_every_rank_slot_fingerprints")[0]


def state_of(ms: dict, rank: int = 0) -> str | None:
    return next((dict(ls)["state"] for (n, ls), v in ms.items()
                 if n == "vllm:eplb_state" and v == 1 and ("rank", str(rank)) in ls), None)


def counts(ms: dict, rank: int) -> dict:
    g = lambda name, **kw: metric(ms, name, rank=rank, **kw) or 0  # noqa: E731
    return {
        "cycles_completed": g("vllm:eplb_cycles_total", outcome="completed"),
        "aborted_weight_update": g("vllm:eplb_cycles_total", outcome="aborted", reason="weight_update"),
        "layers_committed": g("vllm:eplb_committed_layers_total"),
        "slot_checks_ok": g("vllm:eplb_slot_checks_total", result="ok"),
        "slot_checks_mismatch": g("vllm:eplb_slot_checks_total", result="mismatch"),
        "enabled": metric(ms, "vllm:eplb_enabled", rank=rank),
        "relayed_pass": metric(ms, "vllm:eplb_relayed_pass", rank=rank),
        # current and initial are one cycle window's load under two placements (in force, start-up):
        # the balance figure to compare (`balance_under_load` reads them before the settling
        # passes). observed is the latest window measured, often a quarter-size watch window of
        # the settling requests' few tokens: a noisier figure of other traffic.
        **{f"balancedness_{kind}": metric(ms, "vllm:eplb_balancedness", rank=rank, kind=kind)
           for kind in ("current", "initial", "observed", "watch")},
    }


def balance_under_load(server) -> dict:
    """Rank 0's balance figures (the same on every rank: they are the EP group's) read the moment
    the load ends, so that the last cycle window is the load's: once the passes go on with the
    settling one-token requests of `settled_metrics`, a cycle window of those few tokens shows no
    placement better than another (docs/benchmarks.md section 0, 2026-12-06)."""
    ms = server.metrics()
    kinds = ("current", "planned", "initial", "sampled")  # planned against initial: what the last plan buys on that window
    return {kind: metric(ms, "vllm:eplb_balancedness", rank=0, kind=kind) for kind in kinds}


def settled_metrics(server, timeout_s: float = 60.0, states: tuple = ("idle", "collecting")) -> dict:
    """The front end's metrics once rank 0 is in one of `states` and the relayed ranks' figures
    are newer than its last transition (one-token requests move the passes on), or as they are at
    the timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        ms = server.metrics()
        state = state_of(ms)
        entered = metric(ms, "vllm:eplb_state_entered_pass", rank=0, state=state) if state else None
        # ranks of other hosts reach the front end relayed by rank 0; one server's ranks directly
        relayed = [metric(ms, "vllm:eplb_relayed_pass", rank=r) for r in RANKS[1:]] if hasattr(server, "servers") else []
        if entered is not None and all(p is not None and p > entered + 2 for p in relayed) and state in states:
            return ms
        if time.monotonic() > deadline:
            return ms
        server.complete("the model of the expert", max_tokens=8)


def log_findings(server) -> dict:
    """What every host's log says about the pass clock and faults."""
    hosts = getattr(server, "servers", [server])
    out = {"clock": [], "clock_mismatch": 0, "missed_tick_alarms": 0, "tracebacks": 0, "refresh_mismatch_lines": 0,
           "reload_not_loaded_warnings": 0}
    for s in hosts:
        text = open(s.log_path, errors="replace").read()
        out["clock"] += sorted({line.split("pass clock ", 1)[1].strip() for line in text.splitlines() if "pass clock " in line})
        out["clock_mismatch"] += text.count("clock_mismatch")
        out["missed_tick_alarms"] += text.count("ticked out of step")
        out["tracebacks"] += text.count("Traceback")
        out["refresh_mismatch_lines"] += text.count("after a weight update")
        # vLLM's own bookkeeping after a reload (its loader's names against the checkpoint's):
        # reported, not a failure; the slots' bytes are checked directly
        out["reload_not_loaded_warnings"] += text.count("were not loaded from checkpoint")
    out["clock"] = sorted(set(out["clock"]))
    return out


ABORT_LINE = re.compile(r"EPLB rank (\d+) pass \d+: (\w+)[^\n]*-> idle \(weight_update\)")


def weight_update_aborts(server) -> dict[str, int]:
    """'rank state' -> cycles that rank's log says a weight update ended from that state
    (the balancer logs "transferring -> idle (weight_update)")."""
    found: dict[str, int] = {}
    for s in getattr(server, "servers", [server]):
        for rank, state in ABORT_LINE.findall(open(s.log_path, errors="replace").read()):
            found[f"{rank} {state}"] = found.get(f"{rank} {state}", 0) + 1
    return found


def status_shows_every_rank(server) -> bool:
    r = subprocess.run([sys.executable, "-m", "vllm_eplb.tools.status", server.url, "--once"], capture_output=True, text=True)
    return r.returncode == 0 and all(f"rank {k} " in r.stdout for k in RANKS)


# --------------------------------------------------------------------------- phases


def step_until(server, done, limit: int = 2000) -> dict | None:
    """One-token requests, one at a time (a forward pass each, nothing else in flight), until
    done(metrics of the front end); None if not within `limit` requests."""
    for _ in range(limit):
        ms = server.metrics()
        if done(ms):
            return ms
        server.complete("the model of the expert rank", max_tokens=1)
    return None


def reload_during_transfer(server, new_ckpt: str, old_ckpt: str, reference: dict, load, attempts: int = 8,
                           min_attempts: int = 1) -> dict:
    """vLLM's reload_weights while a transfer is in flight (a layer committed, later steps
    staged), then cycles on the new weights, then the old checkpoint back. `reference`: each
    (layer, expert)'s fingerprint under `old_ckpt`. `load(seconds)` drives traffic.

    Data-parallel engines stop only at a multiple of 32 steps from the start of a wave (vLLM
    syncs "unfinished" and a pending pause every 32 steps), so a reload asked for during a
    transfer often lands after it (2026-12-07 on one H100: four reloads in two runs, every one
    after the transfer). Cycles start every INTERVAL passes (68: not a multiple of 32), and the
    attempts alternate the two checkpoints: each reload changes the routing of the later layers,
    so the next cycle has experts to move and a transfer to land in (reloading the same weights
    twice left the load balanced and no transfer to wait for: the check then waited 2000
    requests, 2026-12-07). Up to `attempts` reloads, one per cycle, until one ended a cycle from
    transferring on every rank (its abort counter, reason weight_update, and each rank's log line
    "transferring -> idle (weight_update)"; a reload landing in the next cycle's collecting or
    planning ends that cycle too), and at least `min_attempts` (the CPU test asks for 2, so the
    alternation runs there). After every attempt every slot is read: each replica of an expert
    holds the bytes of the checkpoint just loaded (old: the reference; new: one fingerprint per
    expert, differing from the old)."""
    res: dict = {"attempts": []}
    target = old_ckpt
    for i in range(attempts):
        target = new_ckpt if i % 2 == 0 else old_ckpt
        before = settled_metrics(server)
        aborted_before = [counts(before, r)["aborted_weight_update"] for r in RANKS]
        logged_before = weight_update_aborts(server)
        ms = step_until(server, lambda m: state_of(m) == "transferring" and (metric(m, "vllm:eplb_transfer_layer", rank=0) or 0) >= 1,
                        limit=4 * INTERVAL)
        attempt: dict = {"loaded": "new" if target == new_ckpt else "old",
                         "metrics_said_layer": None if ms is None else metric(ms, "vllm:eplb_transfer_layer", rank=0)}
        res["attempts"].append(attempt)
        if ms is None:
            attempt["no_transfer_within_requests"] = 4 * INTERVAL
            break
        rpc(server, "reload_weights", weights_path=target)
        # idle only: a reload landing in collecting ends that cycle at its planning agreement,
        # passes later (on an H100, 2026-12-07, the first attempt's end was counted in the next)
        ms = settled_metrics(server, states=("idle",))
        attempt["aborted_weight_update"] = [counts(ms, r)["aborted_weight_update"] - aborted_before[r] for r in RANKS]
        logged = weight_update_aborts(server)
        attempt["ended_from"] = {k: n - logged_before.get(k, 0) for k, n in logged.items() if n > logged_before.get(k, 0)}
        # a reload that lands in the next cycle's collecting or planning ends that cycle too:
        # only an end from transferring, on every rank, is the case checked
        attempt["in_transfer"] = (all(n >= 1 for n in attempt["aborted_weight_update"])
                                  and all(attempt["ended_from"].get(f"{r} transferring", 0) >= 1 for r in RANKS))
        slots = every_slot(server)
        attempt["ranks_read"] = sorted(a["rank"] for a in slots)
        if target == old_ckpt:
            attempt["slots_hold_loaded"] = not check_slots(slots, reference)
        else:
            new = expert_fingerprints(slots)
            attempt["slots_hold_loaded"] = (not check_slots(slots, new)  # every replica of an expert holds its bytes
                                            and bool(new) and all(new[k] != reference[k] for k in new if k in reference))
        if attempt["in_transfer"] and i + 1 >= min_attempts:
            break
    res["reloads_in_transfer"] = sum(bool(t.get("in_transfer")) for t in res["attempts"])
    res["every_attempt_slots_hold_loaded"] = all(t.get("slots_hold_loaded") and t.get("ranks_read") == list(RANKS)
                                                 for t in res["attempts"] if "ranks_read" in t)
    if target != new_ckpt:
        rpc(server, "reload_weights", weights_path=new_ckpt)  # the cycles below move the new weights
    load(15.0)  # the next cycles move the new weights
    res["balance_under_load"] = balance_under_load(server)
    ms = settled_metrics(server)
    res["after"] = {r: counts(ms, r) for r in RANKS}
    new = expert_fingerprints(every_slot(server))
    res["new_differs_from_old"] = bool(new) and all(new[k] != reference[k] for k in new if k in reference)
    rpc(server, "reload_weights", weights_path=old_ckpt)
    res["old_weights_back_every_slot"] = not check_slots(every_slot(server), reference)
    res["ok"] = bool(
        res["reloads_in_transfer"] >= 1 and res["every_attempt_slots_hold_loaded"] and res["new_differs_from_old"]
        and res["old_weights_back_every_slot"]
        and all(res["after"][r]["slot_checks_mismatch"] == 0 for r in RANKS)
    )
    return res


def deployment_phase(a, wd: str, name: str, model: str, vocab: int, eplb: bool, seconds: float, refs: dict,
                     ref_ready: threading.Event, reload_to: str | None = None, env: dict | None = None,
                     reload_min_attempts: int = 1) -> dict:
    """Start one deployment, run its phase, stop it: a row of the check."""
    res: dict = {"deployment": name, "model": os.path.basename(model.rstrip("/"))}
    t0 = time.monotonic()
    rpc_args = dict(RPC, env={**RPC["env"], **(env or {})}) if eplb else {"env": env}
    res["serving"] = a.deployments
    s = start_server(a, wd, model, a.deployments, "vllm-eplb" if eplb else "off", name, verify=eplb,
                     window=a.window, interval=a.interval, eplb_more=EPLB if eplb else None, **rpc_args)
    res["start_s"] = round(time.monotonic() - t0, 1)
    prompts = probe_prompts(a, vocab)
    try:
        if not eplb:
            # The reference: EPLB off's probes, alone; then how reproducible they are under the
            # same traffic as the balancer's run (in bf16 a batch's composition can change sums)
            refs[name] = reference_probes(s, model, prompts, a.check_tokens)
            ref_ready.set()
            traffic = threading.Thread(target=Load(s.port, model, a, vocab, seconds).run, daemon=True)
            traffic.start()
            res["repeats"] = probe_rounds(s, model, prompts, a.check_tokens, refs[name], seconds)
            traffic.join()
            return res
        start = every_slot(s)
        reference = expert_fingerprints(start)  # before anything moved: the checkpoint's bytes
        res["ranks_read_at_start"] = len({answer["rank"] for answer in start})
        probing = reload_to is not None and ref_ready.wait(600) and "off-bf16" in refs
        if probing:
            # Before any pass: the start-up placement (redundant slots), nothing moved. Against EPLB
            # off it differs only in which rank sums which expert's output: the size of that effect
            off = refs["off-bf16"]
            res["static_placement_drift"] = drift(forced_logprobs(s, model, off["forced"]), off["logprobs"])
        traffic = threading.Thread(target=Load(s.port, model, a, vocab, seconds).run, daemon=True)
        traffic.start()
        if probing:
            res["probes"] = probe_rounds(s, model, prompts, a.check_tokens, refs["off-bf16"], seconds)
        traffic.join()
        res["balance_under_load"] = balance_under_load(s)
        ms = settled_metrics(s)
        res["ranks"] = {r: counts(ms, r) for r in RANKS}
        res["status_shows_every_rank"] = status_shows_every_rank(s)
        if reload_to is not None:
            res["reload"] = reload_during_transfer(
                s, reload_to, model, reference, lambda sec: Load(s.port, model, a, vocab, sec).run(),
                min_attempts=reload_min_attempts)
        res["final_slots_hold_their_experts"] = not check_slots(every_slot(s), reference)
        res["logs"] = log_findings(s)
    finally:
        s.stop()
    return res


# --------------------------------------------------------------------------- start-up checks


def startup_checks(a, wd: str, model: str) -> dict:
    res: dict = {}
    from vllm_eplb.integration.hooks import preflight, vllm_version

    res["vllm"] = vllm_version()
    res["preflight"] = preflight()
    import vllm

    from vllm_eplb.tools.seams import check
    from pathlib import Path

    problems, known = check(Path(vllm.__file__).resolve().parents[1], res["vllm"])
    res["seams_and_names_missing"], res["known_gaps"] = problems, len(known)
    path = os.path.join(wd, "tp1.eplb.json")
    json.dump({"window_size": 10, "step_interval": 20}, open(path, "w"))
    cli = [sys.executable, "-m", "vllm.entrypoints.cli.main"] if a.device == "cuda" else [os.path.join(os.path.dirname(sys.executable), "vllm")]
    r = subprocess.run(cli + ["serve", model, "-tp", "1", "--enable-expert-parallel", "--eplb-config", path],
                       capture_output=True, text=True, timeout=300)
    last = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ""
    res["tp1_refused"] = {"rc": r.returncode, "last_line": last, "traceback": "Traceback" in r.stderr}
    res["ok"] = (not res["preflight"] and not problems and r.returncode == 2 and "nothing to balance" in last
                 and "Traceback" not in r.stderr)
    return res


def verdict(row: dict, off: dict | None) -> bool:
    """A deployment row's ok: what the module docstring lists for its kind."""
    ranks = row.get("ranks", {})
    logs = row.get("logs", {})
    ok = (
        all(ranks[r]["cycles_completed"] >= 1 and ranks[r]["slot_checks_ok"] > 0 and ranks[r]["slot_checks_mismatch"] == 0
            and ranks[r]["enabled"] == 1 for r in RANKS)
        and (row.get("serving", "hosts") != "hosts" or ranks[1]["relayed_pass"] is not None)
        and row["status_shows_every_rank"]
        and ranks[0]["cycles_completed"] == ranks[1]["cycles_completed"]
        and row["final_slots_hold_their_experts"] and row["ranks_read_at_start"] == len(RANKS)
        and logs["clock_mismatch"] == 0 and logs["missed_tick_alarms"] == 0 and logs["tracebacks"] == 0
        and logs["refresh_mismatch_lines"] == 0
        and any("checked by the moe_layers counter" in c or c == "moe_layers" for c in logs["clock"])
    )
    if "probes" in row and off is not None:
        row["probes_within_noise"], row["probes_bound"] = within_noise(row["probes"], row["static_placement_drift"], off)
        ok = ok and row["probes_within_noise"]
    if "reload" in row:
        ok = ok and row["reload"]["ok"]
    return bool(ok)


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--json", default=None, help="write the results here (docs/data/gpu_check/DATE.json)")
    ap.add_argument("--commit", default=None, help="the commit checked (default: git rev-parse HEAD)")
    ap.add_argument("--seconds", type=float, default=40.0, help="load per deployment")
    ap.add_argument("--no-fp8", action="store_true")
    ap.add_argument("--deployment", choices=("hosts", "tp"), default="hosts",
                    help="hosts: two engines as two hosts (front end + headless; on one GPU, sharing it); "
                         "tp: one server, TP=2 + EP (two GPUs)")
    ap.add_argument("--min-reload-attempts", type=int, default=1,
                    help="reloads before the first one inside a transfer may end the reload check (2 runs both checkpoints)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--model-dir", default=os.path.join(tempfile.gettempdir(), "eplb-check-model"))
    o = ap.parse_args(argv)
    t_start = time.monotonic()
    shape = ["--layers", "8", "--experts", "16", "--top-k", "2", "--hidden", "512", "--moe-intermediate", "256",
             "--groups", "2", "--hot", "3", "--vocab", "2048", "--clients", "16", "--prompt-len", "64", "--max-tokens", "64",
             "--phases", "4", "--window", "32", "--interval", str(INTERVAL), "--ranks", "2", "--deployments", o.deployment,
             "--check-tokens", "32", "--max-model-len", "512", "--start-timeout", "420", "--device", o.device,
             "--model-dir", o.model_dir]
    if o.device == "cpu":
        shape += ["--dtype", "float32", "--hidden", "128", "--moe-intermediate", "128", "--vocab", "512", "--clients", "4",
                  "--prompt-len", "16", "--max-tokens", "16", "--check-tokens", "12"]
    a = parse_args(shape)
    a.side_by_side = True  # the deployments below run together: each engine's KV cache sized in bytes
    wd = o.workdir or tempfile.mkdtemp(prefix="eplb-check-")
    os.makedirs(wd, exist_ok=True)
    model = build_model(a.model_dir, a)
    vocab = json.load(open(os.path.join(model, "config.json")))["vocab_size"]
    reload_to = redrawn_experts(model, model.rstrip("/") + "-redrawn")
    commit = o.commit or subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                        cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
    out: dict = {"date": datetime.date.today().isoformat(), "commit": commit, "command": " ".join(sys.argv),
                 "python": platform.python_version()}
    try:
        import torch

        out["torch"] = torch.__version__
        out["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    except Exception as exc:  # reported, not fatal
        out["torch"] = repr(exc)
    out["startup"] = startup_checks(a, wd, model)
    print(json.dumps({"startup": out["startup"]}), flush=True)

    refs: dict = {}
    ref_ready = threading.Event()
    jobs = {
        "off-bf16": dict(model=model, eplb=False),
        "eplb-bf16": dict(model=model, eplb=True, reload_to=reload_to, reload_min_attempts=o.min_reload_attempts),
    }
    if not o.no_fp8 and o.device == "cuda":
        # DeepGEMM's JIT warm-up of block fp8 takes minutes per engine (measured on one H200,
        # 2026-12-04): the Triton block-fp8 kernels serve it
        jobs["eplb-fp8"] = dict(model=quantize_fp8(model, model.rstrip("/") + "-fp8"), eplb=True,
                                env={"VLLM_USE_DEEP_GEMM": "0"})
    rows: dict = {}
    with cf.ThreadPoolExecutor(len(jobs)) as pool:
        futures = {name: pool.submit(deployment_phase, a, wd, name, vocab=vocab, seconds=o.seconds, refs=refs,
                                     ref_ready=ref_ready, **kw) for name, kw in jobs.items()}
        for name, f in futures.items():
            try:
                rows[name] = f.result()
            except Exception:
                rows[name] = {"deployment": name, "error": traceback.format_exc()[-3000:]}
                ref_ready.set()
            print(json.dumps(rows[name], default=str), flush=True)
    off = rows.get("off-bf16", {}).get("repeats")
    for name, row in rows.items():
        if name.startswith("eplb"):
            row["ok"] = "error" not in row and verdict(row, off)
        else:
            row["ok"] = "error" not in row
    out["deployments"] = rows
    out["seconds"] = round(time.monotonic() - t_start, 1)
    out["ok"] = bool(out["startup"]["ok"] and all(r["ok"] for r in rows.values()))
    text = json.dumps(out, indent=2, default=str)
    if o.json:
        os.makedirs(os.path.dirname(os.path.abspath(o.json)), exist_ok=True)
        open(o.json, "w").write(text + "\n")
    print(text)
    print(f"gpu_check: {'ok' if out['ok'] else 'FAILED'} in {out['seconds']:.0f} s "
          + " ".join(f"{k}={'ok' if v['ok'] else 'FAILED'}" for k, v in [("startup", out["startup"]), *rows.items()]))
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
