"""Low-latency (decode) dispatch/combine: DeepEP's LL mode for JAX (per shard, in shard_map).

For small batches (decoding: up to M = Buffer(ll_max_tokens_per_rank=M) tokens per rank),
where latency decides. Tokens land expert-major in [E_local, R * M, H] receive buffers (FP8
e4m3 + per-128-channel scales cast in the send phase, or bfloat16), ready for a batched or
grouped expert GEMM; combine returns weight * expert output summed per token, bfloat16.

Each op is also two calls, send and receive, so that computation can run while tokens are in
flight::

    pending = ll.dispatch_send(buf, x, topk_idx, topk_weights, num_experts=E)
    pending, h = ll.tie(pending, h)      # attention of the next micro-batch starts after the send
    h = attention(h)
    pending, h = ll.tie(pending, h)      # ... and ends before the receive
    res = ll.dispatch_recv(buf, pending)

The pending value carries a device ticket (generation, buffer parity). Backend "cuda" keeps two
buffers per op (parities): two sends of one op may be in flight at once; a third before the
first is received, or a receive without its send, fails on the device with an error naming the
rank (never a hang). Every rank of the EP axis must issue the same sequence of calls.

Failed ranks: ``failed_ranks`` ([R] int32, non-zero = failed; the same on every live rank) skips
those ranks entirely (nothing is sent to or awaited from them); combine reports per token how
many of its expert ranks did not answer (``num_missing``) and sums the others.

These ops are for inference: they have no gradient (jax.grad raises).
"""
from __future__ import annotations

import functools
import numbers
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

from .buffer import Buffer
from .ops import FP8_BLOCK, _axis_size
from .types import (LowLatencyCombineResult, LowLatencyConfig, LowLatencyDispatchResult,
                    LowLatencyHandle, LowLatencyPending)

__all__ = ["combine", "combine_recv", "combine_send", "dispatch", "dispatch_recv",
           "dispatch_send", "tie"]

# The low-latency kernels' own limit (below comm.h kMaxRanks = 32: their token bitmasks are
# int32 and they build rank masks as (1 << R) - 1).
MAX_RANKS = 16
MAX_TOPK = 32
MAX_LOCAL_EXPERTS = 1024


def _impl(backend: str):
    if backend == "cuda":
        from .backends import cuda_ll  # noqa: PLC0415

        return cuda_ll
    from .backends import xla_ll  # noqa: PLC0415

    return xla_ll


def _config(buffer: Buffer, num_tokens: int, hidden: int, num_topk: int, num_experts,
            use_fp8: bool) -> LowLatencyConfig:
    if buffer.closed:
        raise ValueError(f"{buffer!r} is closed")
    m = buffer.ll_max_tokens_per_rank
    if m is None:
        raise ValueError("low-latency ops need Buffer(..., ll_max_tokens_per_rank=M): it fixes "
                         "the receive shape [E_local, R * M, H] (and sizes backend 'cuda''s "
                         "low-latency workspace)")
    num_ranks = _axis_size(buffer.axis_name)
    if num_ranks != buffer.num_ranks:
        raise ValueError(f"axis {buffer.axis_name!r} has {num_ranks} ranks here but the Buffer was "
                         f"made for {buffer.num_ranks}")
    if num_ranks > MAX_RANKS:
        raise ValueError(f"low-latency ops support up to {MAX_RANKS} ranks, got {num_ranks}")
    if isinstance(num_experts, bool) or not isinstance(num_experts, numbers.Integral) \
            or num_experts < 1:
        raise TypeError(f"num_experts must be a positive int, got {num_experts!r}")
    num_experts = int(num_experts)  # numpy integers too (as jax_ep.dispatch)
    if num_experts % num_ranks or num_experts // num_ranks > MAX_LOCAL_EXPERTS:
        raise ValueError(f"num_experts ({num_experts}) must be a multiple of the {num_ranks} "
                         f"ranks with at most {MAX_LOCAL_EXPERTS} per rank")
    if num_tokens > m:
        raise ValueError(f"{num_tokens} tokens per rank exceed the Buffer's "
                         f"ll_max_tokens_per_rank={m}")
    if not 1 <= num_topk <= MAX_TOPK:
        raise ValueError(f"top-k must be in 1..{MAX_TOPK}, got {num_topk}")
    if hidden % (FP8_BLOCK if use_fp8 else 8):
        raise ValueError(f"hidden ({hidden}) must be a multiple of "
                         f"{FP8_BLOCK if use_fp8 else 8}{' for FP8' if use_fp8 else ''}")
    if buffer.backend == "cuda" and (hidden > buffer.hidden or num_topk > buffer.num_topk):
        raise ValueError(f"this call has H={hidden}, K={num_topk} but the Buffer's low-latency "
                         f"workspace was sized for hidden={buffer.hidden}, "
                         f"num_topk={buffer.num_topk}")
    return LowLatencyConfig(
        axis_name=buffer.axis_name, backend=buffer.backend, num_ranks=num_ranks,
        num_experts=num_experts, num_tokens=num_tokens, hidden=hidden, num_topk=num_topk,
        max_tokens=m, use_fp8=bool(use_fp8), workspace_id=buffer.ll_workspace_id)


