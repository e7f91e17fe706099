#!/usr/bin/env python3
"""Low-latency (decode) dispatch/combine benchmark: jax_ep.low_latency beside the alternatives.

    python benchmarks/bench_low_latency.py --quick   # CPU smoke run (8 virtual CPU devices)
    python benchmarks/bench_low_latency.py           # GPU: EP over all local GPUs

Config (DeepEP's low-latency test): T=128 tokens per rank, hidden 7168, top-8 of 288 experts
(uniform routing: K distinct experts per token), FP8 dispatch (e4m3 + per-128-channel scales),
BF16 combine. Rows:
  jax_ep LL fused      jax_ep.low_latency.dispatch / combine: ONE custom call each (send and
                       receive kernels back to back)
  jax_ep LL split      dispatch_send -> dispatch_recv (two custom calls each, as a program that
                       overlaps them with compute runs them); split - fused = what the split costs
  jax_ep LL bf16       the split ops with a bfloat16 dispatch
  jax_ep LL xla        the reference backend "xla" of the same ops (lax.all_to_all based)
  jax_ep normal        jax_ep.dispatch / combine (backend "cuda", expert layout, bfloat16) at 128
                       tokens: the throughput kernels
  padded_a2a           lax.all_to_all of [R, T, H] bfloat16 blocks (T rows per destination)
  nvlink_copy          raw peer-copy ceiling of the dispatch's remote bytes (R > 1 only)
Modes: "stream" (XLA's default) and "graph": the same programs compiled with XLA's CUDA graphs
(command buffers) for fusions and custom calls (--xla_gpu_enable_command_buffer=FUSION,
CUSTOM_CALL --xla_gpu_graph_min_graph_size=1), in a child process, jax_ep's LL rows only;
"jax_ep in graph" counts the jax_ep kernel launches per call that a CUDA graph launch made
(CUPTI, see profile_ll.kernel_table): what shows the capture.

Bytes (DeepEP's metric, per rank, averaged): the LL ops move one row per (token, expert) pair:
dispatch H + H/128 * 4 bytes (FP8 + scales) or 2H (bf16), combine 2H; the normal kernels and
padded_a2a one row per (token, destination rank) pair, 2H bytes. logical GB/s = received pairs
(own rank included) * row bytes / t; remote GB/s = same over pairs from other ranks.
Timing (GPU): kernel us = CUPTI (torch.profiler) device time of a program of the op alone, over
--kernel-runs calls after the warm-up: per kernel name, launches per call x median duration,
summed (DeepEP's bench_kineto metric; the figure the acceptance targets name). chain us: n and
2n calls chained straight-line in one jitted program; call i+1's inputs pass through
lax.optimization_barrier together with call i's outputs (an ordering, no work: every call waits
for the previous one and none is merged or dropped); the two programs are timed alternately,
--iters pairs after --warmup, per call = (long - short) / n: median, p10, p90 (host clocks: at a
few us per call the spread is of the order of the figure). wall = one call per program. Every
row is checked first (identity experts: combine(dispatch(x)) against x * sum_k w_k; FP8 rows
within their quantization step) and is not timed if wrong.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

from graph_flags import GRAPH_FLAGS  # this script's folder (imports nothing)
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # never NVLink multicast on the shared GPU hosts
os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
# The graph-mode child runs beside this process on the same GPU: take memory as needed.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
if "--mode=graph" in sys.argv:  # before jax starts: XLA reads its flags once
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + GRAPH_FLAGS).strip()

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402
from jax.sharding import Mesh  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_dispatch as bd  # noqa: E402
import profile_ll  # noqa: E402

import jax_ep  # noqa: E402
from jax_ep import low_latency as ll  # noqa: E402

AX = bd.AX
DEEPEP_LL = {"dispatch": 33.6, "combine": 55.3}  # us, DeepEP V1 LL on 4x H200 (shared/GPU.md)


# ------------------------------------------------------------------------------ rows
class LLRow:
    """jax_ep.low_latency; dispatch(x, idx, w) -> (recv rows, handle, rest), combine(y, handle)
    with y [L * R * M, H] bfloat16 (reshaped, free, to [L, R * M, H])."""

    def __init__(self, mesh, backend, tokens, hidden, topk, num_experts, fp8, split):
        try:
            self.buf = jax_ep.Buffer(mesh, AX, backend=backend, ll_max_tokens_per_rank=tokens,
                                     hidden=hidden, num_topk=topk)
        except ValueError as e:
            raise NotImplementedError(str(e)) from None
        self.E, self.fp8, self.split = num_experts, fp8, split
        self.row_bytes = hidden + hidden // 128 * 4 if fp8 else 2 * hidden
        self.combine_row_bytes = 2 * hidden
        self.per_expert = True  # one row per (token, expert) pair
        self.pure = backend != "cuda"  # backend "cuda": side-effecting custom calls

    def dispatch(self, x, idx, w):
        kw = dict(num_experts=self.E, use_fp8=self.fp8)
        if self.split:
            res = ll.dispatch_recv(self.buf, ll.dispatch_send(self.buf, x, idx, w, **kw))
        else:
            res = ll.dispatch(self.buf, x, idx, w, **kw)
        rest = (res.recv_x_scales, res.recv_count, res.recv_src, res.num_dropped)
        return res.recv_x, res.handle, rest

    def combine(self, y, h):
        cfg = h.config
        y = y.reshape(cfg.num_local_experts, cfg.expert_capacity, cfg.hidden)
        if self.split:
            return ll.combine_recv(self.buf, ll.combine_send(self.buf, y, h)).out
        return ll.combine(self.buf, y, h).out

    def identity_y(self, recv, rest):
        """Identity experts: the dispatched rows, dequantized, as combine's y."""
        rows = recv.astype(jnp.float32)
        if self.fp8:
            rows = rows * jnp.repeat(rest[0], 128, axis=-1)
        return rows.astype(jnp.bfloat16).reshape(-1, rows.shape[-1])


