"""Backend "xla": the pure-JAX reference implementation of docs/api.md.

Runs on any platform. Tokens are exchanged with `lax.all_to_all` in static per-destination
blocks of S rows (a token crosses to a rank at most once) and laid out on the receiver. Every
reduction is an explicit loop in a fixed order, so results are bitwise deterministic.
All functions are per shard (inside shard_map) and read their static config from the handle.
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from ..layout import dispatch_layout_xla
from ..types import DispatchConfig, DispatchHandle, DispatchResult

f32 = jnp.float32


def _exclusive_cumsum(v):
    return jnp.cumsum(v) - v


def _take_rows(rows, idx, num_valid: int, fill=0):
    """rows[idx] along axis 0, `fill` wherever idx is outside [0, num_valid)."""
    if rows.shape[0] == 0:  # T = 0: nothing to take; a fill row keeps rows' varying axes
        rows = jnp.concatenate([rows, jnp.full((1,) + rows.shape[1:], fill, rows.dtype)])
    ok = (idx >= 0) & (idx < num_valid)
    got = jnp.take(rows, jnp.where(ok, idx, 0), axis=0)
    mask = ok.reshape(ok.shape + (1,) * (got.ndim - ok.ndim))
    return jnp.where(mask, got, jnp.asarray(fill, rows.dtype))


def _flat_blocks(a):
    """[R, S, ...] -> [R * S, ...]: receive blocks addressed by row_src."""
    return a.reshape((a.shape[0] * a.shape[1],) + a.shape[2:])


def exchange_forward(cfg: DispatchConfig, send_pos, values):
    """Sends per-token values to the ranks each token goes to.

    send_pos: [T, R] int32 slot of token t in the block for rank d, -1 if not sent.
    values: [T, ...]. Returns [R, S, ...]: block s holds what rank s sent here (zeros if empty).
    """
    num_ranks, s = cfg.num_ranks, cfg.send_capacity
    dst = jnp.broadcast_to(jnp.arange(num_ranks)[None], send_pos.shape)
    tok = jnp.broadcast_to(jnp.arange(cfg.num_tokens)[:, None], send_pos.shape)
    slot = jnp.where(send_pos >= 0, send_pos, s)  # out of range: dropped by the scatter
    send_tok = jnp.full((num_ranks, s), -1, jnp.int32).at[dst, slot].set(tok, mode="drop")
    blocks = _take_rows(values, send_tok, cfg.num_tokens)
    return lax.all_to_all(blocks, cfg.axis_name, 0, 0, tiled=True)


def exchange_back_and_sum(cfg: DispatchConfig, send_pos, blocks):
    """Inverse of exchange_forward, summing over ranks in float32.

    One node (cfg.num_nodes == 1): over ranks 0..R-1 in that order. Several nodes: each node's
    ranks in order give a node partial, rounded to the values' dtype when that is a 16-bit
    float (it crosses the network in it), then the node partials are summed in node order.
    blocks: [R, S, ...] a value per received (source rank, slot). Returns [T, ...] float32.
    """
    back = lax.all_to_all(blocks, cfg.axis_name, 0, 0, tiled=True)  # [R(dest), S, ...]
    per_node = cfg.num_ranks_per_node
    travels_as = blocks.dtype if blocks.dtype in (jnp.bfloat16, jnp.float16) else None
    out = jnp.zeros((cfg.num_tokens,) + back.shape[2:], f32)
    for node in range(cfg.num_nodes):
        part = jnp.zeros((cfg.num_tokens,) + back.shape[2:], f32)
        for d in range(node * per_node, (node + 1) * per_node):
            part = part + _take_rows(back[d], send_pos[:, d], cfg.send_capacity).astype(f32)
        if cfg.num_nodes == 1:
            return part
        if travels_as is not None:
            part = part.astype(travels_as).astype(f32)
        out = out + part
    return out


def rows_to_slots(handle: DispatchHandle, rows, weights=None):
    """Collects receive rows back into the incoming (source rank, slot) blocks.

    rows: [C, ...]. Token layout: the row of each slot, in rows.dtype. Expert layout: the sum over
    k (in order) of weights[row] * rows[row] in float32 (weights None: unit weights), rounded to
    rows.dtype when that is a 16-bit float (else kept float32).
    Returns [R, S, ...].
    """
    cfg, recv_rows = handle.config, handle.recv_rows
    cap = cfg.recv_capacity
    if cfg.layout == "token":
        return _take_rows(rows, recv_rows, cap)
    out = jnp.zeros(recv_rows.shape[:2] + rows.shape[1:], f32)
    for k in range(cfg.num_topk):
        got = _take_rows(rows, recv_rows[:, :, k], cap).astype(f32)
        if weights is not None:
            w = _take_rows(weights, recv_rows[:, :, k], cap)
            got = got * w.reshape(w.shape + (1,) * (got.ndim - w.ndim))
        out = out + got
    # The partial travels in the rows' dtype (one row per token and rank, like the token layout).
    return out.astype(rows.dtype if rows.dtype in (jnp.bfloat16, jnp.float16) else f32)


def slots_to_rows(handle: DispatchHandle, blocks):
    """[R, S, ...] incoming blocks -> [C, ...] receive rows (zeros where a row is empty)."""
    cfg = handle.config
    return _take_rows(_flat_blocks(blocks), handle.row_src, cfg.num_ranks * cfg.send_capacity)


def _varying(a, axis_name):
    """a marked varying over the EP axis, like everything dispatch returns."""
    pcast = getattr(lax, "pcast", None)
    return pcast(a, (axis_name,), to="varying") if pcast else lax.pvary(a, (axis_name,))


def _dispatch_no_tokens(cfg: DispatchConfig, x, x_scales) -> DispatchResult:
    """T = 0 on every rank (T is static and equal on all): nothing is sent or received.
    Built from constants: XLA's partitioner rejects programs whose every use of the shard_map
    operands folds away, which the general path does on empty inputs."""
    num_ranks, s, cap, num_local = (cfg.num_ranks, cfg.send_capacity, cfg.recv_capacity,
                                    cfg.num_local_experts)
    expert = cfg.layout == "expert"

    def full(shape, value, dtype):
        return _varying(jnp.full(shape, value, dtype), cfg.axis_name)

    idx_shape = (cap,) if expert else (cap, cfg.num_topk)
    rows_shape = (num_ranks, s, cfg.num_topk) if expert else (num_ranks, s)
    zero = full((), 0, jnp.int32)
    row_weights = full((cap,), 0, f32) if expert else None
    handle = DispatchHandle(cfg, full((0, num_ranks), -1, jnp.int32),
                            full(rows_shape, cap, jnp.int32), full((cap,), -1, jnp.int32),
                            row_weights)
    return DispatchResult(
        recv_x=full((cap, x.shape[1]), 0, x.dtype),
        recv_x_scales=None if x_scales is None else full((cap, x_scales.shape[1]), 0, f32),
        recv_topk_idx=full(idx_shape, -1, jnp.int32), recv_topk_weights=full(idx_shape, 0, f32),
        group_sizes=full((num_local,), 0, jnp.int32) if expert else None,
        num_recv_rows=zero, num_tokens_per_expert=full((num_local,), 0, jnp.int32),
        num_dropped=zero, num_invalid=zero, handle=handle)


def dispatch(cfg: DispatchConfig, x, x_scales, topk_idx, topk_weights) -> DispatchResult:
    """Reference dispatch; arguments as jax_ep.dispatch (x_scales is None unless FP8)."""
    if cfg.num_tokens == 0:
        return _dispatch_no_tokens(cfg, x, x_scales)
    num_ranks, s, cap = cfg.num_ranks, cfg.send_capacity, cfg.recv_capacity
    num_local = cfg.num_local_experts
    rank = lax.axis_index(cfg.axis_name)

    layout = dispatch_layout_xla(topk_idx, cfg.num_experts, num_ranks)
    in_rank = layout.is_token_in_rank
    send_pos = jnp.cumsum(in_rank, axis=0, dtype=jnp.int32) - 1
    send_pos = jnp.where(in_rank & (send_pos < s), send_pos, -1)  # [T, R]

    # Tokens each source routed here, before truncation to S (drops are counted from it).
    recv_count = lax.all_to_all(layout.num_tokens_per_rank, cfg.axis_name, 0, 0, tiled=True)
    recv_idx = exchange_forward(cfg, send_pos, topk_idx)  # [R, S, K]
    recv_w = exchange_forward(cfg, send_pos, topk_weights)
    slot_ok = jnp.arange(s)[None, :] < jnp.minimum(recv_count, s)[:, None]  # [R, S]
    local = recv_idx - rank * num_local
    is_local = slot_ok[:, :, None] & (local >= 0) & (local < num_local)  # [R, S, K]

    if cfg.layout == "token":
        pos = _exclusive_cumsum(recv_count)[:, None] + jnp.arange(s)[None, :]
        stored = slot_ok & (pos < cap)
        num_rows = jnp.sum(recv_count)
        stored_slots = stored[:, :, None] & is_local
        group_sizes = None
    else:
        key = jnp.where(is_local, local, num_local).reshape(-1)  # slot order: s, i, k
        count = jnp.zeros(num_local + 1, jnp.int32).at[key].add(1)
        aligned = (count[:num_local] + cfg.expert_alignment - 1) // cfg.expert_alignment
        aligned = aligned * cfg.expert_alignment
        offset = jnp.append(_exclusive_cumsum(aligned), cap)  # padded group starts
        order = jnp.argsort(key, stable=True)
        sorted_key = key[order]
        within = jnp.arange(key.size) - _exclusive_cumsum(count)[sorted_key]
        pos = jnp.zeros_like(key).at[order].set(offset[sorted_key] + within)
        pos = pos.reshape(is_local.shape)
        stored = is_local & (pos < cap)
        num_rows = jnp.sum(is_local)
        stored_slots = stored
        group_sizes = jnp.clip(aligned, 0, jnp.maximum(cap - offset[:num_local], 0))

    recv_rows = jnp.where(stored, pos, cap).astype(jnp.int32)
    src = jnp.arange(num_ranks * s, dtype=jnp.int32).reshape(num_ranks, s)
    src = jnp.broadcast_to(src.reshape(src.shape + (1,) * (recv_rows.ndim - 2)), recv_rows.shape)
    row_src = jnp.full((cap,), -1, jnp.int32).at[recv_rows].set(src, mode="drop")
    handle = DispatchHandle(cfg, send_pos, recv_rows, row_src)

    local_or_neg = jnp.where(is_local, local, -1)
    if cfg.layout == "token":
        out_idx = slots_to_rows(handle, local_or_neg + 1) - 1  # empty rows read 0 -> -1
        out_w = slots_to_rows(handle, jnp.where(is_local, recv_w, 0.0))
    else:
        out_idx = jnp.full((cap,), -1, jnp.int32).at[recv_rows].set(local_or_neg, mode="drop")
        out_w = jnp.zeros((cap,), f32).at[recv_rows].set(recv_w, mode="drop")
        handle = DispatchHandle(cfg, send_pos, recv_rows, row_src, out_w)

    recv_x = slots_to_rows(handle, exchange_forward(cfg, send_pos, x))
    recv_sc = None
    if x_scales is not None:
        recv_sc = slots_to_rows(handle, exchange_forward(cfg, send_pos, x_scales))
    bins = jnp.where(stored_slots, local, num_local).reshape(-1)
    num_recv_rows = jnp.sum(stored, dtype=jnp.int32)
    return DispatchResult(
        recv_x=recv_x, recv_x_scales=recv_sc, recv_topk_idx=out_idx, recv_topk_weights=out_w,
        group_sizes=group_sizes, num_recv_rows=num_recv_rows,
        num_tokens_per_expert=jnp.zeros(num_local + 1, jnp.int32).at[bins].add(1)[:num_local],
        num_dropped=(num_rows - num_recv_rows).astype(jnp.int32),
        num_invalid=layout.num_invalid, handle=handle)


def combine(y, handle: DispatchHandle, weights=None):
    """Reference combine -> [T, H] float32 (callers cast). Expert layout weighs rows by `weights`
    ([C] float32; None = unit weights, used by dispatch's backward pass)."""
    cfg = handle.config
    return exchange_back_and_sum(cfg, handle.send_pos, rows_to_slots(handle, y, weights))


def weights_to_slots(handle: DispatchHandle, row_grads):
    """Gradients of the received routing weights -> [T, K] float32 at their source slots.

    row_grads: token layout [C, K] (zero where the expert is on another rank); expert layout [C].
    Only the rank that owns slot k's expert returns a non-zero value for it.
    """
    cfg = handle.config
    blocks = _take_rows(row_grads, handle.recv_rows, cfg.recv_capacity)  # [R, S, K]
    return exchange_back_and_sum(cfg, handle.send_pos, blocks)


def broadcast_to_rows(handle: DispatchHandle, values):
    """Dispatch with the cached handle: values [T, ...] -> [C, ...] (row i gets its token's value)."""
    cfg = handle.config
    return slots_to_rows(handle, exchange_forward(cfg, handle.send_pos, values))
