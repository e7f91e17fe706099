"""Backend "cuda": the intranode kernels (xla_ffi/intranode/) and, with several nodes
(cfg.num_nodes > 1, one process per GPU), the internode ones (xla_ffi/internode/) as XLA FFI
calls.

The Backend protocol of base.py (dispatch, combine, weights_to_slots, broadcast_to_rows) with the
semantics of xla.py and docs/api.md; the handle carries the kernels' own bookkeeping. The calls
are the same over either transport: the workspace's transport picks direct or staged kernels.
The routing prefix sums (slot of each token per destination rank and per destination node, rank
of each (token, k) among its expert's slots) are computed here with XLA before the exchange.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jax import lax

from .._ffi import result_type
from ..layout import get_dispatch_layout
from ..types import DispatchConfig, DispatchHandle, DispatchResult

# Return kernel modes (xla_ffi/intranode/intranode.h ReturnMode).
RETURN_ROWS, RETURN_WEIGHTED, RETURN_GATHER_K = 0, 1, 2
_KERNEL_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def _like(ref, shape, dtype):
    """Result type of a per-shard call on ref's mesh, keeping its varying manual axes."""
    return result_type(jax.typeof(ref), shape, dtype)


def _slot_ranks(topk_idx, num_experts: int):
    """[T, K] int32: rank of slot (t, k) among this rank's slots of the same expert in (t, k)
    order; -1 where the entry names no valid expert (one ballot-scan block per expert)."""
    return jax.ffi.ffi_call("jax_ep_slot_ranks", _like(topk_idx, topk_idx.shape, jnp.int32))(
        topk_idx, num_experts=np.int64(num_experts))


def _node_positions(cfg: DispatchConfig, send_pos):
    """node_pos [T, N] int32: slot of token t among this rank's tokens that go to some rank of
    node n (one message per token and other node), -1 where none does or n is this rank's own
    node; tokens_per_node [N] int32 (0 for the own node)."""
    num_tokens, per_node, num_nodes = cfg.num_tokens, cfg.num_ranks_per_node, cfg.num_nodes
    my_node = lax.axis_index(cfg.axis_name) // per_node
    sent = jnp.any((send_pos >= 0).reshape(num_tokens, num_nodes, per_node), axis=2)
    sent = sent & (jnp.arange(num_nodes)[None, :] != my_node)
    node_pos = jnp.where(sent, jnp.cumsum(sent, axis=0, dtype=jnp.int32) - 1, -1)
    return node_pos.astype(jnp.int32), jnp.sum(sent, axis=0, dtype=jnp.int32)


def _node_fields(handle: DispatchHandle):
    """The internode handle fields, as extra operands of combine / broadcast (none in a node)."""
    if handle.config.num_nodes == 1:
        return ()
    return handle.node_pos, handle.fwd_slots, handle.node_recv_count


def _target(cfg: DispatchConfig, op: str) -> str:
    return f"jax_ep_internode_{op}" if cfg.num_nodes > 1 else f"jax_ep_{op}"


