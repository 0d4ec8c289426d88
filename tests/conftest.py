import logging

logging.getLogger("vllm.eplb").setLevel(logging.INFO)


def pytest_sessionstart(session):
    """min-move's numba loops compiled into the on-disk cache once, before any test starts a
    planner: a cold compile takes seconds, and ranks that each compiled at once on a small
    machine would make their first plan late. In a subprocess: numba stays out of this one."""
    import subprocess
    import sys

    subprocess.run([sys.executable, "-m", "vllm_eplb.core.policies.min_move_jit"], check=True, timeout=600)
