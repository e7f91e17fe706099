"""Public per-shard ops: argument checks, static configuration and custom_vjp.

dispatch' = combine and combine' = dispatch with the cached handle (see docs/api.md).
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import checkify

from . import backends
from .buffer import Buffer
from .layout import check_topk_idx, static_int
from .types import DispatchConfig, DispatchHandle, DispatchResult

FP8_BLOCK = 128  # channels per FP8 scale
_FLOAT_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
_LAYOUTS = ("token", "expert")


def _backend_module(backend: str) -> backends.Backend:
    return backends.get(backend)


def _axis_size(axis_name) -> int:
    try:
        return lax.axis_size(axis_name)
    except NameError:
        raise ValueError(
            f"jax_ep ops are per-shard functions: call them inside jax.shard_map over the mesh "
            f"axis {axis_name!r} (it is not bound here)") from None


def default_recv_capacity(layout: str, num_ranks: int, num_tokens: int, num_topk: int,
                          num_local_experts: int, expert_alignment: int = 1) -> int:
    """Receive rows that can never overflow (the worst case of docs/api.md)."""
    if layout not in _LAYOUTS:
        raise ValueError(f"layout must be one of {_LAYOUTS}, got {layout!r}")
    num_ranks = static_int("num_ranks", num_ranks)
    num_tokens = static_int("num_tokens", num_tokens, minimum=0)
    num_topk = static_int("num_topk", num_topk, minimum=0)
    num_local_experts = static_int("num_local_experts", num_local_experts)
    expert_alignment = static_int("expert_alignment", expert_alignment)
    if layout == "token":
        return max(num_ranks * num_tokens, 1)
    rows = num_ranks * num_tokens * num_topk + num_local_experts * (expert_alignment - 1)
    return max(-(-rows // expert_alignment) * expert_alignment, 1)


def _split_x(x, num_tokens: int):
    """Returns (x, scales or None) after checking the plain or FP8-pair input."""
    if isinstance(x, (tuple, list)):
        if len(x) != 2:
            raise ValueError("an FP8 x must be a pair (x_e4m3 [T, H], scales [T, H // 128])")
        x, scales = x
        if x.dtype != jnp.float8_e4m3fn:
            raise TypeError(f"FP8 dispatch needs x of dtype float8_e4m3fn, got {x.dtype}")
        if x.ndim != 2 or x.shape[1] % FP8_BLOCK:
            raise ValueError(f"FP8 x must be [T, H] with H a multiple of {FP8_BLOCK}, got {x.shape}")
        want = (x.shape[0], x.shape[1] // FP8_BLOCK)
        if scales.shape != want or scales.dtype != jnp.float32:
            raise ValueError(f"FP8 scales must be float32 {want}, got {scales.dtype} {scales.shape}")
    else:
        scales = None
        if x.ndim != 2:
            raise ValueError(f"x must be [T, H], got shape {x.shape}")
        if x.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"x must be bfloat16/float16/float32 or an FP8 pair, got {x.dtype}")
    if x.shape[0] != num_tokens:
        raise ValueError(f"x has {x.shape[0]} rows but topk_idx has {num_tokens}")
    return x, scales


def make_config(buffer: Buffer, num_tokens: int, num_topk: int, *, num_experts: int, layout: str,
                recv_capacity: Optional[int], expert_alignment: int) -> DispatchConfig:
    """Checks the static arguments of a dispatch call site and freezes them."""
    if buffer.closed:
        raise ValueError(f"{buffer!r} is closed")
    num_ranks = _axis_size(buffer.axis_name)
    if num_ranks != buffer.num_ranks:
        raise ValueError(f"axis {buffer.axis_name!r} has {num_ranks} ranks here but the Buffer was "
                         f"made for {buffer.num_ranks}")
    if layout not in _LAYOUTS:
        raise ValueError(f"layout must be one of {_LAYOUTS}, got {layout!r}")
    num_experts = static_int("num_experts", num_experts, meaning="E, the global number of experts")
    expert_alignment = static_int("expert_alignment", expert_alignment,
                                  meaning="expert groups are padded to a multiple of it")
    num_local = num_experts // num_ranks
    if recv_capacity is None:
        recv_capacity = default_recv_capacity(layout, num_ranks, num_tokens, num_topk, num_local,
                                              expert_alignment)
    recv_capacity = static_int("recv_capacity", recv_capacity,
                               meaning="receive rows per rank, or None for the no-drop default")
    # Token layout never keeps more than C rows from one source; the expert layout may need
    # any of a source's tokens, so it sends up to all T of them.
    send_capacity = num_tokens if layout == "expert" else min(num_tokens, recv_capacity)
    return DispatchConfig(
        axis_name=buffer.axis_name, backend=buffer.backend, layout=layout, num_ranks=num_ranks,
        num_experts=num_experts, num_tokens=num_tokens, num_topk=num_topk,
        recv_capacity=recv_capacity, send_capacity=max(send_capacity, 1),
        expert_alignment=expert_alignment, checked=buffer.checked,
        workspace_id=buffer.workspace_id,
        num_nodes=buffer.num_ranks // buffer.num_ranks_per_node)


# ---------------------------------------------------------------- dispatch with its VJP


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _dispatch(cfg: DispatchConfig, x, x_scales, topk_idx, topk_weights):
    return _backend_module(cfg.backend).dispatch(cfg, x, x_scales, topk_idx, topk_weights)


def _dispatch_fwd(cfg, x, x_scales, topk_idx, topk_weights):
    res = _dispatch(cfg, x, x_scales, topk_idx, topk_weights)
    return res, (res.handle, res.recv_topk_idx)


def _dispatch_bwd(cfg, saved, ct: DispatchResult):
    handle, recv_topk_idx = saved
    impl = _backend_module(cfg.backend)
    # Each row is a copy of its token: the token's gradient is the (unweighted) sum of its rows.
    dx = impl.combine(ct.recv_x, handle).astype(ct.recv_x.dtype)  # recv_x has x's dtype
    dscales = None if ct.recv_x_scales is None else impl.combine(ct.recv_x_scales, handle)
    if cfg.layout == "token":
        # Entries of experts on other ranks are constant zeros: their cotangent goes nowhere.
        dw_rows = jnp.where(recv_topk_idx >= 0, ct.recv_topk_weights, 0.0)
    else:
        dw_rows = ct.recv_topk_weights + ct.handle.row_weights  # both alias the row weights
    dw = impl.weights_to_slots(handle, dw_rows)
    return dx, dscales, None, dw


_dispatch.defvjp(_dispatch_fwd, _dispatch_bwd)


def dispatch(buffer: Buffer, x, topk_idx, topk_weights, *, num_experts: int,
             layout: str = "token", recv_capacity: Optional[int] = None,
             expert_alignment: int = 1) -> DispatchResult:
    """Sends each token to the ranks holding its top-k experts (per shard, inside shard_map).

    Args:
      buffer: the EP group (jax_ep.Buffer).
      x: [T, H] bfloat16/float16/float32, or an FP8 pair (x_e4m3 [T, H] float8_e4m3fn,
        scales [T, H // 128] float32).
      topk_idx: [T, K] int32 global expert ids; -1 = not routed; other ids outside [0, E) are
        ignored like -1 and counted in num_invalid.
      topk_weights: [T, K] float32 routing weights.
      num_experts: E (static), a multiple of the number of ranks.
      layout: "token" (a row per token and rank) or "expert" (a row per token and local expert,
        grouped by expert, for jax.lax.ragged_dot).
      recv_capacity: static receive rows C (default: the worst case, never drops).
      expert_alignment: expert layout: each group is padded to a multiple of this.

    Returns:
      DispatchResult (see its docstring and docs/api.md).
    """
    check_topk_idx(topk_idx, num_experts, buffer.num_ranks)
    num_tokens, num_topk = topk_idx.shape
    x, scales = _split_x(x, num_tokens)
    if topk_weights.shape != topk_idx.shape:
        raise ValueError(f"topk_weights {topk_weights.shape} must match topk_idx {topk_idx.shape}")
    if topk_weights.dtype != jnp.float32:
        raise TypeError(f"topk_weights must be float32, got {topk_weights.dtype}")
    cfg = make_config(buffer, num_tokens, num_topk, num_experts=num_experts, layout=layout,
                      recv_capacity=recv_capacity, expert_alignment=expert_alignment)
    buffer.check_fits(num_tokens, x.shape[1], num_topk)  # after the axis check: clearer first
    res = _dispatch(cfg, x, scales, topk_idx, topk_weights)
    if cfg.checked:
        checkify.check(res.num_invalid == 0,
                       "jax_ep.dispatch: {n} topk_idx entries outside [-1, num_experts)",
                       n=res.num_invalid)
        checkify.check(res.num_dropped == 0,
                       f"jax_ep.dispatch: {{n}} rows dropped: recv_capacity {cfg.recv_capacity} "
                       "is too small", n=res.num_dropped)
    return res


# ---------------------------------------------------------------- combine with its VJP


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _combine(cfg: DispatchConfig, y, handle: DispatchHandle):
    impl = _backend_module(cfg.backend)
    return impl.combine(y, handle, handle.row_weights).astype(y.dtype)


def _combine_fwd(cfg, y, handle):
    return _combine(cfg, y, handle), (y, handle)


def _combine_bwd(cfg, saved, dout):
    y, handle = saved
    impl = _backend_module(cfg.backend)
    rows = impl.broadcast_to_rows(handle, dout)  # [C, H]: each row gets its token's cotangent
    if cfg.layout == "token":
        return rows.astype(y.dtype), _none_like(handle)
    rows = rows.astype(jnp.float32)
    dy = (handle.row_weights[:, None] * rows).astype(y.dtype)
    dw = jnp.sum(rows * y.astype(jnp.float32), axis=1)
    return dy, _none_like(handle, row_weights=dw)


def _none_like(handle: DispatchHandle, row_weights=None) -> DispatchHandle:
    return DispatchHandle(handle.config, None, None, None, row_weights, None)


_combine.defvjp(_combine_fwd, _combine_bwd)


def combine(buffer: Buffer, y, handle: DispatchHandle):
    """Brings expert outputs back to their tokens and reduces them (per shard).

    Args:
      buffer: the EP group that dispatched.
      y: [C, H] bfloat16/float16/float32, one row per dispatch receive row.
      handle: DispatchResult.handle of that dispatch.

    Returns:
      [T, H] y.dtype. Token layout: sum of the token's rows over ranks. Expert layout: sum of
      weight * row over its (rank, expert) rows. float32 accumulation in a fixed order.
    """
    cfg = handle.config
    if cfg.axis_name != buffer.axis_name or cfg.num_ranks != buffer.num_ranks:
        raise ValueError("combine: the handle comes from a dispatch over another EP group")
    if y.ndim != 2 or y.shape[0] != cfg.recv_capacity:
        raise ValueError(f"combine: y must be [{cfg.recv_capacity}, H] (the dispatch's "
                         f"recv_capacity rows), got {y.shape}")
    if y.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"combine: y must be bfloat16/float16/float32, got {y.dtype}")
    _axis_size(cfg.axis_name)
    buffer.check_fits(cfg.num_tokens, y.shape[1], cfg.num_topk)
    return _combine(cfg, y, handle)
