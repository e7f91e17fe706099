#!/usr/bin/env python3
"""The normal-mode kernels without JAX, checked against the numpy model (GPU; also under
compute-sanitizer, where JAX programs are too large to run).

    python3 benchmarks/ep_harness.py                          # build, run every case, table
    python3 benchmarks/ep_harness.py --sanitizer all          # the same under memcheck,
                                                              # racecheck and synccheck
    python3 benchmarks/ep_harness.py --only 3 --keep /tmp/c   # one case, keep its files

For each case (R virtual ranks on one GPU, both layouts, direct and staged, bf16 / f16 / f32 /
FP8 rows, -1, invalid and repeated experts, skew, capacity overflow, T = 0) it writes the inputs
(random, fresh seed each run, printed), runs benchmarks/ep_harness.cu (layout, slot ranks,
dispatch, combine, weight gradients, broadcast; `--iters` rounds back to back) and compares
every output with tests/numpy_model.py: data movement and counts bit for bit, combine exactly
(weights k/128 and 16-bit mantissas make every product exact). Exit status 1 on a mismatch.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import numpy_model as nm  # noqa: E402
from cases import DTYPES, assert_bits_equal, assert_float_equal, make_inputs, random_values, split  # noqa: E402

ELEM = {"f32": 0, "bf16": 1, "f16": 2}  # intranode.h ElemType

# R, T, H, K, E, layout, A, C, dtype, routing, staged
CASES = [
    (1, 128, 7168, 8, 32, "token", 1, None, "bf16", "random", False),   # EP1, DeepEP-like rows
    (1, 37, 256, 4, 8, "expert", 8, None, "fp8", "dup+invalid", False),
    (2, 33, 136, 4, 8, "token", 1, None, "bf16", "random+empty", False),
    (2, 33, 136, 4, 8, "expert", 4, None, "f32", "random", False),
    (2, 33, 136, 4, 8, "token", 1, None, "bf16", "random+invalid", True),
    (2, 40, 256, 3, 8, "expert", 4, None, "fp8", "dup", True),
    (4, 25, 40, 5, 12, "token", 1, 9, "f16", "random+empty", False),    # overflow
    (4, 25, 40, 5, 12, "expert", 8, 21, "bf16", "invalid+dup", True),   # overflow, C % A != 0
    (4, 17, 7, 2, 4, "token", 1, None, "f32", "skew", True),
    (4, 17, 8, 2, 4, "expert", 4, None, "f32", "skew", False),
    (2, 9, 16, 2, 4, "expert", 4, None, "bf16", "none", False),         # routed nowhere
    (2, 0, 128, 2, 4, "token", 1, None, "bf16", "random", True),        # T = 0
]


def capacity_and_slots(R, T, K, E, layout, A, C):
    cap = nm.default_capacity(layout, R, T, K, E, A) if C is None else C
    send = T if layout == "expert" else min(T, cap)
    return cap, max(send, 1)


def send_positions(in_rank, send_capacity):
    """[T, R] int32 slot of each token in the block sent to each rank (backends/cuda.py)."""
    pos = np.cumsum(in_rank, axis=0, dtype=np.int64) - 1
    return np.where(in_rank & (pos < send_capacity), pos, -1).astype(np.int32)


def slot_ranks(idx, E):
    """[T, K] int32 rank of slot (t, k) among the slots naming its expert, (t, k) order."""
    out = np.full(idx.shape, -1, np.int32)
    seen = {}
    for (t, k), e in np.ndenumerate(idx):
        if 0 <= e < E:
            out[t, k] = seen.get(int(e), 0)
            seen[int(e)] = out[t, k] + 1
    return out


def write(path: pathlib.Path, name: str, rank: int, a) -> None:
    np.ascontiguousarray(a).tofile(path / f"in.{name}.{rank}.bin")


def read(path: pathlib.Path, name: str, rank: int, dtype, shape):
    return np.fromfile(path / f"out.{name}.{rank}.bin", dtype=dtype).reshape(shape)


def run_case(i, case, seed, binary, workdir, sanitizer, iters, timeout_s):
    R, T, H, K, E, layout, A, C, dtype, routing, staged = case
    rng = np.random.default_rng(seed + i)
    cap, send = capacity_and_slots(R, T, K, E, layout, A, C)
    fp8, expert = dtype == "fp8", layout == "expert"
    y_name = "bf16" if fp8 else dtype
    y_dtype = DTYPES[y_name]
    x, scales, idx, w = make_inputs(rng, R, T, H, K, E, dtype, routing)
    xs, ss, idxs, ws = split(x, R), split(scales, R), split(idx, R), split(w, R)
    models = nm.dispatch(xs, idxs, ws, num_experts=E, layout=layout, recv_capacity=C,
                         expert_alignment=A, scales=ss)
    ys = split(random_values(rng, (R * cap, H), y_dtype, mantissa_bits=16), R)
    values = split(random_values(rng, (R * T, H), y_dtype), R)
    grads = []
    for m in models:  # row weight cotangents (the token layout's are 0 off this rank)
        g = random_values(rng, m.recv_topk_weights.shape, np.float32, mantissa_bits=8)
        grads.append(np.where(m.recv_topk_idx >= 0, g, 0).astype(np.float32))
    path = pathlib.Path(workdir)
    layouts = [nm.dispatch_layout(idx_r, E, R) for idx_r in idxs]
    spec = dict(ranks=R, tokens=T, topk=K, experts=E, capacity=cap, send_capacity=send,
                expert_layout=int(expert), staged=int(staged), alignment=A,
                x_row_bytes=H * DTYPES[dtype].itemsize, num_scales=H // 128 if fp8 else 0,
                y_width=H, y_elem=ELEM[y_name], value_row_bytes=H * y_dtype.itemsize,
                iters=iters, timeout_s=timeout_s, blocks=0)
    (path / "case.txt").write_text("".join(f"{k} {v}\n" for k, v in spec.items()))
    for r in range(R):
        write(path, "x", r, xs[r])
        if fp8:
            write(path, "scales", r, ss[r])
        write(path, "idx", r, idxs[r])
        write(path, "w", r, ws[r])
        write(path, "send_pos", r, send_positions(layouts[r].is_token_in_rank, send))
        write(path, "y", r, ys[r])
        write(path, "row_grads", r, grads[r])
        write(path, "values", r, values[r])
    cmd = [str(binary), str(path)]
    if sanitizer:
        cmd = ["compute-sanitizer", "--tool", sanitizer, "--error-exitcode", "1"] + cmd
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s * 4 + 600)
    seconds = time.monotonic() - start
    if proc.returncode != 0:
        return seconds, f"exit {proc.returncode}: {(proc.stdout + proc.stderr)[-3000:]}"

    combine = nm.combine(ys, models, layout=layout, tokens=T)
    weight_grads = nm.topk_weights_grad(grads, models, idxs, num_experts=E, layout=layout)
    idx_cols = (K,) if not expert else ()
    try:
        for r in range(R):
            m, lay, tag = models[r], layouts[r], f"rank {r}"
            assert_bits_equal(read(path, "num_tokens_per_rank", r, np.int32, (R,)),
                              lay.num_tokens_per_rank, f"layout per rank {tag}")
            assert_bits_equal(read(path, "num_tokens_per_expert_all", r, np.int32, (E,)),
                              lay.num_tokens_per_expert, f"layout per expert {tag}")
            assert_bits_equal(read(path, "is_token_in_rank", r, np.bool_, (T, R)),
                              lay.is_token_in_rank, f"is_token_in_rank {tag}")
            assert int(read(path, "num_invalid", r, np.int32, (1,))[0]) == lay.num_invalid
            assert_bits_equal(read(path, "pos_in_src", r, np.int32, (T, K)),
                              slot_ranks(idxs[r], E), f"slot ranks {tag}")
            assert_bits_equal(read(path, "recv_x", r, DTYPES[dtype], (cap, H)), m.recv_x,
                              f"recv_x {tag}")
            if fp8:
                assert_bits_equal(read(path, "recv_x_scales", r, np.float32, (cap, H // 128)),
                                  m.recv_x_scales, f"recv_x_scales {tag}")
            assert_bits_equal(read(path, "recv_topk_idx", r, np.int32, (cap,) + idx_cols),
                              m.recv_topk_idx, f"recv_topk_idx {tag}")
            assert_bits_equal(read(path, "recv_topk_weights", r, np.float32, (cap,) + idx_cols),
                              m.recv_topk_weights, f"recv_topk_weights {tag}")
            if expert:
                assert_bits_equal(read(path, "group_sizes", r, np.int32, (E // R,)),
                                  m.group_sizes, f"group_sizes {tag}")
            assert_bits_equal(read(path, "num_tokens_per_expert", r, np.int32, (E // R,)),
                              m.num_tokens_per_expert, f"num_tokens_per_expert {tag}")
            assert int(read(path, "num_recv_rows", r, np.int32, (1,))[0]) == m.num_recv_rows
            assert int(read(path, "num_dropped", r, np.int32, (1,))[0]) == m.num_dropped
            assert_float_equal(read(path, "combine", r, y_dtype, (T, H)), combine[r],
                               f"combine {tag}")
            assert_bits_equal(read(path, "weight_grads", r, np.float32, (T, K)),
                              weight_grads[r], f"weight gradients {tag}")
            want = np.zeros((cap, H), y_dtype)
            for row in m.rows:
                want[row[0]] = values[row[1]][row[2]]
            assert_bits_equal(read(path, "broadcast", r, y_dtype, (cap, H)), want,
                              f"broadcast {tag}")
    except AssertionError as e:
        return seconds, str(e)[:3000]
    return seconds, ""


def build(out: pathlib.Path) -> pathlib.Path:
    binary = out / "ep_harness"
    cmd = ["nvcc", "-O3", "-std=c++17", "-gencode=arch=compute_90a,code=sm_90a", "-lineinfo",
           f"-I{ROOT / 'xla_ffi'}", str(ROOT / "benchmarks/ep_harness.cu"),
           str(ROOT / "xla_ffi/intranode/dispatch.cu"), str(ROOT / "xla_ffi/intranode/combine.cu"),
           str(ROOT / "xla_ffi/intranode/peer_copy.cu"),
           str(ROOT / "xla_ffi/layout/layout_kernels.cu"), "-o", str(binary)]
    subprocess.run(cmd, check=True)
    return binary


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--binary", help="a built ep_harness (default: build one with nvcc)")
    p.add_argument("--sanitizer", choices=["memcheck", "racecheck", "synccheck", "all"])
    p.add_argument("--iters", type=int, default=3, help="rounds of every op, back to back")
    p.add_argument("--only", type=int, action="append", help="case index (repeatable)")
    p.add_argument("--seed", type=int)
    p.add_argument("--timeout-s", type=int, default=60, help="the kernels' bound on every wait")
    p.add_argument("--keep", help="keep the case files here")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results"), help="JSON goes here")
    args = p.parse_args()
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(3), "little")
    print(f"seed {seed}")
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="ep_harness_"))
    binary = pathlib.Path(args.binary) if args.binary else build(tmp)
    tools = [None] if not args.sanitizer else (
        ["memcheck", "racecheck", "synccheck"] if args.sanitizer == "all" else [args.sanitizer])
    rows, failed = [], 0
    print(f"{'case':>4} {'tool':>10} {'R':>2} {'T':>4} {'H':>5} {'K':>2} {'E':>3} {'layout':>6} "
          f"{'C':>5} {'dtype':>5} {'staged':>6} {'routing':>14} {'s':>6}  result")
    for i, case in enumerate(CASES):
        if args.only and i not in args.only:
            continue
        for tool in tools:
            work = pathlib.Path(args.keep) / f"case{i}" if args.keep else tmp / f"case{i}"
            work.mkdir(parents=True, exist_ok=True)
            seconds, error = run_case(i, case, seed, binary, work, tool, args.iters,
                                      args.timeout_s)
            R, T, H, K, E, layout, A, C, dtype, routing, staged = case
            result = "ok" if not error else "FAILED"
            failed += bool(error)
            print(f"{i:>4} {tool or '-':>10} {R:>2} {T:>4} {H:>5} {K:>2} {E:>3} {layout:>6} "
                  f"{str(C):>5} {dtype:>5} {str(staged):>6} {routing:>14} {seconds:6.1f}  "
                  f"{result}", flush=True)
            if error:
                print(f"  replay: --seed {seed} --only {i}\n  {error}")
            rows.append(dict(case=i, tool=tool, config=case, seconds=round(seconds, 2),
                             error=error))
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(args.out, exist_ok=True)
    result = pathlib.Path(args.out) / "ep_harness.json"
    result.write_text(json.dumps(dict(seed=seed, iters=args.iters, rows=rows), indent=1))
    print(f"{len(rows) - failed} of {len(rows)} passed; {result}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
