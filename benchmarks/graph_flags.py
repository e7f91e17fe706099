"""XLA's CUDA-graph flags, shared by bench_low_latency.py, profile_ll.py and the graph test of
tests/test_low_latency.py. This module imports nothing, because a script must set XLA_FLAGS
before it imports jax (XLA reads its flags once)."""

# Command buffers (CUDA graphs) for fusions and custom calls, however small the graph; jax_ep's LL
# handlers are command-buffer compatible.
GRAPH_FLAGS = "--xla_gpu_enable_command_buffer=FUSION,CUSTOM_CALL --xla_gpu_graph_min_graph_size=1"
