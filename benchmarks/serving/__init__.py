"""The real-vLLM serving rig of benchmarks/gpu_vllm_serve.py and benchmarks/gpu_check.py:
the model (`model`), the load and what it measures (`load`), the deployments and their servers
(`deploy`), the table (`report`)."""
