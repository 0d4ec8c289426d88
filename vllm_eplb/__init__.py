"""vllm-eplb: an asynchronous, layer-wise Expert Parallel Load Balancer for vLLM.

`vllm_eplb.core` is the balancer (no vLLM import); `vllm_eplb.integration` plugs it
into vLLM; `vllm_eplb.harness` drives it across processes without vLLM."""

__version__ = "0.1.0"
