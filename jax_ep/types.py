"""Pytree dataclasses returned by the public ops (see docs/api.md for the full contract)."""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax

Array = jax.Array


def _pytree(cls, meta=()):
    fields = [f.name for f in dataclasses.fields(cls)]
    data = [f for f in fields if f not in meta]
    return jax.tree_util.register_dataclass(cls, data_fields=data, meta_fields=list(meta))


@dataclasses.dataclass(frozen=True)
class DispatchConfig:
    """Static description of one dispatch call site (hashable; lives in pytree metadata)."""

    axis_name: Any
    backend: str
    layout: str  # "token" | "expert"
    num_ranks: int
    num_experts: int
    num_tokens: int  # T, rows of x on each rank
    num_topk: int  # K
    recv_capacity: int  # C
    send_capacity: int  # S, static rows per destination rank in the exchange
    expert_alignment: int  # A
    checked: bool = False
    workspace_id: int = 0  # backend "cuda": the Buffer's device workspace

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.num_ranks


@dataclasses.dataclass(frozen=True)
class DispatchLayout:
    """Routing layout of one rank's tokens (DeepEP's layout step).

    Attributes:
      num_tokens_per_rank: [R] int32, tokens with at least one valid expert on rank r.
      num_tokens_per_expert: [E] int32, valid (token, k) slots per expert.
      is_token_in_rank: [T, R] bool.
      num_invalid: [] int32, entries of topk_idx outside [-1, E).
    """

    num_tokens_per_rank: Array
    num_tokens_per_expert: Array
    is_token_in_rank: Array
    num_invalid: Array


@dataclasses.dataclass(frozen=True)
class DispatchHandle:
    """Opaque routing state cached by dispatch for combine and the backward passes.

    Reference-backend fields (R ranks, S = send_capacity, C = recv_capacity):
      send_pos: [T, R] int32, slot of token t in the block sent to rank d, -1 if not sent.
      recv_rows: [R, S] (token layout) or [R, S, K] (expert layout) int32, receive row of each
        incoming (source rank, slot[, k]); C when it was not stored (absent or dropped).
      row_src: [C] int32, flat source slot (s * S + i) of each receive row, -1 when empty.
      row_weights: [C] float32 routing weight of each row (expert layout), else None.
      recv_count: [R] int32 tokens each source routed here (backend "cuda"), else None.
    """

    config: DispatchConfig
    send_pos: Array
    recv_rows: Array
    row_src: Array
    row_weights: Optional[Array] = None
    recv_count: Optional[Array] = None


@dataclasses.dataclass(frozen=True)
class DispatchResult:
    """What dispatch returns on each rank; shapes per docs/api.md (C = recv_capacity).

    Attributes:
      recv_x: [C, H] x.dtype received rows (zeros where no data).
      recv_x_scales: [C, H // 128] float32 for an FP8 input pair, else None.
      recv_topk_idx: token layout [C, K] int32 local expert ids or -1;
        expert layout [C] int32 local expert of each row or -1.
      recv_topk_weights: token layout [C, K] float32; expert layout [C] float32.
      group_sizes: expert layout [E_local] int32 rows per group incl. padding; token layout None.
      num_recv_rows: [] int32 rows holding data (expert layout: excluding padding).
      num_tokens_per_expert: [E_local] int32 stored (token, local expert) pairs per expert.
      num_dropped: [] int32 rows that did not fit recv_capacity.
      num_invalid: [] int32 entries of this rank's topk_idx outside [-1, E).
      handle: DispatchHandle for combine.
    """

    recv_x: Array
    recv_x_scales: Optional[Array]
    recv_topk_idx: Array
    recv_topk_weights: Array
    group_sizes: Optional[Array]
    num_recv_rows: Array
    num_tokens_per_expert: Array
    num_dropped: Array
    num_invalid: Array
    handle: DispatchHandle


_pytree(DispatchLayout)
_pytree(DispatchHandle, meta=("config",))
_pytree(DispatchResult)
