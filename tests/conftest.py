import logging

logging.getLogger("vllm_eplb").setLevel(logging.INFO)
