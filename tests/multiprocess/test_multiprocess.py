"""jax_ep over several processes (jax.distributed, one device each): R = 2 and 4.

CPU (CI): backend "xla", cross-process collectives through gloo. GPUs: backend "cuda" over
NVSHMEM, several processes per GPU when there are fewer GPUs than ranks (correctness only: the
processes time-slice the GPU). Inputs are drawn from a fresh seed (printed) that every process
shares; each checks its own rank against the numpy model.
"""
import os
import re

import pytest

import launcher
import ll_bodies

RANKS = [2, 4]


@pytest.fixture
def seed():
    value = int.from_bytes(os.urandom(3), "little")
    print(f"multi-process seed = {value}")
    return value


def _backend() -> str:
    return os.environ.get("JAX_EP_TEST_BACKEND") or ("cuda" if launcher.local_gpus() else "xla")


def _run(body, num_processes, seed, params=None, **kw):
    if _backend() == "xla" and launcher.local_gpus() and launcher.local_gpus() < num_processes:
        pytest.skip("backend 'xla' needs a GPU per process: XLA collectives (NCCL) refuse "
                    "processes that share a GPU")
    return launcher.run(body, num_processes, params={"seed": seed, **(params or {})}, **kw)


@pytest.mark.parametrize("num_processes", RANKS)
def test_multiprocess_matches_model(num_processes, seed):
    """In one set of processes: dispatch/combine of both layouts in BF16/F16/F32/FP8 with skewed
    routing, -1, invalid ids, overflow and T = 0 bit-exact; the VJPs of dispatch and combine
    bit-exact; the Flax MoE layer forward and backward against its dense reference; 200
    back-to-back round trips (bodies.py says what each checks)."""
    results = _run("bodies:checks", num_processes, seed)
    for r in results:
        print(f"rank {r.rank}: {r.result}")
        assert r.result["exchange"]["rank"] == r.rank
        assert r.result["exchange"]["cases"] == 12
        assert r.result["gradients"]["checked"] == 4
        assert r.result["moe_layer"]["max_abs_y"] > 0
        assert r.result["back_to_back"]["calls"] == 200


# Virtual nodes on this host: 2 nodes x 1 rank and 2 nodes x 2 ranks (backend "cuda": the
# internode kernels, NVSHMEM puts between the nodes, even on one GPU).
NODES = [(2, 1), (4, 2)]


@pytest.mark.parametrize("num_processes,per_node", NODES, ids=["2x1", "2x2"])
def test_internode_matches_model(num_processes, per_node, seed):
    """The checks of test_multiprocess_matches_model with num_ranks_per_node: bit-exact
    dispatch of both layouts in every dtype with skew, -1, invalid ids, overflow and T = 0;
    combine reducing inside each node first (the numpy model's node order); the VJPs; the MoE
    layer; 200 back-to-back round trips. On backend "xla" (CPU CI) only the exchange and the
    gradients of 2 x 2, the cases where the node grouping changes the reference's order."""
    params = {"ranks_per_node": per_node}
    kernels = _backend() == "cuda"
    if not kernels:
        if per_node == 1:
            pytest.skip("backend 'xla': one rank per node sums like one node (covered above)")
        params["bodies"] = ["exchange", "gradients"]
    results = _run("bodies:checks", num_processes, seed, params)
    for r in results:
        print(f"rank {r.rank}: {r.result}")
        assert r.result["exchange"]["cases"] == 12
        assert r.result["gradients"]["checked"] == 4
        if kernels:
            assert r.result["moe_layer"]["max_abs_y"] > 0
            assert r.result["back_to_back"]["calls"] == 200


@pytest.mark.parametrize("num_processes,per_node", [(n, None) for n in RANKS] + NODES,
                         ids=[f"{n}" for n in RANKS] + ["2x1", "2x2"])
def test_missing_rank_times_out_naming_rank_and_phase(num_processes, per_node, seed):
    if _backend() != "cuda":
        pytest.skip("timeouts are the cuda kernels' (backend 'xla' waits in XLA's collectives)")
    results = _run("bodies:missing_rank", num_processes, seed, {"ranks_per_node": per_node},
                   check=False, timeout_s=150)
    text = results[0].output
    # Rank 0 waits for every peer at once (over the network too, with nodes): any may be named.
    peers = "|".join(str(p) for p in range(1, num_processes))
    assert re.search(rf"rank 0 timed out in dispatch \(entry barrier\) waiting for rank "
                     rf"({peers})\b", text), results[0].tail(80)
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


def test_multiprocess_example_runs():
    """examples/ep_multiprocess.py --processes 2 (the README's launch line) succeeds."""
    import pathlib
    import subprocess
    import sys

    script = pathlib.Path(__file__).parents[2] / "examples" / "ep_multiprocess.py"
    proc = subprocess.run([sys.executable, str(script), "--processes", "2", "--tokens", "64",
                           "--hidden", "256", "--iters", "2"], capture_output=True, text=True,
                          timeout=300)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-4000:]
    for rank in (0, 1):
        assert f"rank {rank}/2 backend" in text and "max |err|" in text, text[-4000:]


@pytest.mark.parametrize("num_processes", RANKS)
def test_multiprocess_low_latency(num_processes, seed):
    """jax_ep.low_latency across processes (NVSHMEM on GPUs): fused and send/recv split, FP8
    and bfloat16, skew, -1, invalid and repeated experts, a rank masked as failed."""
    results = _run("ll_bodies:ll_checks", num_processes, seed)
    for r in results:
        print(f"rank {r.rank}: {r.result}")
        assert r.result["rank"] == r.rank and r.result["cases"] == len(ll_bodies.CASES)


@pytest.mark.parametrize("num_processes", RANKS)
def test_multiprocess_low_latency_survives_a_dead_rank(num_processes, seed):
    """The last rank never runs the low-latency ops; masked as failed, the others complete."""
    if _backend() != "cuda":
        pytest.skip("backend 'xla' exchanges through XLA collectives, which need every rank")
    results = _run("ll_bodies:ll_skipped_rank", num_processes, seed, timeout_s=240)
    for r in results:
        print(f"rank {r.rank}: {r.result}")
        if r.rank != num_processes - 1:
            assert r.result["missing"] > 0
