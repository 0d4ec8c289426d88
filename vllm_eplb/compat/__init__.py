"""Adapters that give vllm-eplb upstream vLLM's EPLB API, for running vLLM's own tests
against vllm-eplb (see patches/tests/)."""
