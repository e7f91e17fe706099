#!/usr/bin/env python3
"""Stands in for the CUDA harness benchmarks/ep_harness.cu on CPU: reads a case written by
benchmarks/ep_harness.py and writes the outputs the numpy model gives, in the harness's files
(tests/test_reliability_scripts.py checks the driver with it; JAX_EP_BREAK_COMBINE=1 corrupts
one combine value, which the driver must report).

    python3 tests/ep_harness_model.py DIR
"""
import os
import pathlib
import sys

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "benchmarks")]

import ep_harness  # noqa: E402
import numpy_model as nm  # noqa: E402
from cases import DTYPES  # noqa: E402


def main(path: pathlib.Path) -> None:
    k = {key: int(v) for key, v in (line.split() for line in (path / "case.txt").read_text()
                                    .splitlines())}
    R, T, K, E, C, H = (k[n] for n in ("ranks", "tokens", "topk", "experts", "capacity",
                                       "y_width"))
    expert, num_scales = bool(k["expert_layout"]), k["num_scales"]
    y_dtype = np.dtype([np.float32, DTYPES["bf16"], np.float16][k["y_elem"]])
    x_dtype = {1: DTYPES["fp8"], 4: np.dtype(np.float32)}.get(k["x_row_bytes"] // H, y_dtype)
    layout = "expert" if expert else "token"

    def read(name, r, dtype, shape):
        return np.fromfile(path / f"in.{name}.{r}.bin", dtype).reshape(shape)

    def write(name, r, a):
        np.ascontiguousarray(a).tofile(path / f"out.{name}.{r}.bin")

    xs = [read("x", r, x_dtype, (T, H)) for r in range(R)]
    scales = [read("scales", r, np.float32, (T, num_scales)) for r in range(R)] if num_scales \
        else None
    idxs = [read("idx", r, np.int32, (T, K)) for r in range(R)]
    ws = [read("w", r, np.float32, (T, K)) for r in range(R)]
    models = nm.dispatch(xs, idxs, ws, num_experts=E, layout=layout, recv_capacity=C,
                         expert_alignment=k["alignment"], scales=scales)
    ys = [read("y", r, y_dtype, (C, H)) for r in range(R)]
    grads = [read("row_grads", r, np.float32, (C,) if expert else (C, K)) for r in range(R)]
    values = [read("values", r, y_dtype, (T, H)) for r in range(R)]
    combine = nm.combine(ys, models, layout=layout, tokens=T)
    weight_grads = nm.topk_weights_grad(grads, models, idxs, num_experts=E, layout=layout)
    for r, m in enumerate(models):
        lay = nm.dispatch_layout(idxs[r], E, R)
        write("num_tokens_per_rank", r, lay.num_tokens_per_rank)
        write("num_tokens_per_expert_all", r, lay.num_tokens_per_expert)
        write("is_token_in_rank", r, lay.is_token_in_rank)
        write("num_invalid", r, np.int32([lay.num_invalid]))
        write("pos_in_src", r, ep_harness.slot_ranks(idxs[r], E))
        write("recv_x", r, m.recv_x)
        if num_scales:
            write("recv_x_scales", r, m.recv_x_scales)
        write("recv_topk_idx", r, m.recv_topk_idx)
        write("recv_topk_weights", r, m.recv_topk_weights)
        if expert:
            write("group_sizes", r, m.group_sizes)
        write("num_recv_rows", r, np.int32([m.num_recv_rows]))
        write("num_dropped", r, np.int32([m.num_dropped]))
        write("num_tokens_per_expert", r, m.num_tokens_per_expert)
        out = combine[r].copy()
        if os.environ.get("JAX_EP_BREAK_COMBINE") and r == 0 and out.size:
            out.flat[0] = out.flat[0] * 2
        write("combine", r, out)
        write("weight_grads", r, weight_grads[r])
        rows = np.zeros((C, H), y_dtype)
        for row in m.rows:
            rows[row[0]] = values[row[1]][row[2]]
        write("broadcast", r, rows)


if __name__ == "__main__":
    main(pathlib.Path(sys.argv[1]))
