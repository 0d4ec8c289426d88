import json, sys, math
from vllm import LLM, SamplingParams
model, eager = sys.argv[1], sys.argv[2] == "eager"
llm = LLM(model=model, max_model_len=512, gpu_memory_utilization=0.4, seed=0, enable_prefix_caching=False,
          quantization="fp8", enforce_eager=eager)
prompts = [f"the expert model of layer {i} and rank {i % 7} with load" for i in range(128)]
sp = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=1)
def gen(ps):
    outs = llm.generate(ps, sp, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs], [[list(d.values())[0].logprob for d in o.outputs[0].logprobs] for o in outs]
a, la = gen(prompts); b, lb = gen(prompts); c, lc = gen(prompts[:1])
print("eager", eager, "identical repeat", sum(x == y for x, y in zip(a, b)), "/128; single-prompt batch equals batch[0]:", c[0] == a[0])
print("tokens[0] run1", list(a[0])[:16]); print("tokens[0] run2", list(b[0])[:16]); print("logprobs[0]", [round(x, 3) for x in la[0][:8]])
print("nan logprobs", sum(1 for l in la for x in l if not math.isfinite(x)))
m = llm.llm_engine.model_executor.driver_worker.worker.model_runner.model if hasattr(llm.llm_engine, "model_executor") else None
