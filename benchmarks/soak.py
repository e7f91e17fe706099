#!/usr/bin/env python3
"""Soak test: many back-to-back dispatch + combine calls must not leak memory.

    python3 benchmarks/soak.py                            # GPU: EP over all local GPUs
    python3 benchmarks/soak.py --devices 2 --calls 2000   # CPU: 2 virtual devices, backend "xla"

Op families, each one jitted shard_map program over the mesh:
  normal-token   jax_ep.dispatch + jax_ep.combine, token layout (bfloat16)
  normal-expert  the same, expert layout
  ll-fp8         jax_ep.low_latency.dispatch (FP8) + combine
Each call's inputs come from the previous call's output: routing is top-k of x @ router (a
fixed random [H, E] matrix) with about 1/8 of the entries and 1/16 of the tokens -1, weights
k/128, and the next x is a chaotic function of x and the combined output, |x| in [0.25, 2]
(never zero). Phases per family:
  loop    --calls calls as programs of --inner calls each (a lax.fori_loop), after --warmup
  python  --python-calls single-call programs invoked one by one (host leaks show here)
Every --sample-every calls (python: --python-samples times), after block_until_ready and
gc.collect(), it records each device's memory_stats() "bytes_in_use" / "peak_bytes_in_use"
(None on CPU) and the host's VmRSS.

Fails (exit 1, saying why) when a device's bytes in use exceed the first sample at any later
sample, when host RSS grows by more than max(--rss-mb, --rss-pct of the first sample) from the
first to the last sample, when a result is not finite, or when the loop's last combine output
differs bitwise from a fresh single dispatch + combine of the same inputs (products w * y are
exact: weights k/128, bfloat16 rows scaled by powers of two). JSON goes to --out.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # never NVLink multicast on the shared GPU hosts
os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # bytes_in_use = what is live

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)  # only affects the CPU client

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jax_ep  # noqa: E402
from jax_ep import low_latency as ll  # noqa: E402

AX = "ep"
F32, BF16 = jnp.float32, jnp.bfloat16
FAMILIES = ("normal-token", "normal-expert", "ll-fp8")
# (T or M, H, K, E) per platform; E a multiple of 8 so any --devices up to 8 divides it
SHAPES = {"gpu": {"normal": (1024, 7168, 8, 64), "ll": (128, 7168, 8, 288)},
          "cpu": {"normal": (32, 256, 4, 16), "ll": (16, 256, 4, 16)}}


# ------------------------------------------------------------------------ per-shard programs
def route(x, router, k):
    """Top-k of x @ router; an entry is -1 when its score's low mantissa bits are 0 (1/8), a
    whole token when its top score's next bits are (1/16). Weights: softmax, rounded to k/128."""
    scores = jnp.dot(x.astype(F32), router)
    vals, idx = lax.top_k(scores, k)
    bits = lax.bitcast_convert_type(vals, jnp.uint32)
    drop = ((bits & 7) == 0) | (((bits[:, :1] >> 3) & 15) == 0)
    w = jnp.clip(jnp.round(jax.nn.softmax(vals, axis=-1) * 128), 1, 128) / 128
    return jnp.where(drop, -1, idx).astype(jnp.int32), w.astype(F32)


def mix(x, out):
    """Next input: a chaotic, data-dependent function of x and the output; |x| in [0.25, 2]."""
    v = x.astype(F32) + 0.5 * out.astype(F32)
    h = jnp.sin(v * 1000.0 + jnp.roll(x.astype(F32), 1, axis=1) * 37.0)
    return (jnp.where(h < 0, -1.0, 1.0) * (0.25 + 1.75 * jnp.abs(h))).astype(BF16)


def pow2_scale(j):
    """1, 2 or 4 by local expert id (exact in any float dtype)."""
    return jnp.left_shift(1, jnp.maximum(j, 0) % 3).astype(F32)


def normal_op(buf, num_experts, layout):
    def op(x, idx, w):
        res = jax_ep.dispatch(buf, x, idx, w, num_experts=num_experts, layout=layout)
        if layout == "token":
            y = res.recv_x * 2  # the rank's experts, already reduced (exact)
        else:
            y = (res.recv_x.astype(F32) * pow2_scale(res.recv_topk_idx)[:, None]).astype(BF16)
        return jax_ep.combine(buf, y, res.handle)
    return op


