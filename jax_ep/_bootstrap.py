"""Multi-process discovery and the NVSHMEM bootstrap (once per process).

When an EP mesh spans processes (one GPU each, jax.distributed), backend "cuda" runs over
NVSHMEM: process 0 draws NVSHMEM's unique ID and publishes it in JAX's distributed key-value
store, every process binds to its GPU and initialises as PE = jax.process_index() of
jax.process_count(), then a device put+signal ring proves the transport. Host barriers here go
through the same key-value store (creation only; nothing here runs in the hot path).
JAX has no public key-value API: the client is jax._src.distributed.global_state.client (the
public fallback, multihost_utils, runs XLA collectives, which NCCL refuses when processes share
a GPU).
"""
from __future__ import annotations

import itertools
import os
import socket

import jax

from . import _ffi

_UNIQUE_ID_KEY = "jax_ep/nvshmem/unique_id"
_HOST_KEY = "jax_ep/host"
_published_host = False
_barrier_ids = itertools.count()


def _client():
    from jax._src.distributed import global_state  # noqa: PLC0415 (no public API)

    client = global_state.client
    if client is None:
        raise RuntimeError(
            "backend 'cuda' over several processes needs jax.distributed.initialize() first "
            "(NVSHMEM's unique ID travels through its key-value store)")
    return client


def _timeout_ms(timeout_s: float) -> int:
    return max(int(timeout_s * 1000), 1)


def barrier(name: str, timeout_s: float) -> None:
    """All processes reach this point (their n-th barrier of this name) or a clear error."""
    barrier_id = f"jax_ep/{name}/{next(_barrier_ids)}"
    try:
        _client().wait_at_barrier(barrier_id, _timeout_ms(timeout_s))
    except Exception as e:  # noqa: BLE001 (the client raises XlaRuntimeError)
        raise RuntimeError(
            f"jax_ep: process {jax.process_index()} waited {timeout_s:.0f} s at barrier "
            f"{barrier_id!r}: every process must create and close its Buffers in the same order "
            f"({type(e).__name__}: {e})") from None


def process_hosts(timeout_s: float) -> list[str]:
    """The hostname of every process, by process index (each process publishes its own once)."""
    global _published_host
    client = _client()
    if not _published_host:
        client.key_value_set(f"{_HOST_KEY}/{jax.process_index()}", socket.gethostname())
        _published_host = True
    try:
        return [client.blocking_key_value_get(f"{_HOST_KEY}/{p}", _timeout_ms(timeout_s))
                for p in range(jax.process_count())]
    except Exception as e:  # noqa: BLE001
        raise RuntimeError(
            f"jax_ep: process {jax.process_index()} did not learn every process's host within "
            f"{timeout_s:.0f} s: every process must create the Buffer, or pass "
            f"num_ranks_per_node ({type(e).__name__}: {e})") from None


def init_nvshmem(device: int, *, heap_bytes: int, timeout_s: float):
    """Initialises NVSHMEM on CUDA device `device` (once per process; later calls check that
    they agree) and returns the extension module jax_ep._jax_ep_nvshmem.

    heap_bytes: symmetric memory the first Buffer needs (sizes NVSHMEM_SYMMETRIC_SIZE unless
    the environment sets it).
    """
    ext = _ffi.nvshmem_extension()  # raises, naming what is missing
    pe, num_pes = jax.process_index(), jax.process_count()
    state = ext.state()
    if state is not None:
        if tuple(state) != (device, pe, num_pes):
            raise ValueError(
                f"jax_ep: NVSHMEM initialises once per process; it runs on GPU {state[0]} as PE "
                f"{state[1]} of {state[2]}, but this Buffer needs GPU {device} as PE {pe} of "
                f"{num_pes}: create every Buffer of this process over the same GPU")
        return ext
    client = _client()
    # Never NVLink multicast (it can take a shared host's GPUs out of service).
    os.environ["NVSHMEM_DISABLE_NVLS"] = "1"
    os.environ.setdefault("NVSHMEM_SYMMETRIC_SIZE", str(max(1 << 30, 2 * heap_bytes + (256 << 20))))
    if pe == 0:
        client.key_value_set_bytes(_UNIQUE_ID_KEY, ext.unique_id())
    try:
        unique_id = client.blocking_key_value_get_bytes(_UNIQUE_ID_KEY, _timeout_ms(timeout_s))
    except Exception as e:  # noqa: BLE001
        raise RuntimeError(
            f"jax_ep: process {pe} got no NVSHMEM unique ID from process 0 within {timeout_s:.0f}"
            f" s: every process must create the Buffer ({type(e).__name__}: {e})") from None
    ext.init(unique_id, pe, num_pes, device)
    barrier("nvshmem_init", timeout_s)  # every PE's handshake block is zeroed
    ext.handshake(timeout_s)
    return ext