def _failed(cfg: LowLatencyConfig, failed_ranks):
    if failed_ranks is None:
        return jnp.zeros((cfg.num_ranks,), jnp.int32)
    failed_ranks = jnp.asarray(failed_ranks)
    if failed_ranks.shape != (cfg.num_ranks,):
        raise ValueError(f"failed_ranks must be [{cfg.num_ranks}], got {failed_ranks.shape}")
    return failed_ranks.astype(jnp.int32)


def _no_grad(name):
    def bwd(*_):
        raise NotImplementedError(
            f"jax_ep.low_latency.{name} has no gradient: the low-latency ops are for inference "
            "(decoding); train with jax_ep.dispatch / jax_ep.combine")
    return bwd


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _dispatch_send(cfg, x, topk_idx, topk_weights, failed):
    return _impl(cfg.backend).dispatch_send(cfg, x, topk_idx, topk_weights, failed)


_dispatch_send.defvjp(lambda cfg, *a: (_dispatch_send(cfg, *a), None), _no_grad("dispatch"))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _combine_send(cfg, y, handle, failed):
    return _impl(cfg.backend).combine_send(cfg, y, handle, failed)


_combine_send.defvjp(lambda cfg, *a: (_combine_send(cfg, *a), None), _no_grad("combine"))


# The unsplit ops: one custom call each where the backend has one (cuda), else send + recv.
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _dispatch(cfg, x, topk_idx, topk_weights, failed):
    impl = _impl(cfg.backend)
    if hasattr(impl, "dispatch"):
        return impl.dispatch(cfg, x, topk_idx, topk_weights, failed)
    return impl.dispatch_recv(cfg, impl.dispatch_send(cfg, x, topk_idx, topk_weights, failed))


_dispatch.defvjp(lambda cfg, *a: (_dispatch(cfg, *a), None), _no_grad("dispatch"))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _combine(cfg, y, handle, failed):
    impl = _impl(cfg.backend)
    if hasattr(impl, "combine"):
        return impl.combine(cfg, y, handle, failed)
    return impl.combine_recv(cfg, impl.combine_send(cfg, y, handle, failed))


_combine.defvjp(lambda cfg, *a: (_combine(cfg, *a), None), _no_grad("combine"))


def dispatch_send(buffer: Buffer, x, topk_idx, topk_weights, *, num_experts: int,
                  use_fp8: bool = True, failed_ranks=None) -> LowLatencyPending:
    """Starts a low-latency dispatch: casts (FP8) and sends each token to its experts' ranks.

    Args:
      buffer: the EP group, created with ll_max_tokens_per_rank=M.
      x: [T, H] bfloat16, T <= M; H a multiple of 128 with use_fp8, else of 8.
      topk_idx: [T, K] int32 global expert ids; entries outside [0, num_experts) (e.g. -1) are
        not routed.
      topk_weights: [T, K] float32, carried to the experts' ranks for combine.
      num_experts: E (static), a multiple of R.
      use_fp8: send float8_e4m3fn rows with per-128-channel float32 scales (else bfloat16).
      failed_ranks: optional [R] int32, non-zero = failed rank (skipped).

    Returns:
      LowLatencyPending for dispatch_recv.
    """
    cfg, failed = _dispatch_config(buffer, x, topk_idx, topk_weights, num_experts, use_fp8,
                                   failed_ranks)
    return _dispatch_send(cfg, x, topk_idx, topk_weights, failed)


def _dispatch_config(buffer, x, topk_idx, topk_weights, num_experts, use_fp8, failed_ranks):
    if topk_idx.ndim != 2 or topk_idx.dtype != jnp.int32:
        raise TypeError(f"topk_idx must be [T, K] int32, got {topk_idx.dtype} {topk_idx.shape}")
    if x.ndim != 2 or x.dtype != jnp.bfloat16:
        raise TypeError(f"x must be [T, H] bfloat16, got {x.dtype} {x.shape}")
    if x.shape[0] != topk_idx.shape[0]:
        raise ValueError(f"x has {x.shape[0]} rows but topk_idx has {topk_idx.shape[0]}")
    if topk_weights.shape != topk_idx.shape or topk_weights.dtype != jnp.float32:
        raise TypeError(f"topk_weights must be float32 {topk_idx.shape}, got "
                        f"{topk_weights.dtype} {topk_weights.shape}")
    cfg = _config(buffer, x.shape[0], x.shape[1], topk_idx.shape[1], num_experts, use_fp8)
    return cfg, _failed(cfg, failed_ranks)


