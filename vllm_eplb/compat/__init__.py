"""The wing for vLLM releases (versions.py says what each module is): the declared releases,
every place in vLLM's source vllm-eplb names, their sdists, where they differ, and upstream
vLLM's EPLB API on vllm-eplb for running vLLM's own tests against it (see patches/tests/)."""
