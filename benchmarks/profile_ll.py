#!/usr/bin/env python3
"""Kernel-level profile of the low-latency ops: the device time of every CUDA kernel, per call.

    python benchmarks/profile_ll.py [--graph] [--calls 50] [--out DIR]

Runs `--calls` fused dispatch + combine and as many split ones (DeepEP's LL config: T=128,
H=7168, top-8 of 288, FP8) in one jitted program each, under CUPTI (torch.profiler, which sees
every kernel of the process, XLA's included), and prints per kernel name: launches, mean and
median device us, and the gaps between consecutive kernels on the stream (launch latency the
per-call slope of bench_low_latency.py includes). --graph compiles with XLA's CUDA graphs for
custom calls; "in graph" counts the launches of a kernel that no recorded kernel-launch call
made, i.e. a CUDA graph launch (see kernel_table; the JSON lists the calls' names). Writes
profile_ll[_graph].json under --out. GPU only.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

from graph_flags import GRAPH_FLAGS  # this script's folder (imports nothing)
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
if "--graph" in sys.argv:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + GRAPH_FLAGS).strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402
from jax.sharding import Mesh  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_dispatch as bd  # noqa: E402

import jax_ep  # noqa: E402
from jax_ep import low_latency as ll  # noqa: E402


def programs(buf, num_experts, calls, use_fp8=True):
    """{name: fn(x, idx, w, y)}: `calls` dispatch + combine pairs in a row, each ordered after
    the previous one by data (the next x is tied to the previous output); y [L, R * M, H]
    bfloat16 stands for the expert outputs (the same every call)."""
    def make(split):
        def body(x, idx, w, y):
            out = x
            for _ in range(calls):
                x, _ = lax.optimization_barrier((x, out))
                if split:
                    res = ll.dispatch_recv(buf, ll.dispatch_send(
                        buf, x, idx, w, num_experts=num_experts, use_fp8=use_fp8))
                else:
                    res = ll.dispatch(buf, x, idx, w, num_experts=num_experts, use_fp8=use_fp8)
                y, _ = lax.optimization_barrier((y, res.recv_x))
                if split:
                    out = ll.combine_recv(buf, ll.combine_send(buf, y, res.handle)).out
                else:
                    out = ll.combine(buf, y, res.handle).out
            return out
        return body
    return {"fused": make(False), "split": make(True)}


def is_ours(kernel_name):
    """A jax_ep kernel (our handlers launch it with <<<>>>: recorded as cudaLaunchKernel)."""
    return "jax_ep::" in kernel_name


def kernel_table(trace_events):
    """Per kernel name: its durations (us); how many of its launches were NOT made by a recorded
    kernel-launch call (cudaLaunchKernel*, cuLaunchKernel*: what a direct launch records, e.g.
    our handlers' <<<>>>), i.e. by a CUDA graph launch: XLA launches its command buffers with the
    driver's cuGraphLaunch, which kineto does not record (it keeps cuLaunchKernel only), so such
    a kernel's correlation id matches no recorded call, or a *GraphLaunch one where recorded;
    the names of those calls ("unrecorded" where none); and the stream gaps between kernels.
    The count is only evidence where a run without graphs shows the same kernels' direct
    launches recorded (tests/test_low_latency.py checks both)."""
    launch_api = {e["args"]["correlation"]: e["name"] for e in trace_events
                  if e.get("cat") in ("cuda_runtime", "cuda_driver")
                  and "correlation" in e.get("args", {})}
    kernels = [e for e in trace_events if e.get("cat") == "kernel"]
    per, in_graph, apis = defaultdict(list), defaultdict(int), defaultdict(set)
    for e in kernels:
        per[e["name"]].append(e["dur"])
        api = launch_api.get(e.get("args", {}).get("correlation"), "unrecorded")
        in_graph[e["name"]] += "LaunchKernel" not in api and "LaunchCooperative" not in api
        apis[e["name"]].add(api)
    spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in kernels)
    gaps = [b[0] - a[1] for a, b in zip(spans, spans[1:])]
    return per, in_graph, apis, gaps


def profile_kernels(fn, args, runs):
    """kernel_table of the kernels that `runs` calls of fn(*args) ran (each call waited for),
    under CUPTI through torch.profiler (imported here: only the GPU tools need torch)."""
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(runs):
            jax.block_until_ready(fn(*args))
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        return kernel_table(json.loads(trace.read_text())["traceEvents"])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--calls", type=int, default=50)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--bf16", action="store_true", help="bfloat16 dispatch (default FP8)")
    p.add_argument("--graph", action="store_true")
    p.add_argument("--out", type=Path, default=Path("."))
    args = p.parse_args()
    devices = jax.devices()
    mesh = Mesh(np.array(devices), ("ep",))
    R, T, H, K, E = mesh.size, args.tokens, args.hidden, 8, 288
    x, idx, w = bd.make_inputs(mesh, 1234, R, T, H, K, E)
    buf = jax_ep.Buffer(mesh, "ep", backend="cuda", ll_max_tokens_per_rank=T, hidden=H,
                        num_topk=K)
    report = dict(device=devices[0].device_kind, ranks=R, calls=args.calls, graph=args.graph,
                  tokens=T, hidden=H, fp8=not args.bf16, rows={})
    y = jax.jit(lambda k: jax.random.normal(k, (R * (E // R), R * T, H), jnp.bfloat16),
                out_shardings=jax.NamedSharding(mesh, P("ep")))(jax.random.key(5))
    for name, body in programs(buf, E, args.calls, not args.bf16).items():
        f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("ep"), out_specs=P("ep")))
        for _ in range(3):
            f(x, idx, w, y).block_until_ready()
        per, in_graph, apis, gaps = profile_kernels(f, (x, idx, w, y), 3)
        print(f"\n== {name} ({'graph' if args.graph else 'stream'}) T={T} H={H} "
              f"{'bf16' if args.bf16 else 'fp8'}, {args.calls} calls x 3 runs")
        print(f"{'kernel':70s} {'n':>5s} {'mean us':>8s} {'p50 us':>8s} {'in graph':>8s}")
        rows = {}
        for k, v in sorted(per.items(), key=lambda kv: -sum(kv[1])):
            print(f"{k[:70]:70s} {len(v):5d} {np.mean(v):8.2f} {np.median(v):8.2f} "
                  f"{in_graph[k]:8d}")
            rows[k] = dict(n=len(v), mean_us=float(np.mean(v)), p50_us=float(np.median(v)),
                           in_graph=in_graph[k], launch_apis=sorted(apis[k]))
        g = np.array(gaps)
        g = g[g < 1000]  # not the host gaps between the 3 runs
        print(f"stream gaps between kernels: p50 {np.median(g):.2f} us, mean {g.mean():.2f} us")
        report["rows"][name] = dict(kernels=rows, gap_p50_us=float(np.median(g)),
                                    gap_mean_us=float(g.mean()))
    buf.close()
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / (f"profile_ll_T{T}_H{H}{'_bf16' if args.bf16 else ''}"
                      f"{'_graph' if args.graph else ''}.json")
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