def dispatch_recv(buffer: Buffer, pending: LowLatencyPending) -> LowLatencyDispatchResult:
    """Waits for the tokens of ``dispatch_send`` and lays them out expert-major.

    Returns:
      LowLatencyDispatchResult: recv_x [E_local, R * M, H] (float8_e4m3fn or bfloat16),
      recv_x_scales [E_local, R * M, H // 128] float32 or None, recv_count [E_local] int32,
      recv_src, recv_range, num_dropped and the handle for combine (see its docstring).
    """
    _check_pending(buffer, pending, "dispatch_recv")
    return _impl(pending.config.backend).dispatch_recv(pending.config, pending)


def dispatch(buffer: Buffer, x, topk_idx, topk_weights, *, num_experts: int, use_fp8: bool = True,
             failed_ranks=None) -> LowLatencyDispatchResult:
    """dispatch_send followed by dispatch_recv (arguments and result as those), as one custom
    call on backend "cuda" (nothing can be scheduled in between; same results)."""
    cfg, failed = _dispatch_config(buffer, x, topk_idx, topk_weights, num_experts, use_fp8,
                                   failed_ranks)
    return _dispatch(cfg, x, topk_idx, topk_weights, failed)


def combine_send(buffer: Buffer, y, handle: LowLatencyHandle, *,
                 failed_ranks=None) -> LowLatencyPending:
    """Starts a low-latency combine: each expert rank sends, per received token, the sum over the
    token's experts there of weight * y row (float32, top-k order), rounded to bfloat16.

    Args:
      y: [E_local, R * M, H] bfloat16 expert outputs, rows as in the dispatch's recv_x.
      handle: LowLatencyDispatchResult.handle.
      failed_ranks: optional [R] int32 as in dispatch_send (may name more ranks than it did).
    """
    cfg, failed = _combine_config(buffer, y, handle, failed_ranks)
    return _combine_send(cfg, y, handle, failed)


def _combine_config(buffer, y, handle, failed_ranks):
    cfg = handle.config
    if cfg.axis_name != buffer.axis_name or cfg.workspace_id != buffer.ll_workspace_id:
        raise ValueError("combine_send: the handle comes from a dispatch over another Buffer")
    want = (cfg.num_local_experts, cfg.expert_capacity, cfg.hidden)
    if y.shape != want or y.dtype != jnp.bfloat16:
        raise ValueError(f"combine_send: y must be bfloat16 {list(want)}, got {y.dtype} "
                         f"{list(y.shape)}")
    _axis_size(cfg.axis_name)
    return cfg, _failed(cfg, failed_ranks)


def combine_recv(buffer: Buffer, pending: LowLatencyPending) -> LowLatencyCombineResult:
    """Waits for the partial sums of ``combine_send`` and adds them per token in rank order
    (float32). Returns LowLatencyCombineResult(out [T, H] bfloat16, num_missing [T] int32)."""
    _check_pending(buffer, pending, "combine_recv")
    return _impl(pending.config.backend).combine_recv(pending.config, pending)


def combine(buffer: Buffer, y, handle: LowLatencyHandle, *,
            failed_ranks=None) -> LowLatencyCombineResult:
    """combine_send followed by combine_recv, as one custom call on backend "cuda"."""
    cfg, failed = _combine_config(buffer, y, handle, failed_ranks)
    return _combine(cfg, y, handle, failed)


def tie(pending: LowLatencyPending, *values):
    """Orders ``values`` with an exchange in flight: computation that consumes the returned values
    starts after the send, and a receive of the returned pending waits for whatever produced
    ``values``. Returns (pending, *values). (lax.optimization_barrier; no data is moved.)"""
    return lax.optimization_barrier((pending, *values))


def _check_pending(buffer: Buffer, pending, what: str) -> None:
    if not isinstance(pending, LowLatencyPending):
        raise TypeError(f"{what} takes the LowLatencyPending of a send, got "
                        f"{type(pending).__name__}")
    if pending.config.workspace_id != buffer.ll_workspace_id or buffer.closed:
        raise ValueError(f"{what}: the pending exchange belongs to another (or a closed) Buffer")


def capacity(buffer: Buffer) -> Optional[int]:
    """Receive rows per local expert (R * M), or None without ll_max_tokens_per_rank."""
    m = buffer.ll_max_tokens_per_rank
    return None if m is None else buffer.num_ranks * m