class PairRow:
    """Rows with one row per (token, destination rank) pair, from bench_dispatch."""

    per_expert = False
    pure = True

    def __init__(self, inner, hidden):
        self.inner, self.buf = inner, getattr(inner, "buf", None)
        self.expect = inner.expect
        self.row_bytes = self.combine_row_bytes = 2 * hidden

    def dispatch(self, x, idx, w):
        return self.inner.dispatch(x, idx, w)

    def combine(self, y, h):
        return self.inner.combine(y, h)

    def identity_y(self, recv, rest):
        return recv


# ------------------------------------------------------------------------------ programs
def chain(op, n, pure=True):
    """op(*args) n times in a row. Call i+1's args pass through an optimization_barrier with
    call i's outputs (the order, no work), and every float/int arg gets a zero that XLA cannot
    fold taken from call i's output (bench_dispatch._zero_from): pure ops (all_to_all, the
    normal kernels) are then neither merged nor dropped as dead code."""
    def perturb(a, z):
        if a.ndim == 2 and jnp.issubdtype(a.dtype, jnp.floating) and a.dtype.itemsize in (2, 4):
            return bd._as(bd._touch(bd._bits(a), z), a.dtype)
        if jnp.issubdtype(a.dtype, jnp.integer):
            return a + z.astype(a.dtype)
        return a

    def prog(*args):
        out = op(*args)
        for _ in range(n - 1):
            args, _ = lax.optimization_barrier((args, out))
            if pure:  # side-effecting calls (LL) are never merged or dropped: no copies
                z = bd._zero_from(jax.tree.leaves(out)[0])
                args = jax.tree.map(lambda a: perturb(a, z), args)
            out = op(*args)
        return out  # the last output only (earlier ones feed the next call)

    return prog


