"""The wing for vLLM releases (versions.py says what each module is): the declared releases,
their sdists, where they differ, and upstream vLLM's EPLB API on vllm-eplb for running vLLM's
own tests against it (see patches/tests/)."""
