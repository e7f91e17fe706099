#!/usr/bin/env python3
"""EP dispatch/combine benchmark: jax_ep backends and plain-JAX baselines, side by side.

    python benchmarks/bench_dispatch.py --quick    # CPU smoke run (8 virtual CPU devices)
    python benchmarks/bench_dispatch.py            # GPU: EP over all local GPUs, two configs

Configs (bf16; uniform routing: each token takes the top-K of E random scores, K distinct
experts): DeepEP's test (T=4096 tokens/rank, H=7168, top-8 of 256) and a small batch (T=128).
Rows: jax_ep "xla" and "cuda" backends (token and expert layout; "cuda" is n/a until its kernels
exist), ragged_a2a (MaxText style, lax.ragged_all_to_all; GPU only), padded_a2a (lax.all_to_all,
T rows per destination) and nvlink_copy (raw copy ceiling: our peer-copy kernel pushes the
dispatch's remote bytes to every peer with all SMs; GPU only).

Metrics (DeepEP's), for each rank r, then averaged over ranks:
  pairs(r)      = (token, destination rank) pairs with destination r, from all source ranks
                  including r (a token goes to a rank once, however many experts it has there)
  logical GB/s  = pairs(r) * H * bytes_per_element / time / 1e9
  remote GB/s   = (pairs(r) from source ranks != r) * H * bytes_per_element / time / 1e9
  combine moves the same bytes in the reverse direction: same formulas.
Timing:
  device  calls chained in ONE jitted program (straight-line; lax.fori_loop with --no-unroll,
          which adds XLA:GPU's per-iteration host round trip). Every input of call i+1 (x, idx,
          w / y and the handle) gets a zero taken from call i's output (`v != v`, which XLA
          cannot fold), so no call or part of one is hoisted or CSE'd, and all outputs are
          carried and returned, so none is dead code. Programs of --inner and 2 * --inner calls
          are timed alternately, --iters pairs after --warmup; per call = (long - short) /
          inner, so the program's own launch cost cancels: median, p10, p90. Rows whose
          calls take over --max-program-ms / --inner (ragged_a2a) use fewer calls (>= 2).
  wall    one call per jitted program, block_until_ready, median of --iters.
Each row is checked once before timing: combine(dispatch(x)) with identity experts against numpy
on sampled rows (token-style rows: x * number of destination ranks, exactly; expert layout:
x * sum_k w_k within 2 bf16 ulps). A failing row is not timed.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time
import traceback
from pathlib import Path

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # never NVLink multicast on the shared GPU hosts
os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)  # only affects the CPU client

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jax_ep  # noqa: E402

EXPERT_ALIGNMENT = 8  # expert-layout groups padded to this (ragged_dot friendly)

AX = "ep"
DTYPE = jnp.bfloat16
# H200 EP4, DeepEP V1 BF16 on this exact workload (shared/GPU.md): drawn on the chart.
DEEPEP_REF = {"shape": (4096, 7168, 8, 256, 4), "dispatch": 260.8, "combine": 358.6}


# ------------------------------------------------------------------------------ rows (per shard)
# A row: dispatch(x, idx, w) -> (recv [rows, H], handle, other outputs); combine(y, handle) ->
# [T, H]; `expect` names the identity-expert result (see check_row). Raises NotImplementedError
# when it cannot run here (reported as n/a).
def _excl_cumsum(v):
    return jnp.cumsum(v) - v


def _sum_pairs(tables, pos, dtype):
    """out[t] = sum over d = 0..R-1, in order, in float32, of tables[d][pos[t, d]] (or 0)."""
    acc = 0.0
    for d in range(pos.shape[1]):
        got = jnp.take(tables[d], pos[:, d], axis=0, mode="fill", fill_value=0)
        acc = acc + got.astype(jnp.float32)
    return acc.astype(dtype)


def _ranks_of_tokens(idx, num_experts, num_ranks):
    """[T, R] bool: token t has at least one expert on rank d."""
    dst = idx // (num_experts // num_ranks)
    return jnp.any(dst[:, :, None] == jnp.arange(num_ranks)[None, None], axis=1)


class JaxEpRow:
    """jax_ep.dispatch / combine with one backend and layout."""

    def __init__(self, mesh, backend, layout, num_experts, tokens, hidden, topk, capacity,
                 num_recv_sms=None):
        kw = dict(num_recv_sms=num_recv_sms) if backend == "cuda" else {}
        try:
            self.buf = jax_ep.Buffer(mesh, AX, backend=backend, max_tokens_per_rank=tokens,
                                     hidden=hidden, num_topk=topk, **kw)
        except ValueError as e:  # e.g. backend "cuda" on a CPU mesh
            raise NotImplementedError(str(e)) from None
        self.layout, self.E = layout, num_experts
        self.capacity = capacity if layout == "expert" else None
        self.expect = "weighted" if layout == "expert" else "count"

    def dispatch(self, x, idx, w):
        res = jax_ep.dispatch(self.buf, x, idx, w, num_experts=self.E, layout=self.layout,
                              recv_capacity=self.capacity, expert_alignment=EXPERT_ALIGNMENT)
        rest = dataclasses.replace(res, recv_x=None, handle=None)  # counts, ids, weights
        return res.recv_x, res.handle, rest

    def combine(self, y, h):
        return jax_ep.combine(self.buf, y, h)


class PaddedA2ARow:
    """lax.all_to_all of [R, T, H] blocks: block d holds the tokens going to rank d, padded."""

    expect = "count"

    def __init__(self, num_ranks, num_experts):
        self.R, self.E = num_ranks, num_experts

    def dispatch(self, x, idx, w):
        T = x.shape[0]
        in_rank = _ranks_of_tokens(idx, self.E, self.R)
        slot = jnp.where(in_rank, jnp.cumsum(in_rank, axis=0) - 1, T)  # [T, R], T = not sent
        tok = jnp.full((self.R, T + 1), T).at[jnp.arange(self.R)[None], slot].set(
            jnp.arange(T)[:, None])[:, :T]  # [R, T] token in each send slot (T = padding)
        blocks = jnp.take(x, tok, axis=0, mode="fill", fill_value=0)
        recv = lax.all_to_all(blocks, AX, 0, 0, tiled=True)
        return recv.reshape(self.R * T, -1), slot, ()

    def combine(self, y, slot):
        back = lax.all_to_all(y.reshape(self.R, slot.shape[0], -1), AX, 0, 0, tiled=True)
        return _sum_pairs(back, slot, y.dtype)


class RaggedA2ARow:
    """MaxText-style: rows sorted by destination rank, lax.ragged_all_to_all both ways."""

    expect = "count"

    def __init__(self, num_ranks, num_experts, num_topk, platform_name):
        if platform_name == "cpu":
            raise NotImplementedError("lax.ragged_all_to_all is not implemented on XLA:CPU")
        self.R, self.E, self.K = num_ranks, num_experts, num_topk

    def dispatch(self, x, idx, w):
        T, R = x.shape[0], self.R
        m = T * min(self.K, R)  # send rows: a token goes to at most min(K, R) ranks
        in_rank = _ranks_of_tokens(idx, self.E, R)
        key = jnp.where(in_rank, jnp.arange(R)[None], R).reshape(-1)  # pair (t, d) at t*R + d
        order = jnp.argsort(key, stable=True)[:m]  # pairs by destination, then token
        send = jnp.take(x, order // R, axis=0)
        pos = jnp.full((T * R,), m).at[order].set(jnp.arange(m)).reshape(T, R)
        pos = jnp.where(in_rank, pos, m)  # [T, R] send row of each pair, m = none
        send_sizes = jnp.sum(in_rank, axis=0, dtype=jnp.int32)
        in_off = _excl_cumsum(send_sizes)
        recv_sizes = lax.all_to_all(send_sizes, AX, 0, 0, tiled=True)
        recv_off = _excl_cumsum(recv_sizes)  # where source s's rows start here
        out_off = lax.all_to_all(recv_off, AX, 0, 0, tiled=True)  # where mine land on rank d
        back_off = lax.all_to_all(in_off, AX, 0, 0, tiled=True)  # for combine
        recv = lax.ragged_all_to_all(send, jnp.zeros((R * T, x.shape[1]), x.dtype), in_off,
                                     send_sizes, out_off, recv_sizes, axis_name=AX)
        return recv, (pos, recv_off, recv_sizes, back_off, send_sizes), ()

    def combine(self, y, h):
        pos, recv_off, recv_sizes, back_off, send_sizes = h
        m = pos.shape[0] * min(self.K, self.R)
        back = lax.ragged_all_to_all(y, jnp.zeros((m, y.shape[1]), y.dtype), recv_off,
                                     recv_sizes, back_off, send_sizes, axis_name=AX)
        return _sum_pairs([back] * self.R, pos, y.dtype)


# ------------------------------------------------------------------------------ programs
def _zero_from(a):
    """An int32 zero that XLA cannot prove is zero (NaN != NaN), computed from `a`."""
    v = a.reshape(-1)[0].astype(jnp.float32)
    return (v != v).astype(jnp.int32)


_as = lax.bitcast_convert_type  # same-width reinterpretation, free


def _bits(a):
    return _as(a, jnp.dtype(f"uint{8 * a.dtype.itemsize}"))


def _touch(bits, z):
    """bits, with [0, 0] made to depend on z: a one-element in-place update. Done on the integer
    view, as XLA:CPU would widen a bf16 array to f32 (a full copy) to update it."""
    corner = jnp.where(z == 0, bits[:1, :1], jnp.zeros((1, 1), bits.dtype))
    return lax.dynamic_update_slice(bits, corner, (0, 0))


def build_programs(row, mesh, inner, unroll=False):
    """jit(shard_map) programs: one dispatch / combine, and `inner` chained ones in a loop."""
    def sm(f):  # every output leaf gets >= 1 dim so out_specs P(AX) applies to it
        g = lambda *a: jax.tree.map(jnp.atleast_1d, f(*a))
        return jax.jit(jax.shard_map(g, mesh=mesh, in_specs=P(AX), out_specs=P(AX)))

    def loop(body, init):  # call 1 is peeled (its output initialises the carry)
        return lax.fori_loop(1, inner, body, body(0, init), unroll=unroll)

    # Each body makes one call, then perturbs every input it read with a zero taken from its
    # output (after the call, so they are updated in place). x, w, y are carried as their bits.
    def disp_loop(x, idx, w):
        def body(_, c):
            xb, idx, wb, _ = c
            out = row.dispatch(_as(xb, x.dtype), idx, _as(wb, w.dtype))
            z = _zero_from(out[0])
            return _touch(xb, z), idx + z, _touch(wb, z), out

        return loop(body, (_bits(x), idx, _bits(w), None))

    def comb_loop(y, h):
        def body(_, c):
            yb, h, _ = c
            out = row.combine(_as(yb, y.dtype), h)
            z = _zero_from(out)
            return _touch(yb, z), jax.tree.map(lambda a: a + z.astype(a.dtype), h), out

        return loop(body, (_bits(y), h, None))

    return {"disp_once": sm(row.dispatch), "comb_once": sm(row.combine),
            "disp_loop": sm(disp_loop), "comb_loop": sm(comb_loop)}


def sample_slope(short, long, args, inner, iters, warmup):
    """Device time per call: (time of a program of 2*inner chained calls - time of one of inner)
    / inner, the two timed alternately. The program's own launch and completion cost (hundreds
    of microseconds for a multi-GPU program) cancels; dividing one program's time by its calls
    would charge each call a share of it."""
    for _ in range(warmup):
        jax.block_until_ready(short(*args))
        jax.block_until_ready(long(*args))
    per_call = []
    for _ in range(iters):
        t = []
        for fn in (short, long):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            t.append(time.perf_counter() - t0)
        per_call.append((t[1] - t[0]) / inner)
    return np.array(per_call) * 1e6  # us


def sample_times(fn, args, iters, warmup):
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return np.array(times) * 1e6  # us


# ------------------------------------------------------------------------------ inputs, checks
def make_inputs(mesh, seed, R, T, H, K, E):
    sh = NamedSharding(mesh, P(AX))
    n = R * T

    @jax.jit
    def gen(key):
        kx, ks, ke, kw = jax.random.split(key, 4)
        mag = jax.random.uniform(kx, (n, H), minval=0.25, maxval=2.0)  # never zero
        x = jnp.where(jax.random.bernoulli(ks, 0.5, (n, H)), mag, -mag).astype(DTYPE)
        idx = lax.top_k(jax.random.uniform(ke, (n, E)), K)[1].astype(jnp.int32)
        w = jax.random.uniform(kw, (n, K), minval=0.1, maxval=1.0)
        return tuple(jax.lax.with_sharding_constraint(a, sh) for a in (x, idx, w))

    return gen(jax.random.key(seed))


def pair_counts(idx, R, T, E):
    """Per destination rank: (token, rank) pairs received, and those from other ranks."""
    dst = idx // (E // R)
    in_rank = np.zeros((R * T, R), bool)
    in_rank[np.arange(R * T)[:, None], dst] = True
    src = np.arange(R * T) // T
    return in_rank.sum(0), np.array([(in_rank[:, r] & (src != r)).sum() for r in range(R)])


def check_row(got, x, idx, w, kind, R, E):
    """Max |error| / tolerance of combine(dispatch(x)) on the sampled rows (<= 1 passes).

    Token-style rows sum exact copies (x * number of destination ranks): must match exactly.
    The expert layout sums w_k * x in float32 in its own order: 2 bf16 ulps (2^-6 * magnitude).
    """
    x = np.asarray(x, np.float32)
    if kind == "weighted":
        wsum = w.sum(1, keepdims=True)  # w > 0
        exp, mag, rel = x * wsum, np.abs(x) * wsum, 2.0**-6
    else:
        nr = np.array([len(set(r)) for r in (idx // (E // R)).tolist()], np.float32)[:, None]
        exp, mag, rel = x * nr, np.abs(x) * nr, 2.0**-20
    exp = exp.astype(DTYPE).astype(np.float32)  # the ops cast their float32 sums to bf16
    err = np.abs(np.asarray(got, np.float32) - exp) / (rel * mag + 1e-30)
    return float(err.max())


# ------------------------------------------------------------------------------ one config
def time_row(row, mesh, args, x, idx, w, check, res):
    """Checks the row once, then times dispatch and combine into res["ops"]."""
    prog = build_programs(row, mesh, 1, args.unroll)
    recv, h, _ = prog["disp_once"](x, idx, w)
    res["check_err"] = check(prog["comb_once"](recv, h), row.expect)
    if not res["check_err"] <= 1.0:
        res["note"] = f"CHECK FAILED (err {res['check_err']:.3g} x tolerance): not timed"
        return
    for op, loop, once, a in [("dispatch", "disp_loop", "disp_once", (x, idx, w)),
                              ("combine", "comb_loop", "comb_once", (recv, h))]:
        wall = sample_times(prog[once], a, args.iters, args.warmup)
        # Slow rows (ragged_a2a: ~20 ms a call) get fewer chained calls, so a run stays minutes.
        inner = int(np.clip(args.max_program_ms * 1e3 / np.median(wall), 2, args.inner))
        short, long = (build_programs(row, mesh, n, args.unroll)[loop] for n in (inner, 2 * inner))
        dev = sample_slope(short, long, a, inner, args.iters, args.warmup)
        p10, p50, p90 = np.percentile(dev, [10, 50, 90])
        res["ops"][op] = dict(
            median_us=p50, p10_us=p10, p90_us=p90, wall_median_us=np.median(wall), inner=inner,
            logical_gbps=res["logical_bytes"] / p50 / 1e3,  # bytes / us / 1e3 = GB/s
            remote_gbps=res["remote_bytes"] / p50 / 1e3,
            device_us=dev.tolist(), wall_us=wall.tolist())


def run_config(mesh, args, T, seed):
    R, H, K, E = mesh.size, args.hidden, args.topk, args.experts
    x, idx, w = make_inputs(mesh, seed, R, T, H, K, E)
    idx_np = np.asarray(idx)
    pairs, remote = pair_counts(idx_np, R, T, E)
    row_bytes = H * jnp.dtype(DTYPE).itemsize
    byts = dict(logical_bytes=float(pairs.mean() * row_bytes),
                remote_bytes=float(remote.mean() * row_bytes))
    rows = np.sort(np.random.default_rng(seed).choice(R * T, min(R * T, 2048), replace=False))
    x_s, idx_s, w_s = np.asarray(x[rows]), idx_np[rows], np.asarray(w)[rows]
    check = lambda got, kind: check_row(np.asarray(got[rows]), x_s, idx_s, w_s, kind, R, E)

    plat = jax.devices()[0].platform
    # Expert layout: the rows the busiest rank needs (its groups padded), not the R*T*K worst case.
    ep_args = (E, T, H, K, expert_capacity(idx_np, R, T, E))
    makers = [
        ("jax_ep xla token", lambda: JaxEpRow(mesh, "xla", "token", *ep_args)),
        ("jax_ep xla expert", lambda: JaxEpRow(mesh, "xla", "expert", *ep_args)),
        ("jax_ep cuda token", lambda: JaxEpRow(mesh, "cuda", "token", *ep_args)),
        ("jax_ep cuda expert", lambda: JaxEpRow(mesh, "cuda", "expert", *ep_args,
                                                num_recv_sms=args.num_recv_sms)),
        ("ragged_a2a (MaxText)", lambda: RaggedA2ARow(R, E, K, plat)),
        ("padded_a2a (T/dest)", lambda: PaddedA2ARow(R, E)),
        ("nvlink_copy (ceiling)", None),
    ]
    results = []
    for name, make in makers:
        if args.rows and not any(s in name for s in args.rows):
            continue
        print(f"  [{name}]", flush=True)
        res = dict(row=name, ops={}, note="", **byts)
        results.append(res)
        try:
            if make is None:
                nvlink_row(mesh, res, args, T)
            else:
                row = make()
                try:
                    time_row(row, mesh, args, x, idx, w, check, res)
                finally:
                    if hasattr(row, "buf"):
                        row.buf.close()  # frees a GPU backend's workspace before the next row
        except NotImplementedError as e:
            res["note"] = f"n/a: {e}"
        except Exception as e:  # keep the other rows of a (costly) GPU run
            traceback.print_exc()
            res["note"] = f"ERROR {type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
    cfg = dict(tokens_per_rank=T, hidden=H, topk=K, experts=E, ranks=R, dtype="bfloat16",
               seed=seed, pairs_per_rank=pairs.tolist(), remote_pairs_per_rank=remote.tolist(),
               **byts)
    return {"config": cfg, "rows": results}


def expert_capacity(idx, R, T, E):
    """Receive rows of the expert layout on the busiest rank (groups padded to the alignment)."""
    el = E // R
    ids = idx.reshape(-1)
    ids = ids[(ids >= 0) & (ids < E)]
    per_expert = np.bincount(ids, minlength=E)
    padded = -(-per_expert // EXPERT_ALIGNMENT) * EXPERT_ALIGNMENT
    return int(padded.reshape(R, el).sum(1).max())


def nvlink_row(mesh, res, args, T):
    """Raw copy ceiling: every rank pushes the dispatch's remote bytes to its peers at once, with
    all SMs (our peer-copy kernel: 16-byte stores interleaved over the links), no layout work."""
    if mesh.devices.flat[0].platform != "gpu" or not jax_ep._ffi.HAS_CUDA_EXTENSION:
        raise NotImplementedError("needs GPUs and the CUDA extension")
    from jax_ep import cuda_backend

    R = mesh.size
    per_peer = int(res["remote_bytes"] / max(R - 1, 1)) // 16 * 16
    words = per_peer // 4
    buf = jax_ep.Buffer(mesh, AX, backend="cuda", max_tokens_per_rank=T,
                        hidden=args.hidden, num_topk=args.topk)
    try:
        src = jax.device_put(jnp.arange(R * R * words, dtype=jnp.int32).reshape(R * R, words),
                             jax.sharding.NamedSharding(mesh, P(AX)))

        def program(inner):
            def loop(src):
                body = lambda i, acc: acc + cuda_backend.peer_copy(buf, src)  # noqa: E731
                first = cuda_backend.peer_copy(buf, src)  # peeled: the carry keeps its typing
                return jax.lax.fori_loop(1, inner, body, first, unroll=args.unroll)[None]

            return jax.jit(jax.shard_map(loop, mesh=mesh, in_specs=P(AX), out_specs=P(AX)))

        short, long = program(args.inner), program(2 * args.inner)
        times = sample_slope(short, long, (src,), args.inner, args.iters, args.warmup)
        assert int(np.asarray(long(src)).min()) == 2 * args.inner, "peer copy did not complete"
        t_us = float(np.median(times))
    finally:
        buf.close()
    res["ops"]["copy"] = {"median_us": t_us, "p10_us": float(np.percentile(times, 10)),
                          "p90_us": float(np.percentile(times, 90)),
                          "remote_gbps": per_peer * (R - 1) / t_us / 1e3}


# ------------------------------------------------------------------------------ report
def markdown(report):
    a = report["args"]
    lines = [f"## EP dispatch/combine on {report['num_devices']} x {report['device_kind']}", "",
             "pairs(r) = (token, dest rank) pairs received by rank r (own tokens included); "
             "logical GB/s = mean_r pairs(r) * H * 2 B / t; remote GB/s = same over pairs from "
             "other ranks; combine: same bytes reversed. t = device time per call: median over "
             f"{a['iters']} pairs of programs of n and 2n chained calls "
             f"({'straight-line' if a.get('unroll') else 'in a lax.fori_loop'}), timed "
             "alternately, of (long - short) / n (p10, p90 likewise): the programs' launch cost "
             f"cancels; n = {a['inner']}, fewer (>= 2) where a call's wall time exceeds "
             f"{a['max_program_ms']:g} ms / {a['inner']}; wall = one call per program. check = max |combine(dispatch(x)) - numpy| "
             "/ tolerance on sampled rows, identity experts (exact for token-style rows, "
             "2^-6 * magnitude for the expert layout's weighted sum; <= 1 passes).", "",
             "| config | row | op | device us p50 | p10 | p90 | wall us/call | logical GB/s "
             "| remote GB/s | check | note |", "|" + "---|" * 11]
    fmt = lambda v, f="{:.1f}": "n/a" if v is None else f.format(v)
    for c in report["configs"]:
        cfg = c["config"]
        tag = f"T={cfg['tokens_per_rank']} H={cfg['hidden']} K={cfg['topk']} E={cfg['experts']}"
        for r in c["rows"]:
            err = r.get("check_err")
            chk = "-" if err is None else f"ok ({err:.2f})" if err <= 1 else "FAILED"
            for op, o in (r["ops"] or {"-": {}}).items():
                cells = [o.get(k) for k in ("median_us", "p10_us", "p90_us", "wall_median_us")]
                cells = [fmt(v) for v in cells] + [
                    fmt(o.get(k), "{:.2f}") for k in ("logical_gbps", "remote_gbps")]
                lines.append(f"| {tag} | {r['row']} | {op} | " + " | ".join(cells)
                             + f" | {chk} | {r['note']} |")
    return "\n".join(lines)


def plot(report, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = report["configs"]
    fig, axes = plt.subplots(1, len(configs), figsize=(7 * len(configs), 5), squeeze=False)
    for ax, c in zip(axes[0], configs):
        cfg, rows = c["config"], c["rows"]
        pos = np.arange(len(rows))
        for j, (op, key) in enumerate([("dispatch", "logical_gbps"), ("combine", "logical_gbps"),
                                       ("copy", "remote_gbps")]):
            vals = [r["ops"].get(op, {}).get(key, 0.0) for r in rows]
            ax.bar(pos + (j - 1) * 0.28, vals, 0.28, label=op)
        for i, r in enumerate(rows):
            if not r["ops"]:
                ax.text(i, 0, r["note"].split(":")[0][:12], ha="center", va="bottom",
                        fontsize=8, rotation=90)
        shape = (cfg["tokens_per_rank"], cfg["hidden"], cfg["topk"], cfg["experts"], cfg["ranks"])
        if shape == DEEPEP_REF["shape"] and "H200" in report["device_kind"]:
            for op, ls in (("dispatch", "--"), ("combine", ":")):
                ax.axhline(DEEPEP_REF[op], color="k", ls=ls, lw=1,
                           label=f"DeepEP V1 {op} BF16 (H200 EP4)")
        ax.set_xticks(pos, [r["row"] for r in rows], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("logical GB/s per rank (copy: remote GB/s)")
        ax.set_title(f"T={cfg['tokens_per_rank']} H={cfg['hidden']} top-{cfg['topk']}/"
                     f"{cfg['experts']}, EP{cfg['ranks']}", fontsize=10)
        ax.legend(fontsize=7)
    fig.suptitle(f"{report['num_devices']} x {report['device_kind']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------ main
FULL = dict(tokens=[4096, 128], hidden=7168, topk=8, experts=256, iters=30, warmup=3, inner=20,
            max_program_ms=20)
QUICK = dict(tokens=[32, 8], hidden=256, topk=8, experts=64, iters=30, warmup=2, inner=4,
             max_program_ms=20)
HELP = dict(tokens="tokens per rank, one config each", iters="timed program pairs per op",
            warmup="untimed runs per program",
            inner="chained calls n of the short program (the long one has 2n)",
            max_program_ms="fewer chained calls (>= 2) for rows whose calls would make the short "
                           "program longer than this")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for k, v in FULL.items():
        p.add_argument(f"--{k.replace('_', '-')}", type=type(v) if k != "tokens" else int,
                       nargs="+" if k == "tokens" else None,
                       help=f"{HELP.get(k, k)} (default {v}; --quick: {QUICK[k]})")
    p.add_argument("--rows", nargs="+", help="only rows whose name contains one of these")
    p.add_argument("--seed", type=int, help="input seed (default: fresh random, printed)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results",
                   help="folder for the JSON, Markdown and PNG (default benchmarks/results)")
    p.add_argument("--num-recv-sms", type=int,
                   help="backend cuda: Buffer(num_recv_sms=...) for the expert layout (default: "
                        "the Buffer's)")
    p.add_argument("--unroll", action=argparse.BooleanOptionalAction, default=True,
                   help="chain the calls straight-line (default) or in a lax.fori_loop "
                        "(--no-unroll; on GPUs every iteration then adds a host round trip)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: CPU smoke run")
    args = p.parse_args()
    for k, v in (QUICK if args.quick else FULL).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.seed is None:
        args.seed = int.from_bytes(os.urandom(4), "little") % 2**31
    return args


def main():
    args = parse_args()
    devices = jax.devices()
    mesh = Mesh(np.array(devices), (AX,))
    kind = devices[0].device_kind
    print(f"{len(devices)} x {kind} ({devices[0].platform}), jax {jax.__version__}, "
          f"seed {args.seed}", flush=True)
    report = dict(device_kind=kind, num_devices=len(devices), platform=devices[0].platform,
                  jax=jax.__version__, host=platform.node(), time=time.strftime("%FT%T"),
                  args=dict(vars(args), out=str(args.out)), configs=[])
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"dispatch_{kind.replace(' ', '_')}_x{len(devices)}"
    for i, T in enumerate(args.tokens):
        print(f"config T={T} H={args.hidden} K={args.topk} E={args.experts} EP{len(devices)}",
              flush=True)
        report["configs"].append(run_config(mesh, args, T, args.seed + i))
        Path(f"{stem}.json").write_text(json.dumps(report, indent=1))  # saved per config
    table = markdown(report)
    print("\n" + table)
    Path(f"{stem}.md").write_text(table + "\n")
    plot(report, f"{stem}.png")
    print(f"\nwrote {stem}.{{json,md,png}}")


if __name__ == "__main__":
    main()