def jit_shard(fn, mesh):
    g = lambda *a: jax.tree.map(jnp.atleast_1d, fn(*a))  # noqa: E731  (P(AX) needs >= 1 dim)
    return jax.jit(jax.shard_map(g, mesh=mesh, in_specs=P(AX), out_specs=P(AX)))


def headline_us(o):
    """An op's time per call: its CUPTI kernel time where measured (GPU), else the chain slope."""
    return o.get("kernel_us", o.get("median_us"))


def kernel_time(fn, args, runs):
    """CUPTI device time of one call of fn(*args) (a program of one op): over `runs` calls, per
    kernel name, launches per call x median duration, summed over the names (DeepEP's kineto
    metric); the launches per call, all and jax_ep's, and how many of jax_ep's a CUDA graph
    launch made (profile_ll.kernel_table; XLA's own kernels may launch through calls kineto
    does not record, so only ours are counted). GPU only."""
    per, in_graph, _, _ = profile_ll.profile_kernels(fn, args, runs)
    ours = [k for k in per if profile_ll.is_ours(k)]
    return dict(kernel_us=float(sum(len(v) * np.median(v) for v in per.values()) / runs),
                kernels=sum(len(v) for v in per.values()) / runs,
                ours=sum(len(per[k]) for k in ours) / runs,
                ours_in_graphs=sum(in_graph[k] for k in ours) / runs,
                kernel_names=sorted(per))


