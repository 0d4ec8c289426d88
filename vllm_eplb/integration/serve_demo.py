"""The README's main job: serve a small MoE model with the balancer on CPU and watch it.

    python -m vllm_eplb.integration.serve_demo [--model DIR] [--eplb-config FILE] [--seconds 90]

1. builds the tiny Qwen3-MoE checkpoint locally if --model is not given (no hub);
2. runs `vllm serve MODEL --tensor-parallel-size 2 --enable-expert-parallel
   --eplb-config FILE` (printed, so you can run it yourself);
3. sends concurrent requests and prints, from the server's /metrics, every state
   change of the balancer and the balancedness measured over each window;
4. stops after --seconds (or keeps serving with --serve-forever).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request

from .tiny_model import WORDS, build

DEFAULT_CONFIG = {
    "window_size": 50,
    "step_interval": 200,
    "num_redundant_experts": 4,
    "improvement_threshold": 0.05,
    "policy": "default",
}

CPU_ENV = {  # two workers on a small CPU box: one core each, threads sleep when waiting
    "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "0|1"),
    "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
    "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
}


def _get(url: str, timeout: float = 5) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def _post(url: str, body: dict, timeout: float = 120) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def _eplb_metrics(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line.startswith("vllm:eplb_") and 'rank="0"' in line:
            m = re.match(r"(\S+) (\S+)$", line)
            if m:
                out[m.group(1)] = float(m.group(2))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="MoE checkpoint directory (default: build the tiny one)")
    ap.add_argument("--eplb-config", help="eplb.json (default: one written next to the model)")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--seconds", type=float, default=90, help="how long to drive load and watch")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--serve-forever", action="store_true", help="keep serving after the watch")
    ap.add_argument("--workdir", default=".work")
    args = ap.parse_args(argv)

    os.makedirs(args.workdir, exist_ok=True)
    model = args.model
    if model is None:
        model = os.path.join(args.workdir, "tiny-qwen3-moe")
        if not os.path.exists(os.path.join(model, "config.json")):
            print(f"building a tiny Qwen3-MoE (4 layers x 16 experts, top-2, skewed router) in {model}")
            build(model)
    cfg = args.eplb_config
    if cfg is None:
        cfg = os.path.join(args.workdir, "eplb.json")
        with open(cfg, "w") as fh:
            json.dump(DEFAULT_CONFIG, fh, indent=2)
    vllm = os.path.join(os.path.dirname(sys.executable), "vllm")
    vllm = vllm if os.path.exists(vllm) else shutil.which("vllm")
    cmd = [vllm, "serve", model, "--port", str(args.port), "--tensor-parallel-size", "2", "--enable-expert-parallel",
           "--eplb-config", cfg, "--dtype", "float32", "--max-model-len", "512", "--enforce-eager"]
    env_txt = " ".join(f"{k}='{v}'" for k, v in CPU_ENV.items())
    print(f"\n$ {env_txt} {' '.join(cmd)}\n")
    log_path = os.path.join(args.workdir, "serve.log")
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **CPU_ENV}, start_new_session=True)
    base = f"http://127.0.0.1:{args.port}"
    try:
        t0 = time.monotonic()
        while True:
            if proc.poll() is not None:
                log.flush()
                print(open(log_path).read()[-3000:])
                print(f"vllm serve exited with {proc.returncode} (log: {log_path})")
                return 1
            try:
                _get(base + "/health", 2)
                break
            except OSError:
                time.sleep(1)
        print(f"server up after {time.monotonic() - t0:.0f}s (log: {log_path}); sending requests from {args.clients} clients\n")

        stop = threading.Event()

        def client(seed: int) -> None:
            rng = random.Random(seed)
            while not stop.is_set():
                prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))
                try:
                    _post(base + "/v1/completions", {"model": model, "prompt": prompt, "max_tokens": rng.randint(8, 48), "temperature": 0})
                except OSError:
                    time.sleep(0.5)

        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(args.clients)]
        for t in threads:
            t.start()
        last_state, last_obs = None, None
        end = time.monotonic() + args.seconds
        m = {}
        while time.monotonic() < end:
            m = _eplb_metrics(_get(base + "/metrics"))
            state = next((k.split('state="')[1].split('"')[0] for k, v in m.items() if k.startswith("vllm:eplb_state{") and v == 1), None)
            layer = m.get('vllm:eplb_transfer_layer{rank="0"}', -1)
            pass_no = int(m.get('vllm:eplb_pass{rank="0"}', 0))
            if state and (state, layer) != last_state:
                extra = f" layer {int(layer)}" if state == "transferring" else ""
                print(f"  ~pass {pass_no:>6}  state {state}{extra}")
                last_state = (state, layer)
            obs = m.get('vllm:eplb_balancedness{kind="observed",rank="0"}')
            if obs is not None and obs != last_obs:
                planned = m.get('vllm:eplb_balancedness{kind="planned",rank="0"}')
                print(f"  ~pass {pass_no:>6}  balancedness over the last window: {obs:.3f}" + (f" (last plan predicted {planned:.3f})" if planned else ""))
                last_obs = obs
            time.sleep(0.05)
        stop.set()
        done = {k: v for k, v in m.items() if k.startswith("vllm:eplb_cycles_total")}
        print("\ncycles:", ", ".join(f"{k.split('{')[1][:-1]}: {int(v)}" for k, v in done.items()) or "none yet")
        print(f"all balancer series: curl -s {base}/metrics | grep vllm:eplb_")
        if args.serve_forever:
            print("serving; Ctrl-C to stop")
            proc.wait()
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        log.close()


if __name__ == "__main__":
    sys.exit(main())
