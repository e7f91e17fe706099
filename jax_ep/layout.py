"""The routing-layout step: which ranks and experts each token goes to (local, no communication)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from . import _ffi
from .types import DispatchLayout


def static_int(name: str, value, *, minimum: int = 1, meaning: str = "") -> int:
    """``value`` as a Python int, for a static (shape-defining) argument.

    Accepts Python ints and numpy integer scalars; rejects everything else (floats such as 2.5 or
    4.0, strings, None, bool, arrays) with a TypeError instead of truncating it, and values below
    ``minimum`` with a ValueError.
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        got = "None" if value is None else f"{type(value).__name__} {value!r}"
        what = f" ({meaning})" if meaning else ""
        raise TypeError(f"{name}{what} must be a static integer (a Python int or a numpy integer "
                        f"scalar), got {got}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {int(value)}")
    return int(value)


def check_topk_idx(topk_idx, num_experts: int, num_ranks: int) -> None:
    if topk_idx.ndim != 2:
        raise ValueError(f"topk_idx must be [T, K], got shape {topk_idx.shape}")
    if topk_idx.dtype != jnp.int32:
        raise TypeError(f"topk_idx must be int32, got {topk_idx.dtype}")
    num_experts = static_int("num_experts", num_experts, meaning="E, the global number of experts")
    num_ranks = static_int("num_ranks", num_ranks, meaning="R, the number of EP ranks")
    if num_experts % num_ranks:
        raise ValueError(
            f"num_experts ({num_experts}) must be a multiple of the number of EP ranks ({num_ranks})")


def valid_mask(topk_idx, num_experts: int):
    """[T, K] bool: entries naming a real expert. -1 and invalid ids are both False."""
    return (topk_idx >= 0) & (topk_idx < num_experts)


def count_invalid(topk_idx, num_experts: int):
    """[] int32: entries outside [-1, E), which are ignored like -1."""
    return jnp.sum((topk_idx < -1) | (topk_idx >= num_experts), dtype=jnp.int32)


def dispatch_layout_xla(topk_idx, num_experts: int, num_ranks: int) -> DispatchLayout:
    """Pure-JAX layout; the oracle of the CUDA layout kernel. Same arguments as below."""
    num_local = num_experts // num_ranks
    valid = valid_mask(topk_idx, num_experts)
    dst_rank = jnp.where(valid, topk_idx // num_local, -1)  # [T, K]
    is_token_in_rank = jnp.any(dst_rank[:, :, None] == jnp.arange(num_ranks)[None, None], axis=1)
    # Invalid slots go to an extra bin that is cut off; integer scatter-adds are exact.
    bins = jnp.where(valid, topk_idx, num_experts).reshape(-1)
    if bins.size:
        per_expert = jnp.zeros(num_experts + 1, jnp.int32).at[bins].add(1)[:num_experts]
    else:  # T = 0: a scatter of nothing would be a constant, not varying like topk_idx
        hits = topk_idx[:, :, None] == jnp.arange(num_experts, dtype=jnp.int32)
        per_expert = jnp.sum(hits, axis=(0, 1), dtype=jnp.int32)
    return DispatchLayout(
        num_tokens_per_rank=jnp.sum(is_token_in_rank, axis=0, dtype=jnp.int32),
        num_tokens_per_expert=per_expert,
        is_token_in_rank=is_token_in_rank,
        num_invalid=count_invalid(topk_idx, num_experts),
    )


def get_dispatch_layout(topk_idx, num_experts: int, num_ranks: int) -> DispatchLayout:
    """DeepEP's layout step for one rank's tokens.

    Args:
      topk_idx: [T, K] int32 expert ids; -1 = not routed; ids outside [-1, E) are ignored and counted.
      num_experts: E, a multiple of num_ranks; expert e lives on rank e // (E // num_ranks).
      num_ranks: R.

    Returns:
      DispatchLayout(num_tokens_per_rank [R] int32, num_tokens_per_expert [E] int32,
      is_token_in_rank [T, R] bool, num_invalid [] int32). On CUDA, when the extension is
      built, this lowers to the `jax_ep_dispatch_layout` custom call; elsewhere to plain JAX.
    """
    check_topk_idx(topk_idx, num_experts, num_ranks)
    num_experts, num_ranks = int(num_experts), int(num_ranks)

    def xla(idx):
        return dispatch_layout_xla(idx, num_experts, num_ranks)

    if not (_ffi.HAS_CUDA_EXTENSION and _ffi.dispatch_layout_supported(num_experts, num_ranks)):
        return xla(topk_idx)

    def cuda(idx):
        return DispatchLayout(*_ffi.dispatch_layout_cuda(idx, num_experts, num_ranks))

    return jax.lax.platform_dependent(topk_idx, cuda=cuda, default=xla)
