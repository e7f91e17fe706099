"""Independent numpy model of the jax_ep API contract (docs/api.md).

Written straight from the contract text with plain loops: clarity over speed. It must never import
jax_ep: it is the oracle the "xla" reference backend and every kernel backend are tested against.

All functions take the *global* inputs as lists over source ranks (``xs[s]`` is rank ``s``'s
``[T, H]`` x, ``idxs[s]`` its ``[T, K]`` topk_idx, ``ws[s]`` its ``[T, K]`` topk_weights) and return
per-rank results (lists indexed by rank).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import ml_dtypes
import numpy as np

__all__ = [
    "align_up",
    "default_capacity",
    "ModelLayout",
    "ModelDispatch",
    "dispatch_layout",
    "dispatch",
    "combine",
    "combine_unweighted",
    "topk_weights_grad",
]


def align_up(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def default_capacity(layout: str, num_ranks: int, tokens: int, topk: int, num_experts: int,
                     expert_alignment: int = 1) -> int:
    """Default recv_capacity C of the contract (at least one row, also when T = 0)."""
    if layout == "token":
        return max(num_ranks * tokens, 1)
    if layout == "expert":
        a = expert_alignment
        e_local = num_experts // num_ranks
        return max(align_up(num_ranks * tokens * topk + e_local * (a - 1), a), 1)
    raise ValueError(layout)


def _is_valid(e: int, num_experts: int) -> bool:
    return 0 <= e < num_experts


def _is_invalid(e: int, num_experts: int) -> bool:
    return e != -1 and not _is_valid(e, num_experts)


# --------------------------------------------------------------------------------------------
# get_dispatch_layout
# --------------------------------------------------------------------------------------------
@dataclass
class ModelLayout:
    num_tokens_per_rank: np.ndarray  # [R] int32
    num_tokens_per_expert: np.ndarray  # [E] int32
    is_token_in_rank: np.ndarray  # [T, R] bool
    num_invalid: int


def dispatch_layout(topk_idx: np.ndarray, num_experts: int, num_ranks: int) -> ModelLayout:
    """get_dispatch_layout for one rank's ``[T, K]`` topk_idx (purely local)."""
    topk_idx = np.asarray(topk_idx)
    T, K = topk_idx.shape
    E, R = num_experts, num_ranks
    e_local = E // R
    per_expert = np.zeros(E, np.int32)
    in_rank = np.zeros((T, R), bool)
    invalid = 0
    for t in range(T):
        for k in range(K):
            e = int(topk_idx[t, k])
            if _is_valid(e, E):
                per_expert[e] += 1
                in_rank[t, e // e_local] = True
            elif _is_invalid(e, E):
                invalid += 1
    per_rank = in_rank.sum(axis=0).astype(np.int32)
    return ModelLayout(per_rank, per_expert, in_rank, invalid)


# --------------------------------------------------------------------------------------------
# dispatch
# --------------------------------------------------------------------------------------------
@dataclass
class ModelDispatch:
    """Everything ``dispatch`` returns on one rank, plus the row map used by ``combine``."""

    recv_x: np.ndarray
    recv_x_scales: np.ndarray | None
    recv_topk_idx: np.ndarray
    recv_topk_weights: np.ndarray
    group_sizes: np.ndarray | None
    num_recv_rows: int
    num_tokens_per_expert: np.ndarray
    num_dropped: int
    num_invalid: int
    # Stored rows: token layout -> (pos, s, t); expert layout -> (pos, s, t, k).
    rows: list = field(default_factory=list)
    capacity: int = 0


def dispatch(xs, idxs, ws, *, num_experts: int, layout: str = "token", recv_capacity=None,
             expert_alignment: int = 1, scales=None) -> list[ModelDispatch]:
    """Model of ``dispatch`` for all ranks at once.

    xs: list over source ranks of ``[T, H]`` arrays (any dtype: rows are copied bit-for-bit).
    idxs: list of ``[T, K]`` int arrays. ws: list of ``[T, K]`` float32 arrays.
    scales: None or list of ``[T, H // 128]`` float32 arrays (FP8 pair).
    """
    R = len(xs)
    T, H = xs[0].shape
    K = idxs[0].shape[1]
    E = num_experts
    assert E % R == 0
    e_local = E // R
    A = expert_alignment
    C = (default_capacity(layout, R, T, K, E, A) if recv_capacity is None else recv_capacity)
    x_dtype = xs[0].dtype
    S = None if scales is None else scales[0].shape[1]

    invalid_per_rank = [
        sum(_is_invalid(int(e), E) for e in np.asarray(idxs[s]).reshape(-1)) for s in range(R)
    ]

    out = []
    for r in range(R):
        recv_x = np.zeros((C, H), x_dtype)
        recv_scales = None if scales is None else np.zeros((C, S), np.float32)
        tpe = np.zeros(e_local, np.int32)
        rows = []
        dropped = 0

        if layout == "token":
            recv_idx = np.full((C, K), -1, np.int32)
            recv_w = np.zeros((C, K), np.float32)
            entries = []
            for s in range(R):
                for t in range(T):
                    local = [-1] * K
                    for k in range(K):
                        e = int(idxs[s][t, k])
                        if _is_valid(e, E) and e // e_local == r:
                            local[k] = e - r * e_local
                    if any(j >= 0 for j in local):
                        entries.append((s, t, local))
            for p, (s, t, local) in enumerate(entries):
                if p >= C:
                    dropped += 1
                    continue
                recv_x[p] = xs[s][t]
                if scales is not None:
                    recv_scales[p] = scales[s][t]
                for k in range(K):
                    if local[k] >= 0:
                        recv_idx[p, k] = local[k]
                        recv_w[p, k] = ws[s][t, k]
                        tpe[local[k]] += 1
                rows.append((p, s, t))
            num_recv = len(rows)
            group_sizes = None

        elif layout == "expert":
            recv_idx = np.full((C,), -1, np.int32)
            recv_w = np.zeros((C,), np.float32)
            groups = [[] for _ in range(e_local)]
            for s in range(R):
                for t in range(T):
                    for k in range(K):
                        e = int(idxs[s][t, k])
                        if _is_valid(e, E) and e // e_local == r:
                            groups[e - r * e_local].append((s, t, k))
            group_sizes = np.zeros(e_local, np.int32)
            offset = 0
            for j in range(e_local):
                count = len(groups[j])
                for q, (s, t, k) in enumerate(groups[j]):
                    pos = offset + q
                    if pos >= C:
                        dropped += 1
                        continue
                    recv_x[pos] = xs[s][t]
                    if scales is not None:
                        recv_scales[pos] = scales[s][t]
                    recv_idx[pos] = j
                    recv_w[pos] = ws[s][t, k]
                    tpe[j] += 1
                    rows.append((pos, s, t, k))
                group_sizes[j] = min(max(align_up(count, A), 0), max(C - offset, 0))
                offset += align_up(count, A)
            num_recv = len(rows)
        else:
            raise ValueError(layout)

        out.append(ModelDispatch(
            recv_x=recv_x, recv_x_scales=recv_scales, recv_topk_idx=recv_idx,
            recv_topk_weights=recv_w, group_sizes=group_sizes, num_recv_rows=num_recv,
            num_tokens_per_expert=tpe, num_dropped=dropped, num_invalid=invalid_per_rank[r],
            rows=rows, capacity=C))
    return out


# --------------------------------------------------------------------------------------------
# combine
# --------------------------------------------------------------------------------------------
def combine(ys, disp: list[ModelDispatch], *, layout: str, tokens: int, weighted: bool = True,
            ranks_per_node: int | None = None):
    """Model of ``combine``: returns a list over ranks of ``[T, H]`` arrays of ``ys[0].dtype``.

    ys: list over ranks of ``[C, H]`` arrays. Accumulation is float32 in the contract's order
    (ranks 0..R-1; within a rank, k in order for the expert layout), then cast. Each expert-layout
    product ``w * y`` is rounded to float32 before it is added (no fused multiply-add), and the
    per-rank partial sum is rounded to ``y.dtype`` before the sum over ranks (it travels in the
    rows' dtype; a no-op for float32).
    ``ranks_per_node`` G < R (several nodes): the ranks of each node are summed first (in order,
    float32), that node partial is rounded to ``y.dtype`` when it is a 16-bit float, and the node
    partials are summed in node order.
    ``weighted=False`` gives the unweighted sum (the contract's d dispatch / d x).
    """
    R = len(ys)
    H = ys[0].shape[1]
    out_dtype = ys[0].dtype
    # values[s][t]: {rank r: the float32 value rank r returns for token t of rank s}
    values = [[{} for _ in range(tokens)] for _ in range(R)]
    if layout == "token":
        for r in range(R):
            for (p, s, t) in disp[r].rows:
                values[s][t][r] = ys[r][p].astype(np.float32)
    elif layout == "expert":
        for r in range(R):
            slot_pos = {}
            for (pos, s, t, k) in disp[r].rows:
                slot_pos[(s, t, k)] = pos
            tokens_here = sorted({(s, t) for (_, s, t, _) in disp[r].rows})
            K = max([k for (_, _, _, k) in disp[r].rows], default=-1) + 1
            for (s, t) in tokens_here:
                partial = np.zeros(H, np.float32)
                for k in range(K):
                    pos = slot_pos.get((s, t, k))
                    if pos is None:
                        continue
                    yrow = ys[r][pos].astype(np.float32)
                    if weighted:
                        w = np.float32(disp[r].recv_topk_weights[pos])
                        partial = partial + w * yrow
                    else:
                        partial = partial + yrow
                values[s][t][r] = partial.astype(out_dtype).astype(np.float32)  # travels as y.dtype
    else:
        raise ValueError(layout)
    per_node = ranks_per_node or R
    num_nodes = R // per_node
    half = out_dtype in (np.float16, ml_dtypes.bfloat16)
    out = []
    for s in range(R):
        acc = np.zeros((tokens, H), np.float32)
        for t in range(tokens):
            if not values[s][t]:
                continue  # nothing came back: zeros
            for node in range(num_nodes):
                part = np.zeros(H, np.float32)
                for r in range(node * per_node, (node + 1) * per_node):
                    if r in values[s][t]:
                        part = part + values[s][t][r]
                if num_nodes > 1 and half:
                    part = part.astype(out_dtype).astype(np.float32)
                acc[t] = part if num_nodes == 1 else acc[t] + part
        out.append(acc.astype(out_dtype))
    return out


def combine_unweighted(ys, disp, *, layout, tokens, ranks_per_node=None):
    return combine(ys, disp, layout=layout, tokens=tokens, weighted=False,
                   ranks_per_node=ranks_per_node)


def topk_weights_grad(g_recv_w, disp: list[ModelDispatch], idxs, *, num_experts: int, layout: str):
    """Contract's d dispatch / d topk_weights: weight cotangents gathered back to their slots.

    g_recv_w: list over ranks of the cotangent of ``recv_topk_weights`` (``[C, K]`` or ``[C]``).
    Returns a list over source ranks of ``[T, K]`` float32 arrays.
    """
    R = len(idxs)
    T, K = idxs[0].shape
    e_local = num_experts // R
    out = [np.zeros((T, K), np.float32) for _ in range(R)]
    for r in range(R):
        if layout == "token":
            for (p, s, t) in disp[r].rows:
                for k in range(K):
                    e = int(idxs[s][t, k])
                    if _is_valid(e, num_experts) and e // e_local == r:
                        out[s][t, k] += g_recv_w[r][p, k]
        else:
            for (pos, s, t, k) in disp[r].rows:
                out[s][t, k] += g_recv_w[r][pos]
    return out