def ll_op(buf, num_experts):
    def op(x, idx, w):
        res = ll.dispatch(buf, x, idx, w, num_experts=num_experts, use_fp8=True)
        rows = res.recv_x.astype(F32) * jnp.repeat(res.recv_x_scales, 128, axis=-1)
        scale = pow2_scale(jnp.arange(rows.shape[0]))[:, None, None]
        return ll.combine(buf, (rows * scale).astype(BF16), res.handle).out
    return op


def programs(mesh, op, k, inner):
    """(loop: inner calls per invocation, single: one call, ops: the op alone), all jitted.
    loop / single: (x, router) -> (next x, (x, idx, w, out) of the last call)."""
    def step(x, router):
        idx, w = route(x, router, k)
        out = op(x, idx, w)
        return mix(x, out), (x, idx, w, out)

    def loop(x, router):
        carry = step(x, router)
        return lax.fori_loop(1, inner, lambda i, c: step(c[0], router), carry)

    def smap(f, in_specs, out_specs):
        return jax.jit(jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs))

    outs = (P(AX), (P(AX),) * 4)
    return (smap(loop, (P(AX), P()), outs), smap(step, (P(AX), P()), outs),
            smap(op, (P(AX),) * 3, P(AX)))


# ------------------------------------------------------------------------ sampling
def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def sample(devices, calls, t0):
    """One sample, after gc. Bytes in use: the least of 3 reads 10 ms apart (a buffer freed
    after its last use may land a moment late; a leak does not go away)."""
    seconds = round(time.perf_counter() - t0, 3)
    gc.collect()
    stats = [[d.memory_stats() or {} for d in devices]]
    while len(stats) < 3 and any(stats[0]):  # (no statistics on CPU)
        time.sleep(0.01)
        stats.append([d.memory_stats() or {} for d in devices])
    in_use = [min((s[d].get("bytes_in_use") for s in stats), key=lambda v: v or 0)
              for d in range(len(devices))]
    return dict(calls=calls, seconds=seconds, rss_mb=round(rss_mb(), 2), bytes_in_use=in_use,
                peak_bytes_in_use=[s.get("peak_bytes_in_use") for s in stats[-1]])