# ------------------------------------------------------------------------------ one row
def check_row(row, mesh, x, idx, w):
    """Max error / tolerance of combine(dispatch(x)) with identity experts (<= 1 passes)."""
    def once(x, idx, w):
        recv, h, rest = row.dispatch(x, idx, w)
        return row.combine(row.identity_y(recv, rest), h)

    got = np.asarray(jit_shard(once, mesh)(x, idx, w), np.float32)
    xf, wn = np.asarray(x, np.float32), np.asarray(w)
    if getattr(row, "expect", "weighted") == "weighted":  # sum_k w_k * x, rounded to bf16
        scale = wn.sum(1, keepdims=True)
        fp8 = getattr(row, "fp8", False)
        # FP8: each element within half an e4m3 step (2^-4 relative) of its group's amax scale
        amax = np.repeat(np.abs(xf).reshape(len(xf), -1, 128).max(-1), 128, axis=1)
        tol = scale * ((2.0**-4 * np.maximum(np.abs(xf), amax * 2.0**-6) if fp8 else 0)
                       + 2.0**-6 * np.abs(xf)) + 1e-30
        want = xf * scale
    else:
        nr = np.array([len(set(r)) for r in (np.asarray(idx) // (row_E(row, mesh))).tolist()],
                      np.float32)[:, None]
        want, tol = xf * nr, 2.0**-7 * np.abs(xf) * nr + 1e-30
    return float((np.abs(got - want) / tol).max())


def row_E(row, mesh):
    return row.inner.E // mesh.size


def time_row(row, mesh, args, x, idx, w, res):
    res["check_err"] = check_row(row, mesh, x, idx, w)
    if not res["check_err"] <= 1.0:
        res["note"] = f"CHECK FAILED (err {res['check_err']:.3g} x tolerance): not timed"
        return
    recv, h, rest = jit_shard(lambda *a: row.dispatch(*a), mesh)(x, idx, w)
    y = jit_shard(lambda r, s: row.identity_y(r, s), mesh)(recv, rest)
    for op, fn, a in [("dispatch", row.dispatch, (x, idx, w)), ("combine", row.combine, (y, h))]:
        once = jit_shard(fn, mesh)
        wall = bd.sample_times(once, a, args.iters, args.warmup)
        short, long = (jit_shard(chain(fn, k, row.pure), mesh)
                       for k in (args.inner, 2 * args.inner))
        dev = bd.sample_slope(short, long, a, args.inner, args.iters, args.warmup)
        p10, p50, p90 = np.percentile(dev, [10, 50, 90])
        o = dict(median_us=p50, p10_us=p10, p90_us=p90, wall_median_us=float(np.median(wall)),
                 inner=args.inner, device_us=dev.tolist())
        if mesh.devices.flat[0].platform == "gpu":
            o.update(kernel_time(once, a, args.kernel_runs))
        t = headline_us(o)
        row_bytes = row.row_bytes if op == "dispatch" else row.combine_row_bytes
        for key, pairs in (("logical_gbps", res["pairs"]), ("remote_gbps", res["remote_pairs"])):
            o[key] = pairs * row_bytes / t / 1e3
        res["ops"][op] = o


def pair_stats(idx, R, T, E):
    """Per rank: received (token, expert) pairs and (token, rank) pairs, all and remote only."""
    idx = np.asarray(idx).reshape(R * T, -1)
    src = np.arange(R * T) // T
    dst = idx // (E // R)
    expert_pairs = np.array([(dst == r).sum() for r in range(R)])
    expert_remote = np.array([((dst == r) & (src[:, None] != r)).sum() for r in range(R)])
    rank_pairs, rank_remote = bd.pair_counts(idx, R, T, E)
    return dict(expert=(float(expert_pairs.mean()), float(expert_remote.mean())),
                rank=(float(rank_pairs.mean()), float(rank_remote.mean())))


def run(args, mode):
    devices = jax.devices()
    mesh = Mesh(np.array(devices), (AX,))
    R, T, H, K, E = mesh.size, args.tokens, args.hidden, args.topk, args.experts
    x, idx, w = bd.make_inputs(mesh, args.seed, R, T, H, K, E)
    stats = pair_stats(np.asarray(idx), R, T, E)
    on_gpu = devices[0].platform == "gpu"
    backend = "cuda" if on_gpu and jax_ep._ffi.HAS_CUDA_EXTENSION else "xla"
    cap = bd.expert_capacity(np.asarray(idx), R, T, E)
    makers = [
        ("jax_ep LL fused", lambda: LLRow(mesh, backend, T, H, K, E, True, False)),
        ("jax_ep LL split", lambda: LLRow(mesh, backend, T, H, K, E, True, True)),
        ("jax_ep LL bf16 split", lambda: LLRow(mesh, backend, T, H, K, E, False, True)),
        ("jax_ep LL xla", lambda: LLRow(mesh, "xla", T, H, K, E, True, True)),
        ("jax_ep normal expert", lambda: PairRow(bd.JaxEpRow(mesh, "cuda", "expert", E, T, H, K,
                                                             cap), H)),
        ("padded_a2a (T/dest)", lambda: PairRow(bd.PaddedA2ARow(R, E), H)),
        ("nvlink_copy (ceiling)", None),
    ]
    rows = []
    for name, make in makers:
        if args.rows and not any(s in name for s in args.rows):
            continue
        if mode == "graph" and make is not None and ("LL" not in name or "xla" in name):
            continue  # graph mode: the rows of jax_ep's command-buffer compatible custom calls
        print(f"  [{mode}] {name}", flush=True)
        t0 = time.perf_counter()
        res = dict(row=name, mode=mode, ops={}, note="")
        rows.append(res)
        try:
            if make is None:
                if mode == "graph" or R == 1:
                    raise NotImplementedError("no remote bytes at EP1" if R == 1 else "stream only")
                res["remote_bytes"] = stats["rank"][1] * 2 * H
                bd.nvlink_row(mesh, res, args, T)
                continue
            row = make()
            kind = "expert" if row.per_expert else "rank"
            res["pairs"], res["remote_pairs"] = stats[kind]
            try:
                time_row(row, mesh, args, x, idx, w, res)
            finally:
                if row.buf is not None:
                    row.buf.close()
        except NotImplementedError as e:
            res["note"] = f"n/a: {e}"
        except Exception as e:  # keep the other rows of a costly GPU run
            traceback.print_exc()
            res["note"] = f"ERROR {type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
        # each row's lines as soon as it is done: a run cut short keeps what it measured
        print("\n".join(row_lines(res)) + f"\n    {time.perf_counter() - t0:.0f} s", flush=True)
    cfg = dict(tokens_per_rank=T, hidden=H, topk=K, experts=E, ranks=R, seed=args.seed,
               expert_pairs_per_rank=stats["expert"][0], rank_pairs_per_rank=stats["rank"][0])
    return cfg, rows


# ------------------------------------------------------------------------------ report
def row_lines(r):
    """The markdown table lines of one row (one per op)."""
    fmt = lambda v, f="{:.1f}": "n/a" if v is None else f.format(v)  # noqa: E731
    err = r.get("check_err")
    chk = "-" if err is None else f"ok ({err:.2f})" if err <= 1 else "FAILED"
    lines = []
    for op, o in (r["ops"] or {"-": {}}).items():
        ours = None if o.get("ours") is None else f"{o['ours_in_graphs']:g}/{o['ours']:g}"
        cells = [fmt(o.get("kernel_us"), "{:.2f}"), fmt(o.get("kernels"), "{:g}"), ours or "n/a"]
        cells += [fmt(o.get(k)) for k in ("median_us", "p10_us", "p90_us", "wall_median_us")]
        cells += [fmt(o.get(k), "{:.1f}") for k in ("logical_gbps", "remote_gbps")]
        lines.append(f"| {r['mode']} | {r['row']} | {op} | " + " | ".join(cells)
                     + f" | {chk} | {r['note']} |")
    return lines


def markdown(report):
    c = report["config"]
    lines = [f"## Low-latency dispatch/combine on {report['num_devices']} x {report['device_kind']}"
             f": T={c['tokens_per_rank']} H={c['hidden']} top-{c['topk']} of {c['experts']}, "
             f"EP{c['ranks']}", "",
             "kernel us = CUPTI device time of one call (a program of the op alone, "
             f"{report['args']['kernel_runs']} calls: per kernel, launches per call x median "
             "duration, summed; DeepEP's metric); kernels = kernel launches per call; jax_ep in "
             "graph = of jax_ep's launches per call, those a CUDA graph launch made; chain us = "
             "per-call slope of programs of n and 2n chained calls (median, p10, p90 of "
             f"{report['args']['iters']} pairs, n = {report['args']['inner']}: launch gaps "
             "included, host-timed, noisy at a few us); wall = one call per jitted program; GB/s "
             "from kernel us (chain us without CUPTI) per the module docstring (LL rows: per "
             "(token, expert) pair, FP8 row + scales for dispatch; others per (token, rank) pair, "
             "bf16).", "",
             "| mode | row | op | kernel us | kernels | jax_ep in graph | chain us p50 | p10 | p90 "
             "| wall us | logical GB/s | remote GB/s | check | note |", "|" + "---|" * 14]
    for r in report["rows"]:
        lines += row_lines(r)
    split = {}
    for r in report["rows"]:
        if r["row"] in ("jax_ep LL fused", "jax_ep LL split"):
            for op, o in r["ops"].items():
                split.setdefault((r["mode"], op), {})[r["row"]] = headline_us(o)
    if split:
        lines += ["", "| mode | op | fused us | split us | split - fused us |",
                  "|---|---|---|---|---|"]
        for (mode, op), v in split.items():
            if len(v) == 2:
                f_, s_ = v["jax_ep LL fused"], v["jax_ep LL split"]
                lines.append(f"| {mode} | {op} | {f_:.2f} | {s_:.2f} | {s_ - f_:+.2f} |")
    return "\n".join(lines)


def plot(report, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["rows"] if r["ops"]]
    fig, ax = plt.subplots(figsize=(11, 5))
    pos = np.arange(len(rows))
    for j, op in enumerate(("dispatch", "combine", "copy")):
        vals = [headline_us(r["ops"].get(op, {})) or 0.0 for r in rows]
        ax.bar(pos + (j - 1) * 0.28, vals, 0.28, label=op)
    for op, ls in (("dispatch", "--"), ("combine", ":")):
        ax.axhline(DEEPEP_LL[op], color="k", ls=ls, lw=1, label=f"DeepEP V1 LL {op} (4x H200)")
    ax.axhline(10, color="r", lw=1, label="target 10 us")
    ax.set_xticks(pos, [f"{r['row']} [{r['mode']}]" for r in rows], rotation=30, ha="right",
                  fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("device time per call, us (log)")
    c = report["config"]
    ax.set_title(f"{report['num_devices']} x {report['device_kind']}: T={c['tokens_per_rank']} "
                 f"H={c['hidden']} top-{c['topk']}/{c['experts']} EP{c['ranks']}", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------ main
# inner = 20: the chain programs (n and 2n straight-line calls) are compiled per op and per mode,
# and with n = 50 the whole GPU run overran 380 s; CUPTI kernel us is the headline figure anyway.
FULL = dict(tokens=128, hidden=7168, topk=8, experts=288, iters=50, warmup=5, inner=20)
QUICK = dict(tokens=8, hidden=256, topk=4, experts=16, iters=10, warmup=2, inner=4)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for k, v in FULL.items():
        p.add_argument(f"--{k}", type=int, help=f"default {v} (--quick: {QUICK[k]})")
    p.add_argument("--kernel-runs", type=int, default=200,
                   help="calls profiled for the CUPTI kernel time (GPU)")
    p.add_argument("--rows", nargs="+", help="only rows whose name contains one of these")
    p.add_argument("--seed", type=int, help="input seed (default: fresh random, printed)")
    p.add_argument("--mode", choices=["stream", "graph", "both"], default="both",
                   help="both (default): stream here, then graph in a child process (GPU only)")
    p.add_argument("--child-json", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--quick", action="store_true", help="tiny sizes: CPU smoke run")
    args = p.parse_args(argv)
    for k, v in (QUICK if args.quick else FULL).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.seed is None:
        args.seed = int.from_bytes(os.urandom(4), "little") % 2**31
    args.unroll = True  # bench_dispatch.nvlink_row's loop
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    devices = jax.devices()
    kind = devices[0].device_kind
    print(f"{len(devices)} x {kind} ({devices[0].platform}), jax {jax.__version__}, "
          f"seed {args.seed}, mode {args.mode}", flush=True)
    mode = "graph" if args.mode == "graph" else "stream"
    cfg, rows = run(args, mode)
    if args.child_json:
        args.child_json.write_text(json.dumps(dict(config=cfg, rows=rows)))
        return
    if args.mode == "both" and devices[0].platform == "gpu":
        child = args.out / ".graph_child.json"
        args.out.mkdir(parents=True, exist_ok=True)
        base = [a for a in argv if not a.startswith("--mode")]
        cmd = [sys.executable, __file__, *base, "--mode=graph", f"--seed={args.seed}",
               f"--child-json={child}"]
        print("graph mode:", " ".join(cmd), flush=True)
        if subprocess.run(cmd).returncode == 0:
            rows += json.loads(child.read_text())["rows"]
            child.unlink()
        else:
            rows.append(dict(row="graph mode", mode="graph", ops={}, note="ERROR: child failed"))
    report = dict(device_kind=kind, num_devices=len(devices), platform=devices[0].platform,
                  jax=jax.__version__, time=time.strftime("%FT%T"), config=cfg, rows=rows,
                  args={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                  xla_flags=os.environ.get("XLA_FLAGS", ""), graph_flags=GRAPH_FLAGS)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"low_latency_{kind.replace(' ', '_')}_x{len(devices)}"
    Path(f"{stem}.json").write_text(json.dumps(report, indent=1))
    table = markdown(report)
    print("\n" + table)
    Path(f"{stem}.md").write_text(table + "\n")
    plot(report, f"{stem}.png")
    print(f"\nwrote {stem}.{{json,md,png}}")


if __name__ == "__main__":
    main()
