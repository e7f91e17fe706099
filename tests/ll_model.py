"""numpy model of the low-latency ops (jax_ep.low_latency) and helpers shared by the single-
and multi-process suites (numpy only)."""
from __future__ import annotations

import ml_dtypes
import numpy as np

BF16 = ml_dtypes.bfloat16
FP8 = ml_dtypes.float8_e4m3fn


def np_fp8(x):
    """x [T, H] float32 -> (e4m3 [T, H], scales [T, H // 128] float32)."""
    t, h = x.shape
    g = x.reshape(t, h // 128, 128)
    amax = np.maximum(np.abs(g).max(-1), np.float32(1e-4)).astype(np.float32)
    q = (g * (np.float32(448) / amax)[..., None]).astype(FP8)
    return q.reshape(t, h), (amax * (np.float32(1) / np.float32(448))).astype(np.float32)


def np_dispatch(x, idx, w, num_experts, m, fp8, failed):
    """x [R, T, H] bf16, idx / w [R, T, K], failed [R] bool -> per receiver a dict of outputs."""
    r_, t_, k_ = idx.shape
    num_local, cap = num_experts // r_, r_ * m
    h = x.shape[2]
    payload, scales, pos = [], [], []
    for s in range(r_):
        if fp8:
            q, sc = np_fp8(x[s].astype(np.float32))
        else:
            q, sc = x[s], np.zeros((t_, 0), np.float32)
        payload.append(q), scales.append(sc)
        seen = np.zeros(num_experts, np.int64)
        p = np.full((t_, k_), -1, np.int32)
        for t in range(t_):
            for k in range(k_):
                e = idx[s, t, k]
                if 0 <= e < num_experts:
                    p[t, k] = seen[e]
                    seen[e] += 1
        pos.append(p)
    out = []
    for d in range(r_):
        active = [not failed[s] and not failed[d] for s in range(r_)]
        counts = np.zeros((r_, num_local), np.int32)
        for s in range(r_):
            if active[s]:
                e = idx[s][(idx[s] >= d * num_local) & (idx[s] < (d + 1) * num_local)]
                counts[s] = np.bincount(e - d * num_local, minlength=num_local)
        begin = np.cumsum(counts, axis=0) - counts
        total = counts.sum(0)
        recv_x = np.zeros((num_local, cap, h), payload[0].dtype)
        recv_sc = np.zeros((num_local, cap, scales[0].shape[1]), np.float32)
        recv_src = np.full((num_local, cap), -1, np.int32)
        slot_rows = np.full((r_, t_, k_), -1, np.int32)
        slot_w = np.zeros((r_, t_, k_), np.float32)
        for s in range(r_):
            if not active[s]:
                continue
            for t in range(t_):
                for k in range(k_):
                    e = idx[s, t, k]
                    if not (0 <= e < num_experts and e // num_local == d):
                        continue
                    j = e - d * num_local
                    row = begin[s, j] + pos[s][t, k]
                    slot_w[s, t, k] = w[s, t, k]
                    if row >= cap:
                        slot_rows[s, t, k] = -2
                        continue
                    slot_rows[s, t, k] = j * cap + row
                    recv_x[j, row] = payload[s][t]
                    recv_sc[j, row] = scales[s][t]
                    recv_src[j, row] = s * m + t
        out.append(dict(recv_x=recv_x, recv_x_scales=recv_sc, recv_count=np.minimum(total, cap),
                        recv_src=recv_src, recv_range=np.stack([begin.T, counts.T], -1),
                        num_dropped=np.int32(np.maximum(total - cap, 0).sum()),
                        slot_rows=slot_rows, slot_weights=slot_w))
    return out


def np_combine(y, disp, idx, num_experts, failed):
    """y [R, L, cap, H] bf16 expert outputs; disp: np_dispatch's per-rank dicts.
    Returns (out [R, T, H] bf16, num_missing [R, T])."""
    r_, t_, k_ = idx.shape
    num_local, h = num_experts // r_, y.shape[-1]
    partial = np.zeros((r_, r_, t_, h), BF16)  # [owner d, source s, t]
    for d in range(r_):
        rows, w = disp[d]["slot_rows"], disp[d]["slot_weights"]
        flat = y[d].reshape(-1, h).astype(np.float32)
        for s in range(r_):
            for t in range(t_):
                acc = np.zeros(h, np.float32)
                for k in range(k_):
                    if rows[s, t, k] >= 0:
                        acc = (acc + (np.float32(w[s, t, k]) * flat[rows[s, t, k]])).astype(np.float32)
                partial[d, s, t] = acc.astype(BF16)
    out = np.zeros((r_, t_, h), BF16)
    missing = np.zeros((r_, t_), np.int32)
    for s in range(r_):
        for t in range(t_):
            e = idx[s, t]
            dests = sorted({int(v) // num_local for v in e if 0 <= v < num_experts})
            acc = np.zeros(h, np.float32)
            for d in dests:
                if failed[s] or failed[d]:
                    missing[s, t] += 1
                    continue
                acc = (acc + partial[d, s, t].astype(np.float32)).astype(np.float32)
            out[s, t] = acc.astype(BF16)
    return out, missing


def routing(rng, r_, t_, k_, num_experts, kind):
    shape = (r_, t_, k_)
    if kind == "uniform":  # distinct experts per token (DeepEP's decode routing)
        scores = rng.random((r_ * t_, num_experts))
        idx = np.argsort(-scores, axis=1)[:, :k_].reshape(shape)
    elif kind == "skewed":  # every token to expert 0 (rank 0), the other slots unrouted
        idx = np.full(shape, -1)
        idx[..., 0] = 0
    elif kind == "messy":  # -1, invalid ids, repeated experts; with M = T one expert overflows
        idx = rng.integers(-3, num_experts + 3, shape).reshape(r_ * t_, k_)
        idx[rng.random(r_ * t_) < 0.2] = -1
        # > 1/K of all tokens put every slot on one expert: more than R * T rows for it
        n = min(r_ * t_, max(-(-3 * r_ * t_ // 10), r_ * t_ // k_ + 1))
        idx[rng.choice(r_ * t_, n, replace=False), :] = rng.integers(0, num_experts)
        idx = idx.reshape(shape)
    else:
        raise ValueError(kind)
    w = (rng.random(shape) + 0.1).astype(np.float32)
    return idx.astype(np.int32), w


def bits(a):
    a = np.asarray(a)
    return a.view(np.uint8) if a.dtype == FP8 else a.view(np.uint16) if a.dtype == BF16 else a


def expert_scale(num_local: int, xp=np):
    """[L, 1, 1] float32 powers of two, one per local expert (the test programs' expert)."""
    return (2.0 ** (xp.arange(num_local) % 3)).astype(xp.float32)[:, None, None]


def expected_y(want: dict, fp8: bool):
    """The test programs' expert outputs from the model's dispatch of one rank (rows past the
    counts are zero here; unspecified on backend "cuda", never read by combine)."""
    rows = want["recv_x"].astype(np.float32)
    if fp8:
        rows = rows * np.repeat(want["recv_x_scales"], 128, axis=-1)
    return (rows * expert_scale(rows.shape[0])).astype(BF16)


def program(buf, num_experts, fp8, split):
    """The per-shard test program: dispatch (fused, or send / a computation tied between /
    receive), a closed-form expert (the dequantised rows times 1, 2 or 4 by expert: exact, so
    every backend and the model agree bitwise),
    combine. Returns body(x, idx, w, failed) -> (dict of [1, ...] outputs, out, num_missing)."""
    import jax.numpy as jnp  # noqa: PLC0415 (workers import this module before jax is set up)
    from jax_ep import low_latency as ll  # noqa: PLC0415

    def body(x, idx, w, failed):
        if split:
            pending = ll.dispatch_send(buf, x, idx, w, num_experts=num_experts, use_fp8=fp8,
                                       failed_ranks=failed)
            pending, z = ll.tie(pending, jnp.tanh(x.astype(jnp.float32)).sum())
            res = ll.dispatch_recv(buf, pending)
        else:
            res = ll.dispatch(buf, x, idx, w, num_experts=num_experts, use_fp8=fp8,
                              failed_ranks=failed)
            z = jnp.float32(0)
        rows = res.recv_x.astype(jnp.float32)
        if fp8:
            rows = rows * jnp.repeat(res.recv_x_scales, 128, axis=-1)
        y = (rows * expert_scale(rows.shape[0], jnp)).astype(jnp.bfloat16)
        if split:
            pending = ll.combine_send(buf, y, res.handle, failed_ranks=failed)
            pending, z = ll.tie(pending, z * 2)
            comb = ll.combine_recv(buf, pending)
        else:
            comb = ll.combine(buf, y, res.handle, failed_ranks=failed)
        fields = dict(recv_x=res.recv_x, recv_count=res.recv_count, recv_src=res.recv_src,
                      recv_range=res.recv_range, num_dropped=res.num_dropped,
                      slot_rows=res.handle.slot_rows, slot_weights=res.handle.slot_weights,
                      y=y, z=z)
        if fp8:
            fields["recv_x_scales"] = res.recv_x_scales
        out = {k: v[None] for k, v in fields.items()}
        return out, comb.out, comb.num_missing

    return body


def assert_dispatch_rank(got: dict, want: dict, fp8: bool, label: str) -> None:
    """One rank's dispatch outputs (got: arrays without the leading rank axis) against the model:
    bit-exact; rows past recv_count are not compared (unspecified on backend "cuda")."""
    count = want["recv_count"]
    np.testing.assert_array_equal(got["recv_count"], count, err_msg=f"{label} recv_count")
    for name in ("recv_src", "recv_range", "num_dropped", "slot_rows", "slot_weights"):
        np.testing.assert_array_equal(got[name], want[name], err_msg=f"{label} {name}")
    for name in ("recv_x", "recv_x_scales") if fp8 else ("recv_x",):
        for j in range(count.shape[0]):
            np.testing.assert_array_equal(bits(got[name][j, :count[j]]),
                                          bits(want[name][j, :count[j]]),
                                          err_msg=f"{label} {name} expert {j}")


def assert_combine(got, want, exact: bool, label: str) -> None:
    """bfloat16 outputs: bitwise (the CUDA kernels), else within 1 bfloat16 ulp (backend "xla":
    XLA may contract a * b + c into an FMA)."""
    if exact:
        np.testing.assert_array_equal(bits(got), bits(want), err_msg=label)
    else:
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                                   rtol=2 ** -7, atol=1e-30, err_msg=label)
