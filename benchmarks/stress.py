#!/usr/bin/env python3
"""Randomized stress: many random configurations against the numpy models of the contract.

    python3 benchmarks/stress.py                              # GPU: EP over all local GPUs
    python3 benchmarks/stress.py --devices 2 --configs 200    # CPU: 2 virtual devices, "xla"
    python3 benchmarks/stress.py --seed S --only I ...        # replay configuration I of seed S
                                                              # (same --configs/--groups/--devices)

Configurations fall into --groups static shape groups (one jitted program each, compiled once;
configuration i belongs to group i % groups), cycling through the families
  normal-{token,expert}-{bf16,fp8}   jax_ep.dispatch + combine vs tests/numpy_model.py; T from
                                     0 (some groups) to odd sizes; bf16 H an odd multiple of 8,
                                     FP8 H a multiple of 128; default or small recv_capacity
                                     (drops); expert alignment 1-8
  ll-{fp8,bf16}-{fused,split}        jax_ep.low_latency vs tests/ll_model.py (M >= T)
Each configuration draws fresh inputs (never zeros) and a routing kind: uniform (distinct
experts, some -1), hot (one expert takes every token, duplicates), sparse (~70% -1), none
(all -1), dup (repeated experts), invalid (ids outside [-1, E)), messy (all of these, and one
expert taking > 1/K of the tokens: low-latency overflow when M = T); low-latency
configurations with EP > 1 mark random ranks failed 30% of the time.

Checked as the tests check: dispatched data, scales, ids, weights and counts bit-exact; normal
combine bit-exact (weights k/128, so every product is exact); low-latency combine bit-exact on
backend "cuda", within 1 bfloat16 ulp on "xla" (FMA contraction). Every mismatch prints the
configuration, the seed and the replay command; the run exits 1 if any configuration failed.
Per-configuration inputs come from (seed, i), so --only I reproduces one exactly.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # never NVLink multicast on the shared GPU hosts
os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)  # only affects the CPU client

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import ll_model  # noqa: E402
import numpy_model as nm  # noqa: E402
from cases import (DTYPES, assert_bits_equal, assert_float_equal, make_routing,  # noqa: E402
                   random_values, split)

import jax_ep  # noqa: E402

AX = "ep"
BF16 = ll_model.BF16
# (family, layout, dtype, capacity) / (family, fp8, mode); groups cycle through these in order
TEMPLATES = [
    ("normal", "token", "bf16", "default"), ("normal", "expert", "bf16", "default"),
    ("ll", True, "fused"), ("ll", False, "split"),
    ("normal", "expert", "fp8", "small"), ("normal", "token", "fp8", "default"),
    ("normal", "expert", "bf16", "small"), ("normal", "token", "bf16", "T0"),
    ("ll", True, "split"), ("normal", "token", "bf16", "small"),
    ("normal", "expert", "fp8", "T0"), ("ll", False, "fused"),
]
NORMAL_T = [1, 2, 3, 5, 7, 13, 31, 33, 61, 100, 127, 257]
LL_T = [1, 2, 3, 5, 7, 13, 31, 64]
ODD_H8 = [1, 3, 5, 9, 17, 25, 33, 65]  # bfloat16 hidden sizes: 8 times these
KINDS = ("uniform", "hot", "sparse", "none", "dup", "invalid", "messy")


def pick(rng, values):
    return values[int(rng.integers(len(values)))]


def draw_group(rng, g, num_ranks):
    """Static shape of group g (a dict, JSON-able)."""
    R, t = num_ranks, TEMPLATES[g % len(TEMPLATES)]
    K = int(rng.integers(1, 9))
    if t[0] == "normal":
        _, layout, dtype, cap = t
        T = 0 if cap == "T0" else pick(rng, NORMAL_T)
        H = 128 * pick(rng, [1, 2, 3, 5]) if dtype == "fp8" else 8 * pick(rng, ODD_H8)
        E = R * pick(rng, [1, 2, 3, 4, 8, 16])
        A = pick(rng, [1, 2, 4, 8]) if layout == "expert" else 1
        C = None
        if cap == "small":
            C = int(rng.integers(1, max(nm.default_capacity(layout, R, T, K, E, A) // 3, 1) + 1))
        return dict(family=f"normal-{layout}-{dtype}", R=R, T=T, H=H, K=K, E=E, layout=layout,
                    A=A, C=C, dtype=dtype)
    _, fp8, mode = t
    T = pick(rng, LL_T)
    H = 128 * pick(rng, [1, 2, 3, 5]) if fp8 else 8 * pick(rng, ODD_H8)
    return dict(family=f"ll-{'fp8' if fp8 else 'bf16'}-{mode}", R=R, T=T,
                M=T + pick(rng, [0, 0, 1, 7]), H=H, K=K, E=R * pick(rng, [1, 2, 3, 4, 6, 8, 16]),
                fp8=fp8, split=mode == "split")


def routing(rng, R, T, K, E, kind):
    """Global [R * T, K] int32 topk_idx of one routing kind (see the module docstring)."""
    distinct = "random" if K <= E else "dup"
    if kind == "messy":
        return ll_model.routing(rng, R, T, K, E, "messy")[0].reshape(R * T, K)
    if kind == "sparse":
        idx = make_routing(rng, R, T, K, E, distinct + "+empty")
        idx[rng.random(idx.shape) < 0.7] = -1
        return idx
    mode = {"uniform": distinct, "hot": "skew", "none": "none", "dup": "dup",
            "invalid": distinct + "+invalid+empty"}[kind]
    return make_routing(rng, R, T, K, E, mode)


# ------------------------------------------------------------------------ normal mode
def normal_program(mesh, buf, g):
    fp8 = g["dtype"] == "fp8"

    def body(a):
        x = (a["x"], a["scales"]) if fp8 else a["x"]
        res = jax_ep.dispatch(buf, x, a["idx"], a["w"], num_experts=g["E"], layout=g["layout"],
                              recv_capacity=g["C"], expert_alignment=g["A"])
        out = dict(recv_x=res.recv_x, recv_topk_idx=res.recv_topk_idx,
                   recv_topk_weights=res.recv_topk_weights,
                   num_tokens_per_expert=res.num_tokens_per_expert,
                   counts=jnp.stack([res.num_recv_rows, res.num_dropped, res.num_invalid])[None],
                   combine=jax_ep.combine(buf, a["y"], res.handle))
        if fp8:
            out["recv_x_scales"] = res.recv_x_scales
        if g["layout"] == "expert":
            out["group_sizes"] = res.group_sizes
        return out

    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P(AX), out_specs=P(AX)))


def normal_inputs(rng, g, kind):
    R, T, H, K, E = g["R"], g["T"], g["H"], g["K"], g["E"]
    fp8 = g["dtype"] == "fp8"
    a = dict(x=random_values(rng, (R * T, H), DTYPES[g["dtype"]]),
             idx=routing(rng, R, T, K, E, kind),
             w=(rng.integers(6, 129, size=(R * T, K)) / 128).astype(np.float32))
    if fp8:
        a["scales"] = rng.uniform(0.01, 10.0, size=(R * T, H // 128)).astype(np.float32)
    model = nm.dispatch(split(a["x"], R), split(a["idx"], R), split(a["w"], R), num_experts=E,
                        layout=g["layout"], recv_capacity=g["C"], expert_alignment=g["A"],
                        scales=split(a.get("scales"), R))
    cap = model[0].capacity
    a["y"] = random_values(rng, (R * cap, H), DTYPES["bf16" if fp8 else g["dtype"]],
                           mantissa_bits=16)
    return a, model


def normal_check(out, a, model, g):
    R, T, E = g["R"], g["T"], g["E"]
    cap, L = model[0].capacity, E // R
    for r in range(R):
        m, rows, tag = model[r], slice(r * cap, (r + 1) * cap), f"rank {r}"
        assert_bits_equal(out["recv_x"][rows], m.recv_x, f"recv_x {tag}")
        if g["dtype"] == "fp8":
            assert_bits_equal(out["recv_x_scales"][rows], m.recv_x_scales, f"recv_x_scales {tag}")
        assert_bits_equal(out["recv_topk_idx"][rows], m.recv_topk_idx, f"recv_topk_idx {tag}")
        assert_bits_equal(out["recv_topk_weights"][rows], m.recv_topk_weights,
                          f"recv_topk_weights {tag}")
        if g["layout"] == "expert":
            assert_bits_equal(out["group_sizes"][r * L:(r + 1) * L], m.group_sizes,
                              f"group_sizes {tag}")
        assert_bits_equal(out["num_tokens_per_expert"][r * L:(r + 1) * L],
                          m.num_tokens_per_expert, f"num_tokens_per_expert {tag}")
        want = np.array([m.num_recv_rows, m.num_dropped, m.num_invalid], np.int32)
        assert_bits_equal(out["counts"][r], want, f"num_recv_rows/num_dropped/num_invalid {tag}")
    want = nm.combine(split(a["y"], R), model, layout=g["layout"], tokens=T)
    assert_float_equal(out["combine"], np.concatenate(want), "combine")


# ------------------------------------------------------------------------ low-latency mode
def ll_program(mesh, buf, g):
    body = ll_model.program(buf, g["E"], g["fp8"], g["split"])
    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(AX), P(AX), P(AX), P()),
                                 out_specs=(P(AX), P(AX), P(AX))))


def ll_inputs(rng, g, kind):
    R, T, H, K, E = g["R"], g["T"], g["H"], g["K"], g["E"]
    x = random_values(rng, (R * T, H), np.float32) * rng.uniform(0.01, 30.0, (R * T, 1))
    failed = np.zeros(R, bool)
    if R > 1 and rng.random() < 0.3:
        failed = rng.random(R) < 0.4
    a = dict(x=x.astype(BF16), idx=routing(rng, R, T, K, E, kind),
             w=(rng.random((R * T, K)) + 0.1).astype(np.float32), failed=failed.astype(np.int32))
    want = ll_model.np_dispatch(a["x"].reshape(R, T, H), a["idx"].reshape(R, T, K),
                                a["w"].reshape(R, T, K), E, g["M"], g["fp8"], failed)
    return a, want


def ll_check(out, a, want, g, exact):
    got, comb, missing = out
    R, T, K = g["R"], g["T"], g["K"]
    for d in range(R):
        ll_model.assert_dispatch_rank({k: v[d] for k, v in got.items()}, want[d], g["fp8"],
                                      f"rank {d}")
    want_out, want_missing = ll_model.np_combine(got["y"], want, a["idx"].reshape(R, T, K), g["E"],
                                                 a["failed"].astype(bool))
    np.testing.assert_array_equal(missing.reshape(R, T), want_missing, err_msg="num_missing")
    ll_model.assert_combine(comb.reshape(R, T, -1), want_out, exact, "combine")


# ------------------------------------------------------------------------ driver
def run_group(mesh, g, indices, args, failures):
    """Runs configurations `indices` of group g; returns (configurations per routing kind, per
    edge case, first-call seconds, seconds)."""
    ll = g["family"].startswith("ll")
    if ll:
        buf = jax_ep.Buffer(mesh, AX, backend=args.backend, ll_max_tokens_per_rank=g["M"],
                            hidden=g["H"], num_topk=g["K"])
        fn = ll_program(mesh, buf, g)
    else:
        buf = jax_ep.Buffer(mesh, AX, backend=args.backend, max_tokens_per_rank=max(g["T"], 1),
                            hidden=g["H"], num_topk=g["K"])
        fn = normal_program(mesh, buf, g)
    g["backend"] = buf.backend
    kinds, cover, first_s, t0 = {}, {}, 0.0, time.perf_counter()
    with buf:
        for n, i in enumerate(indices):
            rng = np.random.default_rng([args.seed, i])
            kind = pick(rng, KINDS)
            kinds[kind] = kinds.get(kind, 0) + 1
            cfg = dict(g, index=i, kind=kind)
            try:
                a, want = (ll_inputs if ll else normal_inputs)(rng, g, kind)
                if ll:
                    cfg["failed"] = a["failed"].tolist()
                    call = lambda: fn(a["x"], a["idx"], a["w"], a["failed"])  # noqa: E731
                else:
                    call = lambda: fn(a)  # noqa: E731
                t = time.perf_counter()
                out = jax.device_get(call())
                if n == 0:
                    first_s = time.perf_counter() - t
                    again = jax.device_get(call())  # deterministic run to run
                    for x, y in zip(specified(out, ll), specified(again, ll)):
                        assert_bits_equal(y, x, "run-to-run")
                for name, hit in coverage(a, want, ll).items():
                    cover[name] = cover.get(name, 0) + int(hit)
                if ll:
                    ll_check(out, a, want, g, buf.backend == "cuda")
                else:
                    normal_check(out, a, want, g)
            except Exception as e:  # noqa: BLE001 (a mismatch or an error: both are failures)
                report_failure(cfg, e, args, failures)
                if args.fail_fast:
                    break
    return kinds, cover, first_s, time.perf_counter() - t0


def specified(out, ll):
    """The outputs the contract fixes (low-latency receive rows past recv_count, and so the
    expert outputs y, are unspecified on backend "cuda")."""
    if not ll:
        return jax.tree.leaves(out)
    got, comb, missing = out
    return [comb, missing] + [v for k, v in sorted(got.items())
                              if k not in ("recv_x", "recv_x_scales", "y")]


def coverage(a, want, ll):
    """Which edge cases a configuration reaches (from the model): rows dropped, invalid ids,
    no routed entry at all, failed ranks."""
    if ll:
        return dict(dropped=sum(int(w["num_dropped"]) for w in want) > 0,
                    unrouted=bool((a["idx"] < 0).all()), failed=bool(a["failed"].any()))
    return dict(dropped=sum(m.num_dropped for m in want) > 0,
                invalid=sum(m.num_invalid for m in want) > 0,
                unrouted=a["idx"].size > 0 and bool((a["idx"] == -1).all()))


def report_failure(cfg, e, args, failures):
    msg = f"{type(e).__name__}: {e}"
    failures.append(dict(config=cfg, seed=args.seed, error=msg[:4000]))
    replay = (f"python3 benchmarks/stress.py --seed {args.seed} --configs {args.configs} "
              f"--groups {args.groups} --devices {cfg['R']} --backend {args.backend} "
              f"--only {cfg['index']}")
    print(f"\nFAIL configuration {cfg['index']} (seed {args.seed}): {json.dumps(cfg)}\n"
          f"  replay: {replay}\n  {msg[:3000]}\n", flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", type=int, default=1000)
    p.add_argument("--groups", type=int, default=36, help="static shape groups (compilations)")
    p.add_argument("--devices", type=int, default=None, help="EP ranks (default: all devices)")
    p.add_argument("--backend", default="auto", choices=("auto", "xla", "cuda"))
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--only", type=int, default=None, help="run configuration ONLY alone")
    p.add_argument("--fail-fast", action="store_true")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args(argv)
    args.groups = max(1, min(args.groups, args.configs))
    if args.only is not None and not 0 <= args.only < args.configs:
        p.error(f"--only must be in [0, --configs={args.configs})")
    if args.seed is None:
        args.seed = int.from_bytes(os.urandom(4), "little")
    return args


def main(argv=None):
    args = parse_args(argv)
    devices = jax.devices()[:args.devices] if args.devices else jax.devices()
    mesh = Mesh(np.array(devices), (AX,))
    kind = devices[0].device_kind
    print(f"stress: {len(devices)} x {kind} ({devices[0].platform}), jax {jax.__version__}, "
          f"seed {args.seed}, {args.configs} configurations in {args.groups} groups", flush=True)
    grng = np.random.default_rng(args.seed)
    groups = [draw_group(grng, g, len(devices)) for g in range(args.groups)]
    wanted = range(args.configs) if args.only is None else [args.only]
    failures, fams, t_all = [], {}, time.perf_counter()
    for gi, g in enumerate(groups):
        indices = [i for i in wanted if i % args.groups == gi]
        if not indices:
            continue
        before = len(failures)
        kinds, cover, first_s, secs = run_group(mesh, g, indices, args, failures)
        failed = len(failures) - before
        f = fams.setdefault(g["family"], dict(groups=0, configs=0, failed=0, first_call_s=0.0,
                                              seconds=0.0, kinds={}, cover={}))
        f["groups"] += 1
        f["configs"] += len(indices)
        f["failed"] += failed
        f["first_call_s"] += first_s
        f["seconds"] += secs
        for key, counts in (("kinds", kinds), ("cover", cover)):
            for k, v in counts.items():
                f[key][k] = f[key].get(k, 0) + v
        shape = {k: v for k, v in g.items() if k not in ("family", "backend")}
        print(f"group {gi:>2} {g['family']:<20} {shape}: {len(indices)} configs, {failed} failed, "
              f"{secs:.1f} s", flush=True)
        if failures and args.fail_fast:
            break
    total = time.perf_counter() - t_all
    print(f"\n{'family':<22}{'groups':>7}{'configs':>8}{'passed':>7}{'failed':>7}"
          f"{'1st call s':>11}{'seconds':>9}  configurations reaching an edge case")
    for name in sorted(fams):
        f = fams[name]
        cover = ", ".join(f"{k} {v}" for k, v in sorted(f["cover"].items()))
        print(f"{name:<22}{f['groups']:>7}{f['configs']:>8}{f['configs'] - f['failed']:>7}"
              f"{f['failed']:>7}{f['first_call_s']:>11.1f}{f['seconds']:>9.1f}  {cover}")
    n = sum(f["configs"] for f in fams.values())
    print(f"{'total':<22}{sum(f['groups'] for f in fams.values()):>7}{n:>8}"
          f"{n - len(failures):>7}{len(failures):>7}{'':>11}{total:>9.1f}")
    report = dict(device_kind=kind, num_devices=len(devices), platform=devices[0].platform,
                  jax=jax.__version__, time=time.strftime("%FT%T"), seed=args.seed,
                  backend=groups[0].get("backend"), seconds=round(total, 2), families=fams,
                  groups=groups, failures=failures, ok=not failures,
                  args={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()})
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"stress_{kind.replace(' ', '_')}_x{len(devices)}.json"
    path.write_text(json.dumps(report, indent=1, default=str))
    print(f"wrote {path}\nstress: " + (f"FAILED ({len(failures)} configurations; seed "
                                       f"{args.seed})" if failures else "passed"))
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
