"""Backend "cuda" of the low-latency ops: the custom calls of xla_ffi/low_latency/ (the four
phases, and dispatch / combine as one call each).

Semantics of xla_ll.py. Each phase is one kernel over the Buffer's low-latency workspace
(double-buffered staging, generation and parity kept on the device): a send returns a ticket
[2] int32 (generation, parity) that its receive checks. All four calls are side-effecting (XLA
must neither merge two identical sends nor drop one) and stateless on the host, so they can be
recorded into XLA's CUDA graphs.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .._ffi import result_type
from ..types import (LowLatencyCombineResult, LowLatencyConfig, LowLatencyDispatchResult,
                     LowLatencyHandle, LowLatencyPending)


def _like(ref, shape, dtype):
    return result_type(jax.typeof(ref), shape, dtype)


def _attrs(cfg: LowLatencyConfig) -> dict:
    return dict(workspace_id=np.int64(cfg.workspace_id), num_experts=np.int64(cfg.num_experts),
                max_tokens=np.int64(cfg.max_tokens), use_fp8=bool(cfg.use_fp8))


def _call(target, out_types):
    return jax.ffi.ffi_call(target, out_types, has_side_effect=True)


def dispatch_send(cfg: LowLatencyConfig, x, topk_idx, topk_weights, failed) -> LowLatencyPending:
    (ticket,) = _call("jax_ep_ll_dispatch_send", (_like(x, (2,), jnp.int32),))(
        x, topk_idx, topk_weights, failed, **_attrs(cfg))
    # The receive places this rank's own tokens straight from x (they are never staged) and
    # writes token_dests / token_sent (at EP1 the send only takes the generation).
    return LowLatencyPending(cfg, ticket, failed, None,
                             dict(x=x, topk_idx=topk_idx, topk_weights=topk_weights))


def _recv_types(cfg: LowLatencyConfig, ref):
    num_local, cap, r = cfg.num_local_experts, cfg.expert_capacity, cfg.num_ranks
    h, t, k = cfg.hidden, cfg.num_tokens, cfg.num_topk
    x_dtype = jnp.float8_e4m3fn if cfg.use_fp8 else jnp.bfloat16
    num_scales = h // 128 if cfg.use_fp8 else 0
    return (
        _like(ref, (num_local, cap, h), x_dtype),               # recv_x
        _like(ref, (num_local, cap, num_scales), jnp.float32),  # recv_scales
        _like(ref, (num_local,), jnp.int32),                    # recv_count
        _like(ref, (num_local, cap), jnp.int32),                # recv_src
        _like(ref, (num_local, r, 2), jnp.int32),               # recv_range
        _like(ref, (), jnp.int32),                              # num_dropped
        _like(ref, (r, t, k), jnp.int32),                       # slot_rows
        _like(ref, (r, t, k), jnp.float32),                     # slot_weights
        _like(ref, (t,), jnp.int32),                            # token_dests
        _like(ref, (t,), jnp.int32),                            # token_sent
    )


def _dispatch_result(cfg, outs) -> LowLatencyDispatchResult:
    (recv_x, recv_scales, recv_count, recv_src, recv_range, num_dropped, slot_rows,
     slot_weights, token_dests, token_sent) = outs
    handle = LowLatencyHandle(cfg, slot_rows, slot_weights, token_dests, token_sent)
    return LowLatencyDispatchResult(
        recv_x=recv_x, recv_x_scales=recv_scales if cfg.use_fp8 else None, recv_count=recv_count,
        recv_src=recv_src, recv_range=recv_range, num_dropped=num_dropped, handle=handle)


def dispatch_recv(cfg: LowLatencyConfig, pending: LowLatencyPending) -> LowLatencyDispatchResult:
    outs = _call("jax_ep_ll_dispatch_recv", _recv_types(cfg, pending.ticket))(
        pending.ticket, pending.blocks["x"], pending.blocks["topk_idx"],
        pending.blocks["topk_weights"], pending.failed_ranks, num_tokens=np.int64(cfg.num_tokens),
        hidden=np.int64(cfg.hidden), num_topk=np.int64(cfg.num_topk), **_attrs(cfg))
    return _dispatch_result(cfg, outs)


def dispatch(cfg: LowLatencyConfig, x, topk_idx, topk_weights, failed) -> LowLatencyDispatchResult:
    """dispatch_send + dispatch_recv as ONE custom call (both kernels, one after the other)."""
    t = cfg.num_tokens
    _, token_dests, token_sent, *outs = _call("jax_ep_ll_dispatch", (
        _like(x, (2,), jnp.int32), _like(x, (t,), jnp.int32), _like(x, (t,), jnp.int32),
        *_recv_types(cfg, x)[:-2]))(x, topk_idx, topk_weights, failed, **_attrs(cfg))
    return _dispatch_result(cfg, (*outs, token_dests, token_sent))


def combine_send(cfg: LowLatencyConfig, y, handle: LowLatencyHandle, failed) -> LowLatencyPending:
    ticket = _call("jax_ep_ll_combine_send", _like(y, (2,), jnp.int32))(
        y, handle.slot_rows, handle.slot_weights, failed, **_attrs(cfg))
    # The receive sums this rank's own partials from y (they are never staged).
    return LowLatencyPending(cfg, ticket, failed, handle, dict(y=y))


def combine_recv(cfg: LowLatencyConfig, pending: LowLatencyPending) -> LowLatencyCombineResult:
    t, h = cfg.num_tokens, cfg.hidden
    ref = pending.ticket
    out, num_missing = _call("jax_ep_ll_combine_recv", (
        _like(ref, (t, h), jnp.bfloat16), _like(ref, (t,), jnp.int32)))(
        pending.ticket, pending.blocks["y"], pending.handle.slot_rows,
        pending.handle.slot_weights, pending.handle.token_dests, pending.handle.token_sent,
        pending.failed_ranks, num_topk=np.int64(cfg.num_topk), **_attrs(cfg))
    return LowLatencyCombineResult(out, num_missing)


def combine(cfg: LowLatencyConfig, y, handle: LowLatencyHandle, failed) -> LowLatencyCombineResult:
    """combine_send + combine_recv as ONE custom call."""
    t, h = cfg.num_tokens, cfg.hidden
    _, out, num_missing = _call("jax_ep_ll_combine", (
        _like(y, (2,), jnp.int32), _like(y, (t, h), jnp.bfloat16), _like(y, (t,), jnp.int32)))(
        y, handle.slot_rows, handle.slot_weights, handle.token_dests, handle.token_sent, failed,
        **_attrs(cfg))
    return LowLatencyCombineResult(out, num_missing)
