import logging

logging.getLogger("vllm.eplb").setLevel(logging.INFO)
