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
    # Nodes of the EP axis (Buffer.num_ranks_per_node consecutive ranks each). combine reduces
    # inside each node first (see docs/api.md); > 1 selects the internode kernels on "cuda".
    num_nodes: int = 1

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.num_ranks

    @property
    def num_ranks_per_node(self) -> int:
        return self.num_ranks // self.num_nodes


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
      Internode kernels (backend "cuda", N = num_nodes > 1, G = ranks per node), else None:
      node_pos: [T, N] int32 message slot of token t in the block sent to node n (its ranks
        with the same local index as this one forward it), -1 if none.
      fwd_slots: [N, T, G] int32 on the forwarder: for the q-th message from node n, the slot
        its token took at local rank j of this node, -1 where it went nowhere.
      node_recv_count: [N] int32 messages this rank forwarded from each node.
    """

    config: DispatchConfig
    send_pos: Array
    recv_rows: Array
    row_src: Array
    row_weights: Optional[Array] = None
    recv_count: Optional[Array] = None
    node_pos: Optional[Array] = None
    fwd_slots: Optional[Array] = None
    node_recv_count: Optional[Array] = None


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


# ---------------------------------------------------------------- low-latency (decode) mode


@dataclasses.dataclass(frozen=True)
class LowLatencyConfig:
    """Static description of one low-latency call site (hashable; pytree metadata).

    M = max_tokens (the Buffer's ll_max_tokens_per_rank): every local expert receives into R * M
    rows, enough for every token of every rank.
    """

    axis_name: Any
    backend: str
    num_ranks: int
    num_experts: int
    num_tokens: int  # T <= M, rows of x on each rank
    hidden: int  # H
    num_topk: int  # K
    max_tokens: int  # M
    use_fp8: bool
    workspace_id: int = 0  # backend "cuda": the Buffer's low-latency workspace

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.num_ranks

    @property
    def expert_capacity(self) -> int:
        return self.num_ranks * self.max_tokens


@dataclasses.dataclass(frozen=True)
class LowLatencyHandle:
    """What a low-latency combine needs from its dispatch (R ranks, T tokens, K top-k).

    Attributes:
      slot_rows: [R, T, K] int32 on the experts' rank: packed receive row (local expert j,
        row r) = j * R * M + r of entry k of token t of source s; -1 where that expert is not
        on this rank (or the source is masked), -2 where it is but the row did not fit.
      slot_weights: [R, T, K] float32 routing weight of each such entry (0 elsewhere).
      token_dests: [T] int32 on the source: bit d set when a top-k expert of token t is on rank d.
      token_sent: [T] int32: the ranks of token_dests the token was actually sent to (not masked).
    """

    config: LowLatencyConfig
    slot_rows: Array
    slot_weights: Array
    token_dests: Array
    token_sent: Array


@dataclasses.dataclass(frozen=True)
class LowLatencyPending:
    """An exchange in flight between a send and its receive (low-latency dispatch or combine).

    Attributes:
      ticket: [2] int32 (generation, buffer parity) of the send; the receive checks it on the
        device (a receive without its send, or two sends in flight on one parity, is an error).
      failed_ranks: [R] int32 mask the send ran with (non-zero = skipped rank).
      handle: the dispatch's LowLatencyHandle (combine); for dispatch, backend "xla", the
        partial handle of the source side (token_dests / token_sent), None on "cuda" (its
        receive computes them).
      blocks: what the receive reads besides the staging: backend "xla", the exchanged arrays
        it lays out; "cuda" combine, {"y": the expert outputs} (a rank's own partials are summed
        by the receive, never staged); "cuda" dispatch, {"x", "topk_idx", "topk_weights"} of the
        send (its own tokens are placed by the receive).
    """

    config: LowLatencyConfig
    ticket: Array
    failed_ranks: Array
    handle: Optional[LowLatencyHandle]
    blocks: Optional[Any] = None


@dataclasses.dataclass(frozen=True)
class LowLatencyDispatchResult:
    """What a low-latency dispatch returns on each rank (L = local experts, M = max tokens).

    Attributes:
      recv_x: [L, R * M, H] bfloat16, or float8_e4m3fn with use_fp8: expert-major rows; rows
        of expert j from source s are rows [begin, begin + count) of recv_range[j, s], in token
        order; rows >= recv_count[j] are unspecified on backend "cuda" (zeros on "xla").
      recv_x_scales: [L, R * M, H // 128] float32 per-128-channel scales (use_fp8), else None:
        x = recv_x * scale.
      recv_count: [L] int32 rows stored per local expert.
      recv_src: [L, R * M] int32 source of each row as s * M + t; -1 beyond recv_count.
      recv_range: [L, R, 2] int32 (begin, count) of each source's rows per expert (count
        before any drop: rows past R * M are dropped).
      num_dropped: [] int32 rows that did not fit (only possible with repeated experts per token).
      handle: LowLatencyHandle for combine.
    """

    recv_x: Array
    recv_x_scales: Optional[Array]
    recv_count: Array
    recv_src: Array
    recv_range: Array
    num_dropped: Array
    handle: LowLatencyHandle


@dataclasses.dataclass(frozen=True)
class LowLatencyCombineResult:
    """Attributes:
      out: [T, H] bfloat16: sum over the token's experts of weight * expert output.
      num_missing: [T] int32 ranks holding experts of the token whose outputs are missing
        (masked as failed at dispatch or combine); 0 everywhere without failed ranks.
    """

    out: Array
    num_missing: Array


_pytree(LowLatencyHandle, meta=("config",))
_pytree(LowLatencyPending, meta=("config",))
_pytree(LowLatencyDispatchResult)
_pytree(LowLatencyCombineResult)
