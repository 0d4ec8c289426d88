"""The GPU rebalance benchmark's pieces (benchmarks/gpu_rebalance.py, its command line): one rank's
model, groups, backends and checks (`model`), the load it routes (`load`), one rebalance driven
and timed (`run`), the figures and the table (`report`)."""
