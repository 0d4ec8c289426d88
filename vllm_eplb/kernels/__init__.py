"""Device kernels of the router's map-and-record (no vLLM import): the replica each
(token, expert) choice goes to, and the load it adds. `replica_dispatch` holds the torch
versions and the switch between them; `replica_dispatch_triton` the GPU kernel; `tiles` the
balanced dispatch's tile, which both read."""
