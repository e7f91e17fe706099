"""Starts N processes under jax.distributed on this host and runs a test body in each.

Processes get the local GPUs round-robin (several per GPU when GPUs are fewer, with XLA's memory
split between them) or, without GPUs, one CPU device each with gloo collectives. The coordinator
listens on 127.0.0.1 at a free port. Every process runs `module:function(**params)` from this
folder (worker.py) and prints its JSON result; the launcher bounds the whole run, kills every
process group it started (also when one rank fails: the others get a short grace period), and
reports each failing rank with the tail of its output.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Optional

HERE = pathlib.Path(__file__).resolve().parent
RESULT_TAG = "JAX_EP_RESULT "
SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "NVSHMEM_DISABLE_NVLS": "1",
            "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}


@dataclasses.dataclass
class RankResult:
    rank: int
    returncode: Optional[int]  # None: killed by the launcher
    output: str
    result: object = None  # what the body returned (JSON), if it finished

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.output.splitlines()[-lines:])


class MultiprocessError(AssertionError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_gpus() -> int:
    """GPUs JAX sees in this (the pytest) process."""
    import jax  # noqa: PLC0415

    return len([d for d in jax.local_devices() if d.platform == "gpu"])


def _gpu_free_fraction(gpu: int) -> float:
    """Free / total memory of a GPU per nvidia-smi (this process may hold part of it)."""
    try:
        out = subprocess.run(["nvidia-smi", "-i", str(gpu), "--query-gpu=memory.free,memory.total",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True,
                             timeout=30).stdout
        free, total = (float(v) for v in out.strip().split(","))
        return free / total
    except Exception:  # noqa: BLE001 (no nvidia-smi: assume the GPU is ours)
        return 0.9


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def run(body: str, num_processes: int, *, params: Optional[dict] = None,
        timeout_s: float = 600.0, grace_s: float = 20.0, check: bool = True,
        env: Optional[dict] = None) -> list[RankResult]:
    """Runs `body` ("module:function" in this folder) in `num_processes` processes.

    check=True raises MultiprocessError unless every rank exits 0 with a result; False returns
    the ranks' results as they are (for tests that expect a failure).
    """
    num_gpus = local_gpus()
    per_gpu = -(-num_processes // num_gpus) if num_gpus else 0
    port = free_port()
    procs, logs = [], []
    base_env = dict(os.environ)
    base_env.update(SAFE_ENV)
    base_env.update({"PYTHONUNBUFFERED": "1", "JAX_EP_MP_PORT": str(port)})
    base_env.update(env or {})
    try:
        for rank in range(num_processes):
            child_env = dict(base_env)
            gpu = rank % num_gpus if num_gpus else -1
            if num_gpus:
                # XLA takes this share of the GPU's free memory; the rest is for NVSHMEM / CUDA.
                share = 0.5 * _gpu_free_fraction(gpu) / per_gpu
                child_env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", f"{share:.3f}")
            else:
                child_env["JAX_PLATFORMS"] = "cpu"
            log = tempfile.TemporaryFile(mode="w+")
            cmd = [sys.executable, str(HERE / "worker.py"), "--rank", str(rank),
                   "--num-processes", str(num_processes), "--port", str(port), "--gpu", str(gpu),
                   "--body", body, "--params", json.dumps(params or {})]
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                          env=child_env, cwd=str(HERE), start_new_session=True))
            logs.append(log)
        deadline = time.monotonic() + timeout_s
        first_failure = None
        timed_out = False
        while any(p.poll() is None for p in procs):
            now = time.monotonic()
            if now > deadline:
                timed_out = True
                break
            if first_failure is None and any(p.poll() not in (None, 0) for p in procs):
                first_failure = now
            if first_failure is not None and now > first_failure + grace_s:
                break
            time.sleep(0.1)
    finally:
        for p in procs:
            _kill(p)  # also every process it started (its own process group)
    results = []
    for rank, (p, log) in enumerate(zip(procs, logs)):
        log.seek(0)
        output = log.read()
        log.close()
        killed = p.returncode is not None and p.returncode < 0
        result = None
        for line in output.splitlines():
            if line.startswith(RESULT_TAG):
                result = json.loads(line[len(RESULT_TAG):])
        results.append(RankResult(rank, None if killed else p.returncode, output, result))
    if check:
        bad = [r for r in results if r.returncode != 0 or r.result is None]
        if timed_out or bad:
            why = f"timed out after {timeout_s:.0f} s" if timed_out else "failed"
            failed = [r.rank for r in bad if r.returncode is not None]
            killed = [r.rank for r in bad if r.returncode is None]
            report = "\n\n".join(
                f"--- rank {r.rank}: " + ("killed" if r.returncode is None
                                          else f"exit code {r.returncode}") + f"\n{r.tail()}"
                for r in (bad or results))
            raise MultiprocessError(
                f"{body} on {num_processes} processes {why}; failing ranks {failed}, killed "
                f"by the launcher {killed}\n{report}")
    return results