def dispatch(cfg: DispatchConfig, x, x_scales, topk_idx, topk_weights) -> DispatchResult:
    num_ranks, s_cap, cap, num_topk = cfg.num_ranks, cfg.send_capacity, cfg.recv_capacity, cfg.num_topk
    num_local = cfg.num_local_experts
    expert = cfg.layout == "expert"
    layout = get_dispatch_layout(topk_idx, cfg.num_experts, num_ranks)
    in_rank = layout.is_token_in_rank
    send_pos = jnp.cumsum(in_rank, axis=0, dtype=jnp.int32) - 1
    send_pos = jnp.where(in_rank & (send_pos < s_cap), send_pos, -1)
    # Only the expert layout places rows by (expert, source, token); the token layout ignores it.
    pos_in_src = _slot_ranks(topk_idx, cfg.num_experts) if expert else topk_idx
    num_tokens, hidden = x.shape
    scales = x_scales if x_scales is not None else jnp.zeros((num_tokens, 0), jnp.float32)
    idx_shape = (cap,) if expert else (cap, num_topk)
    rows_shape = (num_ranks, s_cap, num_topk) if expert else (num_ranks, s_cap)
    out_types = [
        _like(x, (cap, hidden), x.dtype),                       # recv_x
        _like(x, (cap, scales.shape[1]), jnp.float32),          # recv_scales
        _like(x, idx_shape, jnp.int32),                         # recv_topk_idx
        _like(x, idx_shape, jnp.float32),                       # recv_topk_weights
        _like(x, (num_local if expert else 0,), jnp.int32),     # group_sizes
        _like(x, (), jnp.int32),                                # num_recv_rows
        _like(x, (num_local,), jnp.int32),                      # num_tokens_per_expert
        _like(x, (), jnp.int32),                                # num_dropped
        _like(x, rows_shape, jnp.int32),                        # recv_rows
        _like(x, (cap,), jnp.int32),                            # row_src
        _like(x, (num_ranks,), jnp.int32),                      # recv_count
    ]
    node_in, node_out = (), ()
    if cfg.num_nodes > 1:
        node_in = _node_positions(cfg, send_pos)                # node_pos, tokens_per_node
        node_out = [_like(x, (cfg.num_nodes, num_tokens, cfg.num_ranks_per_node), jnp.int32),
                    _like(x, (cfg.num_nodes,), jnp.int32)]     # fwd_slots, node_recv_count
    outs = jax.ffi.ffi_call(_target(cfg, "dispatch"), out_types + list(node_out))(
        x, scales, topk_idx, topk_weights, pos_in_src, send_pos, layout.num_tokens_per_rank,
        layout.num_tokens_per_expert, *node_in, workspace_id=np.int64(cfg.workspace_id),
        num_experts=np.int64(cfg.num_experts), recv_capacity=np.int64(cap),
        expert_alignment=np.int64(cfg.expert_alignment), send_capacity=np.int64(s_cap),
        expert_layout=expert)
    (recv_x, recv_scales, recv_idx, recv_w, group_sizes, num_recv_rows, per_expert, num_dropped,
     recv_rows, row_src, recv_count) = outs[:len(out_types)]
    nodes = {}
    if cfg.num_nodes > 1:
        nodes = dict(node_pos=node_in[0], fwd_slots=outs[-2], node_recv_count=outs[-1])
    handle = DispatchHandle(cfg, send_pos, recv_rows, row_src, recv_w if expert else None,
                            recv_count, **nodes)
    return DispatchResult(
        recv_x=recv_x, recv_x_scales=None if x_scales is None else recv_scales,
        recv_topk_idx=recv_idx, recv_topk_weights=recv_w,
        group_sizes=group_sizes if expert else None, num_recv_rows=num_recv_rows,
        num_tokens_per_expert=per_expert, num_dropped=num_dropped,
        num_invalid=layout.num_invalid, handle=handle)


def _return(handle: DispatchHandle, rows, mode: int, weights=None):
    """Every rank sends a value per received slot back to its source; sums over ranks.

    rows: [C, W] (or [C] for RETURN_GATHER_K). Returns [T, W] rows.dtype ([T, K] f32 for
    RETURN_GATHER_K)."""
    cfg = handle.config
    out_shape = (cfg.num_tokens, cfg.num_topk if mode == RETURN_GATHER_K else rows.shape[1])
    if weights is None:
        weights = jnp.zeros((0,), jnp.float32)
    return jax.ffi.ffi_call(_target(cfg, "combine"), _like(rows, out_shape, rows.dtype))(
        rows, handle.recv_rows, handle.recv_count, weights, handle.send_pos, *_node_fields(handle),
        workspace_id=np.int64(cfg.workspace_id), mode=np.int64(mode),
        num_topk=np.int64(cfg.num_topk), send_capacity=np.int64(cfg.send_capacity))


def combine(y, handle: DispatchHandle, weights=None):
    """[C, H] rows -> [T, H] (y.dtype; float32 for other input dtypes, e.g. FP8 cotangents)."""
    if y.dtype not in _KERNEL_DTYPES:
        y = y.astype(jnp.float32)
    if handle.config.layout == "token":
        return _return(handle, y, RETURN_ROWS)
    return _return(handle, y, RETURN_WEIGHTED, weights)


def weights_to_slots(handle: DispatchHandle, row_grads):
    """Row-weight gradients -> [T, K] float32 at their source slots (see xla.py)."""
    row_grads = row_grads.astype(jnp.float32)
    if handle.config.layout == "token":
        return _return(handle, row_grads, RETURN_ROWS)
    return _return(handle, row_grads, RETURN_GATHER_K)


def broadcast_to_rows(handle: DispatchHandle, values):
    """values [T, ...] -> [C, ...]: every receive row gets its token's value (cached layout)."""
    cfg = handle.config
    shape = (cfg.recv_capacity,) + values.shape[1:]
    return jax.ffi.ffi_call(_target(cfg, "broadcast"), _like(values, shape, values.dtype))(
        values, handle.send_pos, handle.row_src, *_node_fields(handle),
        workspace_id=np.int64(cfg.workspace_id), send_capacity=np.int64(cfg.send_capacity))


def peer_copy(buffer, src, include_self: bool = False):
    """The NVLink ceiling (benchmarks only; per shard): block d of src goes to rank d's staging.

    src: [R, n] any dtype, n * itemsize a multiple of 16. Returns [] int32 (1 once every peer's
    blocks have landed). Marked side-effecting so loops of it are not hoisted or merged.
    """
    return jax.ffi.ffi_call("jax_ep_peer_copy", _like(src, (), jnp.int32), has_side_effect=True)(
        src, workspace_id=np.int64(buffer.workspace_id), include_self=bool(include_self))