def run_phase(fn, x, router, *, calls, per_call, warmup, every, devices):
    """Invokes fn (per_call calls each) for warmup then calls calls; samples every `every`."""
    last = None
    for _ in range(max(warmup // per_call, 1)):
        x, last = fn(x, router)
    jax.block_until_ready((x, last))
    t0 = time.perf_counter()
    samples, done = [sample(devices, 0, t0)], 0
    while done < calls:
        x, last = fn(x, router)
        done += per_call
        if done % every == 0 or done >= calls:
            jax.block_until_ready((x, last))
            samples.append(sample(devices, done, t0))
    return x, last, samples


def verdict(samples, rss_mb_limit, rss_pct):
    """(growth dict, reasons for failure)."""
    first, last = samples[0], samples[-1]
    reasons = []
    growth = dict(rss_mb=round(last["rss_mb"] - first["rss_mb"], 2), bytes_in_use=[])
    for d, base in enumerate(first["bytes_in_use"]):
        if base is None:
            growth["bytes_in_use"].append(None)
            continue
        worst = max(s["bytes_in_use"][d] for s in samples)
        growth["bytes_in_use"].append(last["bytes_in_use"][d] - base)
        if worst > base:
            at = next(s["calls"] for s in samples if s["bytes_in_use"][d] == worst)
            reasons.append(f"device {d} bytes_in_use grew by {worst - base} B after warm-up "
                           f"({base} -> {worst} at call {at})")
    limit = max(rss_mb_limit, first["rss_mb"] * rss_pct / 100)
    if growth["rss_mb"] > limit:
        reasons.append(f"host RSS grew {growth['rss_mb']:.1f} MB "
                       f"({first['rss_mb']:.1f} -> {last['rss_mb']:.1f}) > limit {limit:.1f} MB")
    return growth, reasons


def mib(v):
    return "n/a" if v is None else f"{v / 2**20:.3f}"


def print_table(name, phase, samples, growth):
    print(f"\n{name} / {phase}")
    print(f"{'calls':>8} {'dev0 MiB in use':>16} {'dev0 peak MiB':>14} {'host RSS MB':>12} "
          f"{'seconds':>8}")
    for s in samples:
        print(f"{s['calls']:>8} {mib(s['bytes_in_use'][0]):>16} "
              f"{mib(s['peak_bytes_in_use'][0]):>14} {s['rss_mb']:>12.1f} {s['seconds']:>8.2f}")
    dev = growth["bytes_in_use"]
    dev_text = "n/a" if dev[0] is None else ", ".join(f"{g:+d} B" for g in dev)
    print(f"growth first -> last: device {dev_text}; host RSS {growth['rss_mb']:+.2f} MB")


# ------------------------------------------------------------------------ main
def run_family(name, mesh, args, rng):
    R = mesh.shape[AX]
    plat = "gpu" if mesh.devices.flat[0].platform == "gpu" else "cpu"
    kind = "ll" if name.startswith("ll") else "normal"
    T, H, K, E = (args.tokens, args.hidden, args.topk, args.experts) if kind == "normal" else (
        args.ll_tokens, args.hidden, args.topk, args.ll_experts)
    dT, dH, dK, dE = SHAPES[plat][kind]
    T, H, K, E = T or dT, H or dH, K or dK, E or dE
    if kind == "normal":
        buf = jax_ep.Buffer(mesh, AX, backend=args.backend, max_tokens_per_rank=T, hidden=H,
                            num_topk=K)
        op = normal_op(buf, E, name.split("-")[1])
    else:
        buf = jax_ep.Buffer(mesh, AX, backend=args.backend, ll_max_tokens_per_rank=T, hidden=H,
                            num_topk=K)
        op = ll_op(buf, E)
    info = dict(backend=buf.backend, ranks=R, tokens_per_rank=T, hidden=H, topk=K, experts=E)
    print(f"\n== {name}: " + ", ".join(f"{k}={v}" for k, v in info.items()), flush=True)
    sign = rng.choice(np.array([-1.0, 1.0], np.float32), (R * T, H))
    x0 = (rng.uniform(0.25, 2.0, (R * T, H)) * sign).astype(np.float32).astype(BF16)
    router = (rng.standard_normal((H, E)) / np.sqrt(H)).astype(np.float32)
    # placed as the programs' outputs are (one executable each); compiled side by side: the
    # loop and the check ahead of time, `single` by a call (the python phase uses jit's cache)
    sharded, replicated = NamedSharding(mesh, P(AX)), NamedSharding(mesh, P())
    x0, router = jax.device_put(x0, sharded), jax.device_put(router, replicated)
    idx, w = (jax.ShapeDtypeStruct((R * T, K), d, sharding=sharded) for d in (jnp.int32, F32))
    loop, single, ops = programs(mesh, op, K, args.inner)
    lowered = [loop.lower(x0, router), ops.lower(x0, idx, w)]
    with ThreadPoolExecutor(3) as pool:
        warm = pool.submit(lambda: jax.block_until_ready(single(x0, router)))
        loop, ops = pool.map(lambda lo: lo.compile(), lowered)
        warm.result()
    devices = list(mesh.devices.flat)
    result = dict(info, phases={}, reasons=[])
    with buf:
        t = time.perf_counter()
        x, last, samples = run_phase(loop, x0, router, calls=args.calls, per_call=args.inner,
                                     warmup=args.warmup, every=args.sample_every, devices=devices)
        phase_s = time.perf_counter() - t
        # the loop really computed: its last output equals a fresh call on the same inputs
        x_in, idx, w, out = last
        fresh = ops(x_in, idx, w)
        same = bool(np.array_equal(np.asarray(out).view(np.uint16),
                                   np.asarray(fresh).view(np.uint16)))
        idx_np = np.asarray(idx)
        result["check"] = dict(last_equals_fresh=same, unrouted_fraction=float((idx_np < 0).mean()))
        if not same:
            bad = int((np.asarray(out) != np.asarray(fresh)).sum())
            result["reasons"].append(f"the loop's last output differs from a fresh call at {bad} "
                                     "element(s)")
        every = max(args.python_calls // args.python_samples, 1)
        x_py, last_py, samples_py = run_phase(single, x, router, calls=args.python_calls,
                                              per_call=1, warmup=every, every=every,
                                              devices=devices)
        for phase, smp, xs, secs in (("loop", samples, (x, out), phase_s),
                                     ("python", samples_py, (x_py, last_py[3]), None)):
            growth, reasons = verdict(smp, args.rss_mb, args.rss_pct)
            if not all(np.isfinite(np.asarray(a, np.float32)).all() for a in xs):
                reasons.append("non-finite values in the carried input or the output")
            us = 1e6 * smp[-1]["seconds"] / max(smp[-1]["calls"], 1)
            result["phases"][phase] = dict(samples=smp, growth=growth, us_per_call=round(us, 1))
            result["reasons"] += [f"{phase}: {r}" for r in reasons]
            print_table(name, phase, smp, growth)
            print(f"{us:.1f} us per call" + ("" if secs is None else
                                             f" (phase incl. warm-up {secs:.1f} s)"))
        print(f"last loop output == fresh single call: {same}; unrouted top-k entries in the "
              f"last call: {result['check']['unrouted_fraction']:.3f}")
    return result


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--calls", type=int, default=10000, help="loop-phase calls per family")
    p.add_argument("--inner", type=int, default=100, help="calls per program (fori_loop)")
    p.add_argument("--python-calls", type=int, default=1000, help="per-call invocations")
    p.add_argument("--sample-every", type=int, default=1000)
    p.add_argument("--python-samples", type=int, default=10, help="samples of the python phase")
    p.add_argument("--warmup", type=int, default=None, help="loop calls before the first sample "
                   "(default --sample-every)")
    p.add_argument("--devices", type=int, default=None, help="EP ranks (default: all devices)")
    p.add_argument("--backend", default="auto", choices=("auto", "xla", "cuda"))
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--tokens", type=int, help="normal mode T per rank (default per platform)")
    p.add_argument("--ll-tokens", type=int, help="low-latency M = T per rank")
    p.add_argument("--hidden", type=int)
    p.add_argument("--topk", type=int)
    p.add_argument("--experts", type=int)
    p.add_argument("--ll-experts", type=int)
    p.add_argument("--rss-mb", type=float, default=20.0, help="allowed host RSS growth, MB ...")
    p.add_argument("--rss-pct", type=float, default=2.0, help="... or this percent, the larger")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args(argv)
    unknown = set(args.families.split(",")) - set(FAMILIES)
    if unknown:
        p.error(f"unknown --families {sorted(unknown)}; choose from {FAMILIES}")
    args.inner = max(1, min(args.inner, args.calls))
    args.sample_every = max(args.inner, args.sample_every // args.inner * args.inner)
    args.warmup = args.sample_every if args.warmup is None else args.warmup
    if args.seed is None:
        args.seed = int.from_bytes(os.urandom(4), "little")
    return args


def main(argv=None):
    args = parse_args(argv)
    devices = jax.devices()[:args.devices] if args.devices else jax.devices()
    mesh = Mesh(np.array(devices), (AX,))
    kind = devices[0].device_kind
    print(f"soak: {len(devices)} x {kind} ({devices[0].platform}), jax {jax.__version__}, "
          f"seed {args.seed}, {args.calls} loop calls ({args.inner} per program) + "
          f"{args.python_calls} single calls per family", flush=True)
    rng = np.random.default_rng(args.seed)
    results = {name: run_family(name, mesh, args, rng) for name in args.families.split(",")}
    report = dict(device_kind=kind, num_devices=len(devices), platform=devices[0].platform,
                  jax=jax.__version__, time=time.strftime("%FT%T"), families=results,
                  args={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()})
    reasons = [f"{n}: {r}" for n, res in results.items() for r in res["reasons"]]
    report["ok"] = not reasons
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"soak_{kind.replace(' ', '_')}_x{len(devices)}.json"
    path.write_text(json.dumps(report, indent=1))
    print(f"\nwrote {path}")
    for r in reasons:
        print("FAIL:", r)
    print("soak: " + ("FAILED" if reasons else "passed"))
    return 1 if reasons else 0


if __name__ == "__main__":
    raise SystemExit(main())
