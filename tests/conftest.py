"""Shared test setup: 8 virtual CPU devices when no accelerator is present.

The same test files run on CPU CI and on GPU hosts; the device set decides what runs.
"""
import os

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
# The multi-process suite's workers share the GPUs with this process: take memory as needed.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_enable_x64", False)
# Full float32 matmuls (GPUs default to TF32): finite-difference gradient checks and the
# layer-vs-dense comparisons need them.
jax.config.update("jax_default_matmul_precision", "highest")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import Mesh  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a GPU (skipped elsewhere); EP over all of them")
    config.addinivalue_line("markers", "slow: longer-running test")


def pytest_collection_modifyitems(config, items):
    num_gpus = len([d for d in jax.devices() if d.platform == "gpu"])
    if num_gpus >= 1:
        return
    skip = pytest.mark.skip(reason="needs a GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def ep_devices():
    """The devices tests run EP over: all local GPUs if any, else the CPU devices."""
    return jax.devices()


def make_mesh(num_ranks, axis_name="ep"):
    devices = ep_devices()
    if len(devices) < num_ranks:
        pytest.skip(f"needs {num_ranks} devices, have {len(devices)}")
    return Mesh(np.array(devices[:num_ranks]), (axis_name,))


def make_buffer(mesh, *, tokens, hidden, topk, **kw):
    """jax_ep.Buffer for the tests' backend (env JAX_EP_TEST_BACKEND, default "auto"), sized for
    the largest call (T, H, K) so that on GPU hosts "auto" picks the CUDA kernels."""
    import jax_ep  # noqa: PLC0415 (after the device-count config above)

    backend = os.environ.get("JAX_EP_TEST_BACKEND", "auto")
    return jax_ep.Buffer(mesh, "ep", backend=backend, max_tokens_per_rank=tokens, hidden=hidden,
                         num_topk=topk, **kw)


@pytest.fixture
def rng():
    """Fresh random inputs each run; the seed is printed so a failure can be replayed
    (JAX_EP_TEST_SEED=<seed>)."""
    seed = int(os.environ.get("JAX_EP_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    print(f"numpy seed = {seed}")
    return np.random.default_rng(seed)
