"""Backend "xla" of the low-latency ops: the pure-JAX oracle of jax_ep.low_latency.

Per shard (inside shard_map). The send phase exchanges every token's row, FP8 scales and routing
metadata with one lax.all_to_all per array (each rank gets all T rows of every source, with a
"present" mask); the receive phase lays them out expert-major exactly as the CUDA kernels do:
rows of local expert j from source s start at the sum of the counts of sources < s, in the
source's (t, k) order. Sums run in a fixed order with explicit float32 roundings.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

from ..types import (LowLatencyCombineResult, LowLatencyConfig, LowLatencyDispatchResult,
                     LowLatencyHandle, LowLatencyPending)

f32 = jnp.float32
FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP8_MIN_AMAX = 1e-4  # floor of a group's amax (all-zero groups get a finite scale)
# scale = amax * (1 / 448) with the float32 reciprocal: XLA rewrites a division by a constant
# into this multiplication anyway, so spelling it out keeps every backend bit-identical.
FP8_INV_MAX = np.float32(1) / np.float32(FP8_MAX)


def fp8_cast(x):
    """x [T, H] -> (e4m3 [T, H], scales [T, H // 128] float32): per 128 channels,
    amax = max(|x|, 1e-4), q = e4m3(x * (448 / amax)) (both roundings to nearest, saturating),
    scale = amax * float32(1 / 448)."""
    t, h = x.shape
    xf = x.astype(f32).reshape(t, h // 128, 128)
    amax = jnp.maximum(jnp.max(jnp.abs(xf), axis=-1), f32(FP8_MIN_AMAX))
    q = round_to_e4m3(xf * _div_rn_448(amax)[..., None]).astype(jnp.float8_e4m3fn)
    return q.reshape(t, h), amax * FP8_INV_MAX


def _div_rn_448(amax):
    """float32 448 / amax rounded to nearest even, as the kernels' __fdiv_rn(448.f, amax), for
    a finite amax >= 2^-119 (a finite normal quotient; fp8_cast's amax is >= 1e-4).
    Integer ops only: XLA:GPU lowers float32 division to PTX div.full.f32 (up to 2 ulp off).
    With amax = m * 2^(e - 150) (24-bit mantissa m, biased exponent e) and 448 = 0xE00000 * 2^-15,
    448 / amax = (n / m) * 2^(135 - e), n = 0xE00000 if m <= n else 2 * 0xE00000 (exponent - 1),
    so that 1 <= n / m < 2: 24 quotient bits by restoring division, rounded with the remainder."""
    u32 = jnp.uint32
    bits = lax.bitcast_convert_type(amax, u32)
    m = (bits & u32(0x7FFFFF)) | u32(0x800000)
    big = (m > u32(0xE00000)).astype(u32)
    r = (u32(0xE00000) << big) - m  # first quotient bit is 1
    q = jnp.ones_like(m)
    for _ in range(23):
        r = r << 1
        b = r >= m
        r = jnp.where(b, r - m, r)
        q = (q << 1) | b.astype(u32)
    up = ((r << 1) > m) | (((r << 1) == m) & ((q & 1) == 1))
    exp = u32(262) - (bits >> 23) - big  # biased exponent of the quotient
    # adding the rounding bit to the whole pattern carries a mantissa overflow into the exponent
    out = (exp << 23) + (q & u32(0x7FFFFF)) + up.astype(u32)
    return lax.bitcast_convert_type(out, f32)


def round_to_e4m3(v):
    """float32 v (|v| <= 448 up to rounding) rounded to the nearest float8_e4m3fn value, ties to
    even, saturating at 448, still as float32: the conversion after it is exact. (XLA:GPU
    converts float32 to e4m3 through float16, rounding twice: ~0.1% of values land one e4m3 step
    off the CUDA kernels' single rounding.)"""
    bits = lax.bitcast_convert_type(v, jnp.uint32)
    # normal e4m3 (|v| >= 2^-6): keep 3 of float32's 23 mantissa bits, round half to even
    keep = (bits + jnp.uint32(0x7FFFF) + ((bits >> 20) & 1)) & jnp.uint32(0xFFF00000)
    normal = lax.bitcast_convert_type(keep, f32)
    # subnormal e4m3: multiples of 2^-9 (scaling by powers of two is exact)
    sub = jnp.round(v * f32(512)) * f32(1 / 512)
    r = jnp.where(jnp.abs(v) >= f32(2.0**-6), normal, sub)
    return jnp.clip(r, -FP8_MAX, FP8_MAX)


def _bits(mask_rows):
    """[..., R] bool -> [...] int32 with bit d set where mask_rows[..., d]."""
    weights = jnp.left_shift(jnp.int32(1), jnp.arange(mask_rows.shape[-1], dtype=jnp.int32))
    return jnp.sum(jnp.where(mask_rows, weights, 0), axis=-1, dtype=jnp.int32)


def _effective_failed(cfg: LowLatencyConfig, failed):
    """[R] bool: the failed ranks; all of them on a rank that is itself marked failed (it takes
    no part: sends and receives nothing)."""
    failed = failed != 0
    return failed | failed[lax.axis_index(cfg.axis_name)]


def _a2a(cfg: LowLatencyConfig, blocks):
    return lax.all_to_all(blocks, cfg.axis_name, 0, 0, tiled=True)


def dispatch_send(cfg: LowLatencyConfig, x, topk_idx, topk_weights, failed) -> LowLatencyPending:
    """x [T, H] bfloat16, topk_idx [T, K] int32, topk_weights [T, K] float32, failed [R] int32."""
    num_ranks, num_experts, num_local = cfg.num_ranks, cfg.num_experts, cfg.num_local_experts
    t, k = topk_idx.shape
    failed = _effective_failed(cfg, failed)
    valid = (topk_idx >= 0) & (topk_idx < num_experts)
    expert = jnp.where(valid, topk_idx, 0)
    # Rank of entry (t, k) among this rank's entries of the same expert, in (t, k) order.
    onehot = (expert.reshape(-1)[:, None] == jnp.arange(num_experts)[None]) & valid.reshape(-1, 1)
    before = jnp.cumsum(onehot, axis=0, dtype=jnp.int32) - onehot
    pos = jnp.take_along_axis(before, expert.reshape(-1, 1), axis=1).reshape(t, k)
    pos = jnp.where(valid, pos, -1)
    dest = expert // num_local
    in_rank = jnp.any(valid[:, :, None] & (dest[:, :, None] == jnp.arange(num_ranks)), axis=1)
    sent = in_rank & ~failed[None, :]  # [T, R]
    counts = jnp.sum(onehot, axis=0, dtype=jnp.int32).reshape(num_ranks, num_local)
    counts = jnp.where(failed[:, None], 0, counts)  # [R(dest), L]

    payload, scales = fp8_cast(x) if cfg.use_fp8 else (x, None)

    def to_all(a):  # the same [T, ...] block for every destination
        return _a2a(cfg, jnp.broadcast_to(a[None], (num_ranks,) + a.shape))

    got_failed = failed[:, None]  # sources this rank treats as failed send nothing here
    blocks = dict(
        x=to_all(payload), scales=None if scales is None else to_all(scales), idx=to_all(topk_idx), pos=to_all(pos),
        w=to_all(topk_weights),
        present=_a2a(cfg, sent.T) & ~got_failed,           # [R(src), T]
        counts=jnp.where(got_failed, 0, _a2a(cfg, counts)))  # [R(src), L]
    handle = LowLatencyHandle(cfg, None, None, _bits(in_rank), _bits(sent))
    ticket = jnp.zeros((2,), jnp.int32)
    return LowLatencyPending(cfg, ticket, failed.astype(jnp.int32), handle, blocks)


def dispatch_recv(cfg: LowLatencyConfig, pending: LowLatencyPending) -> LowLatencyDispatchResult:
    b = pending.blocks
    num_ranks, num_local, m = cfg.num_ranks, cfg.num_local_experts, cfg.max_tokens
    cap = cfg.expert_capacity
    me = lax.axis_index(cfg.axis_name)
    counts = b["counts"]  # [R, L]
    begin = jnp.cumsum(counts, axis=0, dtype=jnp.int32) - counts
    total = jnp.sum(counts, axis=0, dtype=jnp.int32)
    idx = b["idx"]  # [R, T, K]
    local = idx - me * num_local
    mine = (b["present"][:, :, None] & (idx >= 0) & (idx < cfg.num_experts) & (local >= 0)
            & (local < num_local))
    j = jnp.where(mine, local, 0)
    src = jnp.arange(num_ranks)[:, None, None]
    row = begin[jnp.broadcast_to(src, j.shape), j] + b["pos"]
    stored = mine & (row < cap)
    flat = jnp.where(stored, j * cap + row, num_local * cap)  # out of range: dropped
    slot_rows = jnp.where(stored, j * cap + row, jnp.where(mine, -2, -1)).astype(jnp.int32)
    slot_weights = jnp.where(mine, b["w"], 0.0).astype(f32)

    def place(values, fill):  # values [R, T, ...] -> [L * cap, ...] at every stored entry
        vals = jnp.broadcast_to(values[:, :, None], flat.shape + values.shape[2:])
        out = jnp.full((num_local * cap,) + values.shape[2:], fill, values.dtype)
        return out.at[flat.reshape(-1)].set(vals.reshape((-1,) + values.shape[2:]), mode="drop")

    h = b["x"].shape[-1]
    recv_x = place(b["x"], 0).reshape(num_local, cap, h)
    recv_scales = None
    if cfg.use_fp8:
        recv_scales = place(b["scales"], 0).reshape(num_local, cap, h // 128)
    t = idx.shape[1]
    src_id = (jnp.arange(num_ranks, dtype=jnp.int32)[:, None] * m
              + jnp.arange(t, dtype=jnp.int32)[None, :])
    recv_src = place(src_id, -1).reshape(num_local, cap)
    recv_range = jnp.stack([begin.T, counts.T], axis=-1)  # [L, R, 2]
    handle = LowLatencyHandle(cfg, slot_rows, slot_weights, pending.handle.token_dests,
                              pending.handle.token_sent)
    return LowLatencyDispatchResult(
        recv_x=recv_x, recv_x_scales=recv_scales, recv_count=jnp.minimum(total, cap),
        recv_src=recv_src, recv_range=recv_range,
        num_dropped=jnp.sum(jnp.maximum(total - cap, 0), dtype=jnp.int32), handle=handle)


def combine_send(cfg: LowLatencyConfig, y, handle: LowLatencyHandle, failed) -> LowLatencyPending:
    """y [L, R * M, H] bfloat16 expert outputs. Each rank sums, per token it received, weight *
    output over the token's experts here (k order, float32), rounds to bfloat16 and returns it."""
    failed = _effective_failed(cfg, failed)
    ys = y.reshape(-1, y.shape[-1])
    rows, w = handle.slot_rows, handle.slot_weights  # [R, T, K]
    acc = jnp.zeros(rows.shape[:2] + (ys.shape[1],), f32)
    for k in range(cfg.num_topk):
        ok = rows[:, :, k] >= 0
        got = jnp.take(ys, jnp.where(ok, rows[:, :, k], 0), axis=0).astype(f32)
        acc = jnp.where(ok[..., None], acc + w[:, :, k, None] * got, acc)
    partial = jnp.where(failed[:, None, None], 0, acc).astype(jnp.bfloat16)
    blocks = dict(partial=_a2a(cfg, partial))  # [R(dest), T, H] on the source
    return LowLatencyPending(cfg, jnp.zeros((2,), jnp.int32), failed.astype(jnp.int32), handle,
                             blocks)


def combine_recv(cfg: LowLatencyConfig, pending: LowLatencyPending) -> LowLatencyCombineResult:
    handle = pending.handle
    partial = pending.blocks["partial"]  # [R, T, H]
    alive = _bits(pending.failed_ranks[None] == 0)[0]
    use = handle.token_sent & alive  # [T]
    out = jnp.zeros(partial.shape[1:], f32)
    for d in range(cfg.num_ranks):
        here = ((use >> d) & 1) == 1
        out = jnp.where(here[:, None], out + partial[d].astype(f32), out)
    missing = lax.population_count(handle.token_dests & ~use).astype(jnp.int32)
    return LowLatencyCombineResult(out.astype(jnp.bfloat16), missing)
