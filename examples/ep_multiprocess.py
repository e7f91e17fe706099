"""Expert-parallel dispatch/combine with one process per device (jax.distributed).

    python examples/ep_multiprocess.py --processes 4      # starts 4 copies of itself here

Each copy joins jax.distributed (coordinator 127.0.0.1), takes one GPU (round-robin; several
copies share a GPU when there are fewer GPUs: correct, but they time-slice it) or one CPU
device, builds a jax_ep.Buffer over the global mesh - on GPUs backend "cuda" over NVSHMEM, on
CPUs backend "xla" over gloo - and checks a dispatch -> combine round trip whose weights sum to
one (the identity). On a cluster, start one copy per GPU yourself:

    python examples/ep_multiprocess.py --rank R --num-processes N --coordinator HOST:PORT

--ranks-per-node G makes nodes of G consecutive ranks (default: the ranks of one host): with
several nodes backend "cuda" runs the internode kernels (NVSHMEM puts between nodes, NVLink
inside them); on one host, G = 1 or 2 makes "virtual nodes":

    python examples/ep_multiprocess.py --processes 4 --ranks-per-node 2
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time

SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "NVSHMEM_DISABLE_NVLS": "1",
            "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _num_gpus() -> int:
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
        return len([line for line in out.stdout.splitlines() if line.startswith("GPU ")])
    except (OSError, subprocess.TimeoutExpired):
        return 0


def launch(num_processes: int, argv: list[str]) -> int:
    """Starts the copies (GPUs round-robin, XLA's memory split between copies of one GPU)."""
    gpus = _num_gpus()
    coordinator = f"127.0.0.1:{_free_port()}"
    procs = []
    for rank in range(num_processes):
        env = dict(os.environ, **SAFE_ENV)
        if gpus:
            per_gpu = -(-num_processes // gpus)
            env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", f"{0.5 / per_gpu:.3f}")
        else:
            env["JAX_PLATFORMS"] = "cpu"
        cmd = [sys.executable, __file__, "--rank", str(rank), "--num-processes",
               str(num_processes), "--coordinator", coordinator,
               "--gpu", str(rank % gpus if gpus else -1)] + argv
        procs.append(subprocess.Popen(cmd, env=env))
    codes = [p.wait() for p in procs]
    return max(codes, key=abs)


def run(args) -> None:
    import jax

    if args.gpu < 0:
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", 1)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(args.coordinator, num_processes=args.num_processes,
                               process_id=args.rank,
                               local_device_ids=[args.gpu] if args.gpu >= 0 else None)
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import jax_ep

    devices = sorted(jax.devices(), key=lambda d: d.process_index)
    mesh = Mesh(np.array(devices), ("ep",))
    R, T, H, K = len(devices), args.tokens, args.hidden, args.topk
    E = args.experts_per_rank * R
    rng = np.random.default_rng(0)  # the same global inputs in every process
    x = rng.standard_normal((R * T, H)).astype(np.float32)
    idx = np.stack([rng.permutation(E)[:K] for _ in range(R * T)]).astype(np.int32)
    w = rng.random((R * T, K)).astype(np.float32)
    w /= w.sum(1, keepdims=True)

    def put(a):
        return jax.make_array_from_callback(a.shape, NamedSharding(mesh, P("ep")),
                                            lambda i: a[i])

    backend = "cuda" if devices[0].platform == "gpu" else "xla"
    with jax_ep.Buffer(mesh, "ep", backend=backend, max_tokens_per_rank=T, hidden=H,
                       num_topk=K, num_ranks_per_node=args.ranks_per_node) as buf:
        def round_trip(x, idx, w):
            res = jax_ep.dispatch(buf, x.astype(jnp.bfloat16), idx, w, num_experts=E,
                                  layout="expert")
            y = res.recv_x.astype(jnp.float32)  # your experts go here
            return jax_ep.combine(buf, y, res.handle), res.num_recv_rows[None]

        f = jax.jit(jax.shard_map(round_trip, mesh=mesh, in_specs=P("ep"),
                                  out_specs=P("ep")))
        args_ = (put(x), put(idx), put(w))
        out, rows = jax.block_until_ready(f(*args_))  # compiles
        start = time.perf_counter()
        for _ in range(args.iters):
            out, rows = f(*args_)
        jax.block_until_ready(out)
        ms = (time.perf_counter() - start) / args.iters * 1e3
        mine = np.asarray(out.addressable_shards[0].data)
        rank = [d.process_index for d in devices].index(jax.process_index())
        want = x[rank * T:(rank + 1) * T].astype(jnp.bfloat16).astype(np.float32)
        err = float(np.abs(mine - want).max())
        nodes = R // buf.num_ranks_per_node
        print(f"rank {rank}/{R} backend {buf.backend} transport {buf.transport} "
              f"nodes {nodes}x{buf.num_ranks_per_node}: "
              f"{int(rows.addressable_shards[0].data[0])} rows received, round trip "
              f"max |err| {err:.2e}, {ms:.2f} ms per call (wall clock)", flush=True)
        if err > 1e-2:
            raise SystemExit(f"rank {rank}: the round trip is not the identity ({err})")
    jax.distributed.shutdown()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--processes", type=int, help="start this many copies on this host")
    p.add_argument("--rank", type=int)
    p.add_argument("--num-processes", type=int)
    p.add_argument("--coordinator", default="127.0.0.1:12355")
    p.add_argument("--gpu", type=int, default=0, help="local GPU of this copy (-1: CPU)")
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--topk", type=int, default=4)
    p.add_argument("--experts-per-rank", type=int, default=4)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--ranks-per-node", type=int, default=None,
                   help="G consecutive ranks per node (default: one host on backend cuda, "
                        "all ranks on backend xla)")
    args = p.parse_args(argv)
    if args.processes:
        passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
        i = passthrough.index("--processes")
        return launch(args.processes, passthrough[:i] + passthrough[i + 2:])
    if args.rank is None or args.num_processes is None:
        p.error("give --processes N, or --rank and --num-processes")
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
