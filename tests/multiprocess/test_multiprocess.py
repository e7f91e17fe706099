"""jax_ep over several processes (jax.distributed, one device each): R = 2 and 4.

CPU (CI): backend "xla", cross-process collectives through gloo. GPUs: backend "cuda" over
NVSHMEM, several processes per GPU when there are fewer GPUs than ranks (correctness only: the
processes time-slice the GPU). Inputs are drawn from a fresh seed (printed) that every process
shares; each checks its own rank against the numpy model.
"""
import os

import pytest

import launcher

RANKS = [2, 4]


@pytest.fixture
def seed():
    value = int.from_bytes(os.urandom(3), "little")
    print(f"multi-process seed = {value}")
    return value


def _backend() -> str:
    return os.environ.get("JAX_EP_TEST_BACKEND") or ("cuda" if launcher.local_gpus() else "xla")


def _run(body, num_processes, seed, **kw):
    if _backend() == "xla" and launcher.local_gpus() and launcher.local_gpus() < num_processes:
        pytest.skip("backend 'xla' needs a GPU per process: XLA collectives (NCCL) refuse "
                    "processes that share a GPU")
    return launcher.run(body, num_processes, params={"seed": seed}, **kw)


@pytest.mark.parametrize("num_processes", RANKS)
def test_dispatch_combine_matches_model(num_processes, seed):
    results = _run("bodies:exchange", num_processes, seed)
    assert [r.result["rank"] for r in results] == list(range(num_processes))
    assert all(r.result["cases"] > 0 for r in results)


@pytest.mark.parametrize("num_processes", RANKS)
def test_gradients_match_model(num_processes, seed):
    results = _run("bodies:gradients", num_processes, seed)
    assert all(r.result["checked"] == 4 for r in results)


@pytest.mark.parametrize("num_processes", RANKS)
def test_moe_layer_forward_backward(num_processes, seed):
    results = _run("bodies:moe_layer", num_processes, seed)
    assert all(r.result["max_abs_y"] > 0 for r in results)


@pytest.mark.parametrize("num_processes", RANKS)
def test_back_to_back_calls(num_processes, seed):
    results = _run("bodies:back_to_back", num_processes, seed)
    assert all(r.result["calls"] == 200 for r in results)


@pytest.mark.parametrize("num_processes", RANKS)
def test_missing_rank_times_out_naming_rank_and_phase(num_processes, seed):
    if _backend() != "cuda":
        pytest.skip("timeouts are the cuda kernels' (backend 'xla' waits in XLA's collectives)")
    results = _run("bodies:missing_rank", num_processes, seed, check=False, timeout_s=150)
    text = results[0].output
    assert "rank 0 timed out in dispatch (entry barrier) waiting for rank 1" in text, (
        results[0].tail(80))
    assert all(r.returncode is not None or r.rank != 0 for r in results), "rank 0 was killed"


def test_launcher_reports_a_failing_rank(seed):
    """A rank that raises is reported with its traceback; the others do not linger."""
    with pytest.raises(launcher.MultiprocessError, match=r"failing ranks \[1\], killed by the "
                                                         r"launcher \[0\]"):
        launcher.run("test_multiprocess:_fail_on_rank_1", 2, params={"seed": seed},
                     timeout_s=120, grace_s=5)


def _fail_on_rank_1(seed):
    import jax

    if jax.process_index() == 1:
        raise ValueError(f"rank 1 fails on purpose (seed {seed})")
    import time

    time.sleep(300)  # would outlive the test without the launcher's grace-period kill
    return {}
