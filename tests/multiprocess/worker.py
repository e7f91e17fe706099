"""One process of a multi-process test (started by launcher.py; not a test module).

Joins jax.distributed (coordinator 127.0.0.1), then runs the body and prints its JSON result.
It dies with the launcher (PR_SET_PDEATHSIG) and, once done, leaves without JAX's or NVSHMEM's
exit-time teardown, which could wait on peers that already left.
"""
from __future__ import annotations

import argparse
import ctypes
import importlib
import json
import os
import signal
import sys
import traceback


def _die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--num-processes", type=int, required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--gpu", type=int, default=-1)
    p.add_argument("--body", required=True)
    p.add_argument("--params", default="{}")
    args = p.parse_args()
    _die_with_parent()
    sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)),
                    os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]  # tests/
    import jax  # noqa: PLC0415

    if args.gpu < 0:
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", 1)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_default_matmul_precision", "highest")
    jax.distributed.initialize(f"127.0.0.1:{args.port}", num_processes=args.num_processes,
                               process_id=args.rank,
                               local_device_ids=[args.gpu] if args.gpu >= 0 else None,
                               initialization_timeout=120)
    module, function = args.body.split(":")
    print(f"rank {args.rank}: devices {jax.local_devices()} of {jax.device_count()}", flush=True)
    result = getattr(importlib.import_module(module), function)(**json.loads(args.params))
    print("JAX_EP_RESULT " + json.dumps(result), flush=True)
    # Leave together: process 0 hosts the coordination service the others still talk to, and
    # shutdown waits until every process has disconnected.
    jax.distributed.shutdown()
    return 0


if __name__ == "__main__":
    try:
        code = main()
    except BaseException:  # noqa: BLE001 (report every failure, then leave at once)
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
