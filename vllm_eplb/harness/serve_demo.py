"""The README's main job: serve a small MoE model with the balancer on CPU and watch it.

    python -m vllm_eplb.harness.serve_demo [--model DIR] [--eplb-config FILE] [--seconds 90]

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
import sys
import threading
import time

from vllm_eplb.core.state_machine import TOP_STATES

from .server import Server, cpu_env, metric
from .tiny_model import WORDS, build

DEFAULT_CONFIG = {
    "window_size": 50,
    "step_interval": 200,
    "num_redundant_experts": 4,
    "improvement_threshold": 0.05,
    "policy": "min-move",  # what "default" meant before it took vLLM's meaning (deepseek)
}



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
    server = Server(model, args.port, cfg, log_path=os.path.join(args.workdir, "serve.log"))
    env_txt = " ".join(f"{k}='{v}'" for k, v in cpu_env().items())
    print(f"\n$ {env_txt} {' '.join(server.cmd)}\n")
    t0 = time.monotonic()
    try:
        server.start()
    except (RuntimeError, TimeoutError) as exc:
        print(exc)
        return 1
    try:
        print(f"server up after {time.monotonic() - t0:.0f}s (log: {server.log_path}); {args.clients} clients sending requests\n")
        stop = threading.Event()

        def client(seed: int) -> None:
            rng = random.Random(seed)
            while not stop.is_set():
                prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))
                try:
                    server.complete(prompt, max_tokens=rng.randint(8, 48), ignore_eos=False)
                except OSError:
                    time.sleep(0.5)

        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(args.clients)]
        for t in threads:
            t.start()
        last_state, last_obs, ms = None, None, {}
        end = time.monotonic() + args.seconds
        while time.monotonic() < end:
            ms = server.metrics()
            state = next((s for s in TOP_STATES if metric(ms, "vllm:eplb_state", rank=0, state=s) == 1), None)
            layer = metric(ms, "vllm:eplb_transfer_layer", rank=0)
            pass_no = int(metric(ms, "vllm:eplb_pass", rank=0) or 0)
            if state and (state, layer) != last_state:
                extra = f" layer {int(layer)}" if state == "transferring" else ""
                print(f"  ~pass {pass_no:>6}  {state}{extra}")
                last_state = (state, layer)
            obs = metric(ms, "vllm:eplb_balancedness", rank=0, kind="observed")
            if obs is not None and obs != last_obs:
                # published with the measurement: the start-up layout predicted on the same load
                initial = metric(ms, "vllm:eplb_balancedness", rank=0, kind="initial")
                tail = f" (the start-up layout, on the same load: {initial:.3f} predicted)" if initial is not None else ""
                print(f"  ~pass {pass_no:>6}  balancedness (mean/max tokens per rank) over the last window: {obs:.3f}{tail}")
                last_obs = obs
            time.sleep(0.05)
        stop.set()
        counts = {
            f"{dict(ls)['outcome']}{'/' + dict(ls)['reason'] if dict(ls)['reason'] else ''}": int(v)
            for (n, ls), v in ms.items()
            if n == "vllm:eplb_cycles_total" and ("rank", "0") in ls
        }
        print(f"\ncycles on rank 0: {counts or 'none yet'}")
        print(f"every balancer series: curl -s {server.url}/metrics | grep vllm:eplb_")
        if args.serve_forever:
            print("serving; Ctrl-C to stop")
            server.proc.wait()
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
