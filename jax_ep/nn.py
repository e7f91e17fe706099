"""Flax NNX Mixture-of-Experts layers on top of jax_ep.dispatch / jax_ep.combine.

The modules only own parameters; the math lives in pure functions (`route`,
`load_balance_stats`, `swiglu`) so the same code runs inside the expert-parallel `shard_map`
(`MoE.__call__`) and in the single-device oracle (`dense_reference`).

    mesh = Mesh(np.array(jax.devices()), ("ep",))
    buf = jax_ep.Buffer(mesh, "ep")
    moe = MoE(buf, hidden=64, intermediate=128, num_experts=8, top_k=2, rngs=nnx.Rngs(0))
    y = moe(x)                                  # x: [batch, seq, hidden], plain jit is fine
    out = moe(x, return_aux=True)               # MoEOutput(y, aux_loss, num_dropped, ...)

Inference (decoding) runs the same parameters through the low-latency ops (jax_ep.low_latency,
a Buffer with ll_max_tokens_per_rank):

    y = moe.decode(x)                           # FP8 dispatch, batched expert GEMM, LL combine
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from . import low_latency as ll
from .buffer import Buffer
from .ops import FP8_BLOCK, combine, default_recv_capacity, dispatch

f32 = jnp.float32
SCORINGS = ("softmax", "sigmoid")


# ------------------------------------------------------------------------------ routing


@dataclasses.dataclass(frozen=True)
class RouterConfig:
    """Static routing options (hashable)."""

    num_experts: int
    top_k: int
    scoring: str = "softmax"  # "softmax" | "sigmoid"
    n_group: int = 1  # DeepSeek-V3 group-limited routing: expert groups
    topk_group: int = 1  # groups each token may use
    norm_topk_prob: bool = True  # renormalise the top-k weights to sum to 1
    routed_scaling_factor: float = 1.0  # multiplies the (normalised) weights

    def validate(self) -> None:
        e, k = self.num_experts, self.top_k
        if self.scoring not in SCORINGS:
            raise ValueError(f"scoring must be one of {SCORINGS}, got {self.scoring!r}")
        if not 1 <= k <= e:
            raise ValueError(f"top_k must be in [1, num_experts={e}], got {k}")
        if self.n_group < 1 or e % self.n_group:
            raise ValueError(f"n_group ({self.n_group}) must be >= 1 and divide num_experts ({e})")
        if not 1 <= self.topk_group <= self.n_group:
            raise ValueError(f"topk_group must be in [1, n_group={self.n_group}], "
                             f"got {self.topk_group}")
        if self.n_group > 1 and k > self.topk_group * (e // self.n_group):
            raise ValueError(f"top_k ({k}) exceeds the experts of the {self.topk_group} selected "
                             f"groups ({self.topk_group * (e // self.n_group)})")


class RoutingResult(NamedTuple):
    topk_idx: jax.Array  # [T, K] int32 global expert ids
    topk_weights: jax.Array  # [T, K] float32 combine weights
    scores: jax.Array  # [T, E] float32 router scores (softmax or sigmoid, no bias)


def route(cfg: RouterConfig, kernel, x, bias=None) -> RoutingResult:
    """Top-k routing of tokens x [T, H] with the gate kernel [H, E] (float32 math).

    `bias` [E] (aux-loss-free balancing) is added to the scores for the *selection* only; the
    weights are gathered from the unbiased scores.
    """
    t = x.shape[0]
    e, k = cfg.num_experts, cfg.top_k
    logits = jnp.dot(x.astype(f32), kernel.astype(f32), precision=lax.Precision.HIGHEST)
    scores = jax.nn.softmax(logits, axis=-1) if cfg.scoring == "softmax" else jax.nn.sigmoid(logits)
    choice = scores if bias is None else scores + lax.stop_gradient(bias.astype(f32))[None]
    choice = lax.stop_gradient(choice)
    if cfg.n_group > 1:
        per_group = e // cfg.n_group
        grouped = choice.reshape(t, cfg.n_group, per_group)
        group_scores = lax.top_k(grouped, min(2, per_group))[0].sum(-1)  # [T, n_group]
        _, group_idx = lax.top_k(group_scores, cfg.topk_group)
        keep = jnp.sum(jax.nn.one_hot(group_idx, cfg.n_group, dtype=jnp.int32), axis=1) > 0
        keep = jnp.repeat(keep, per_group, axis=1)  # [T, E]
        choice = jnp.where(keep, choice, -jnp.inf)
    _, topk_idx = lax.top_k(choice, k)
    weights = jnp.take_along_axis(scores, topk_idx, axis=1)
    if cfg.norm_topk_prob:
        weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)
    weights = weights * cfg.routed_scaling_factor
    return RoutingResult(topk_idx.astype(jnp.int32), weights.astype(f32), scores)


def expert_counts(topk_idx, num_experts: int):
    """[E] int32 (token, k) slots routed to each expert."""
    return jnp.zeros(num_experts, jnp.int32).at[topk_idx.reshape(-1)].add(1, mode="drop")


def load_balance_stats(cfg: RouterConfig, routing: RoutingResult, axis_name=None):
    """(aux_loss, counts): Switch/DeepSeek load-balance loss E * sum_e f_e * P_e and the [E]
    per-expert slot counts, over all tokens of the EP group when `axis_name` is given.

    f_e = fraction of the T*K routed slots that chose expert e (not differentiable);
    P_e = mean over tokens of the normalised router score of e (softmax probabilities; sigmoid
    scores divided by their sum over experts). A perfectly balanced router gives 1.
    """
    e, k = cfg.num_experts, cfg.top_k
    probs = routing.scores
    if cfg.scoring == "sigmoid":
        probs = probs / (jnp.sum(probs, axis=-1, keepdims=True) + 1e-20)
    counts = expert_counts(routing.topk_idx, e)
    prob_sum = jnp.sum(probs, axis=0)
    tokens = jnp.asarray(probs.shape[0], f32)
    if axis_name is not None:
        counts = lax.psum(counts, axis_name)
        prob_sum = lax.psum(prob_sum, axis_name)
        tokens = lax.psum(tokens, axis_name)
    frac = counts.astype(f32) / (tokens * k)
    aux_loss = e * jnp.sum(frac * prob_sum / tokens)
    return aux_loss, counts


class RouterBias(nnx.Variable):
    """Score-correction bias of aux-loss-free balancing (DeepSeek-V3). Not trained by gradients
    (optimizers built with wrt=nnx.Param skip it); changed by `Router.update_bias`."""


class Router(nnx.Module):
    """Linear gate [H, E] + scoring + (group-limited) top-k.

    Args:
      hidden: H. num_experts: E. top_k: K.
      scoring: "softmax" or "sigmoid".
      n_group, topk_group: DeepSeek-V3 group-limited routing (groups ranked by the sum of their
        top-2 scores; only the best `topk_group` groups are eligible). n_group=1 disables it.
      norm_topk_prob: renormalise the top-k weights to sum to one.
      routed_scaling_factor: multiplies the final weights.
      score_bias: keep a RouterBias [E] that shifts the selection only (aux-loss-free
        balancing); update it with `update_bias(counts, rate)`.
    """

    def __init__(self, hidden: int, num_experts: int, top_k: int, *, scoring: str = "softmax",
                 n_group: int = 1, topk_group: int = 1, norm_topk_prob: bool = True,
                 routed_scaling_factor: float = 1.0, score_bias: bool = False,
                 param_dtype=f32, rngs: nnx.Rngs):
        self.config = RouterConfig(int(num_experts), int(top_k), scoring, int(n_group),
                                   int(topk_group), bool(norm_topk_prob),
                                   float(routed_scaling_factor))
        self.config.validate()
        init = jax.nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
        self.kernel = nnx.Param(init(rngs.params(), (hidden, num_experts), param_dtype))
        self.bias = RouterBias(jnp.zeros((num_experts,), f32)) if score_bias else None

    def bias_value(self):
        return None if self.bias is None else self.bias[...]

    def __call__(self, x) -> RoutingResult:
        """x [..., H] -> RoutingResult with leading dims flattened to T."""
        x = x.reshape(-1, x.shape[-1])
        return route(self.config, self.kernel[...], x, self.bias_value())

    def aux_loss(self, routing: RoutingResult):
        """Load-balance loss of one (unsharded) batch of routing results."""
        return load_balance_stats(self.config, routing)[0]

    def update_bias(self, counts, rate: float) -> None:
        """Aux-loss-free balancing step: bias_e += rate * sign(mean(counts) - counts_e)
        (overloaded experts become less attractive). `counts` [E]: slots per expert."""
        if self.bias is None:
            raise ValueError("update_bias needs a Router built with score_bias=True")
        counts = jnp.asarray(counts, f32)
        step = rate * jnp.sign(jnp.mean(counts) - counts)
        self.bias[...] = self.bias[...] + step.astype(self.bias[...].dtype)


# ------------------------------------------------------------------------------ experts


def swiglu(x, w_gate, w_up, w_down, dtype):
    """Dense SwiGLU: (silu(x @ w_gate) * (x @ w_up)) @ w_down, f32 accumulation."""
    x = x.astype(dtype)
    g = jnp.dot(x, w_gate.astype(dtype), preferred_element_type=f32)
    u = jnp.dot(x, w_up.astype(dtype), preferred_element_type=f32)
    a = (jax.nn.silu(g) * u).astype(dtype)
    return jnp.dot(a, w_down.astype(dtype), preferred_element_type=f32).astype(dtype)


def grouped_swiglu(rows, group_sizes, w_gate, w_up, w_down, dtype):
    """SwiGLU of each row with its group's expert ([E_local, ...] weights), via ragged_dot."""
    rows = rows.astype(dtype)
    g = lax.ragged_dot(rows, w_gate.astype(dtype), group_sizes, preferred_element_type=f32)
    u = lax.ragged_dot(rows, w_up.astype(dtype), group_sizes, preferred_element_type=f32)
    a = (jax.nn.silu(g) * u).astype(dtype)
    y = lax.ragged_dot(a, w_down.astype(dtype), group_sizes, preferred_element_type=f32)
    return y.astype(dtype)


def batched_swiglu(rows, w_gate, w_up, w_down, dtype):
    """SwiGLU of the expert-major rows [E_local, C, H] with the stacked expert weights
    ([E_local, H, F], [E_local, F, H]) as one batched matmul per projection -> [E_local, C, H]."""
    rows = rows.astype(dtype)
    g = jnp.einsum("ech,ehf->ecf", rows, w_gate.astype(dtype), preferred_element_type=f32)
    u = jnp.einsum("ech,ehf->ecf", rows, w_up.astype(dtype), preferred_element_type=f32)
    a = (jax.nn.silu(g) * u).astype(dtype)
    y = jnp.einsum("ecf,efh->ech", a, w_down.astype(dtype), preferred_element_type=f32)
    return y.astype(dtype)


def dequantize_fp8(q, scales, dtype):
    """FP8 rows [..., H] (float8_e4m3fn) with per-128-channel scales [..., H // 128] -> dtype:
    x = q * scale, the product in float32."""
    h = q.shape[-1]
    blocks = q.astype(f32).reshape(q.shape[:-1] + (h // FP8_BLOCK, FP8_BLOCK))
    return (blocks * scales.astype(f32)[..., None]).reshape(q.shape).astype(dtype)


class MoEOutput(NamedTuple):
    """What `MoE(x, return_aux=True)` returns (statistics are over the whole EP group)."""

    output: jax.Array  # [..., H] x.dtype
    aux_loss: jax.Array  # [] float32 load-balance loss (differentiable through the scores)
    num_dropped: jax.Array  # [] int32 (token, expert) rows that did not fit recv_capacity
    expert_counts: jax.Array  # [E] int32 routed slots per expert (for Router.update_bias)


def _align_up(n: int, a: int) -> int:
    return -(-n // a) * a


def _place(value, sharding: NamedSharding):
    """`value` (the same full array on every process) laid out on `sharding`. A mesh over
    several processes gets each process's own shards only: device_put would first compare the
    values across processes with an XLA collective, which processes sharing a GPU cannot run."""
    if sharding.is_fully_addressable:
        return jax.device_put(value, sharding)
    host = np.asarray(value)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


@dataclasses.dataclass(frozen=True)
class _ShardConfig:
    router: RouterConfig
    num_experts: int
    recv_capacity: Optional[int]
    expert_alignment: int
    dtype: Any
    has_bias: bool
    has_shared: bool
    with_stats: bool  # aux loss, drops and counts over the EP group (psums); else none


@dataclasses.dataclass(frozen=True)
class _DecodeConfig:
    router: RouterConfig
    num_experts: int
    num_tokens: int  # real tokens (all ranks); the rest of the last rank's rows are padding
    tokens_per_rank: int
    use_fp8: bool
    dtype: Any
    has_bias: bool
    has_shared: bool


class MoE(nnx.Module):
    """Expert-parallel MoE feed-forward layer: router -> dispatch -> SwiGLU experts -> combine.

    Expert weights w_gate/w_up [E, H, F] and w_down [E, F, H] are sharded over the Buffer's EP
    axis along E (rank r holds experts r*E_local .. (r+1)*E_local-1) and applied with
    jax.lax.ragged_dot to the expert layout of jax_ep.dispatch. Tokens are sharded over the EP
    axis: the layer runs its own jax.shard_map, so call it on [batch, seq, H] (any leading dims)
    under plain jit; batch*seq must be a multiple of the number of ranks.

    Args:
      buffer: jax_ep.Buffer (mesh, EP axis, backend).
      hidden: H. intermediate: F, per expert. num_experts: E (multiple of the ranks). top_k: K.
      scoring, n_group, topk_group, norm_topk_prob, routed_scaling_factor, score_bias: Router.
      num_shared_experts: dense SwiGLU experts applied to every token (0 = none);
        shared_intermediate: its width (default num_shared_experts * intermediate).
      capacity_factor: None = worst-case receive capacity (never drops); else each rank receives
        at most align_up(ceil(capacity_factor * T_local * K), expert_alignment) rows.
      expert_alignment: rows of each expert group are padded to a multiple of this.
      dtype: compute dtype (float32 / bfloat16); param_dtype: parameter dtype.
    """

    def __init__(self, buffer: Buffer, hidden: int, intermediate: int, num_experts: int,
                 top_k: int, *, scoring: str = "softmax", n_group: int = 1, topk_group: int = 1,
                 norm_topk_prob: bool = True, routed_scaling_factor: float = 1.0,
                 score_bias: bool = False, num_shared_experts: int = 0,
                 shared_intermediate: Optional[int] = None,
                 capacity_factor: Optional[float] = None, expert_alignment: int = 8,
                 dtype=f32, param_dtype=f32, rngs: nnx.Rngs):
        if not isinstance(buffer, Buffer):
            raise TypeError(f"buffer must be a jax_ep.Buffer, got {type(buffer).__name__}")
        num_ranks = buffer.num_ranks
        if num_experts % num_ranks:
            raise ValueError(f"num_experts ({num_experts}) must be a multiple of the EP ranks "
                             f"({num_ranks})")
        if capacity_factor is not None and capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be > 0 or None, got {capacity_factor}")
        if int(expert_alignment) < 1:
            raise ValueError(f"expert_alignment must be >= 1, got {expert_alignment}")
        self.buffer = buffer
        self.hidden, self.intermediate = int(hidden), int(intermediate)
        self.num_experts, self.top_k = int(num_experts), int(top_k)
        self.capacity_factor = None if capacity_factor is None else float(capacity_factor)
        self.expert_alignment = int(expert_alignment)
        self.dtype = jnp.dtype(dtype)
        self.router = Router(hidden, num_experts, top_k, scoring=scoring, n_group=n_group,
                             topk_group=topk_group, norm_topk_prob=norm_topk_prob,
                             routed_scaling_factor=routed_scaling_factor, score_bias=score_bias,
                             param_dtype=param_dtype, rngs=rngs)
        mesh, ax = buffer.mesh, buffer.axis_name
        experts = NamedSharding(mesh, P(ax, None, None))
        replicated = NamedSharding(mesh, P())
        self.router.kernel[...] = _place(self.router.kernel[...], replicated)
        if self.router.bias is not None:
            self.router.bias[...] = _place(self.router.bias[...], replicated)

        def stacked(key, shape):
            init = jax.nn.initializers.variance_scaling(
                1.0, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1, batch_axis=(0,))
            return nnx.Param(_place(init(key, shape, param_dtype), experts))

        e, h, f = num_experts, hidden, intermediate
        self.w_gate = stacked(rngs.params(), (e, h, f))
        self.w_up = stacked(rngs.params(), (e, h, f))
        self.w_down = stacked(rngs.params(), (e, f, h))
        self.num_shared_experts = int(num_shared_experts)
        if num_shared_experts > 0:
            fs = int(shared_intermediate or num_shared_experts * intermediate)
            init = jax.nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")

            def dense(shape):
                return nnx.Param(_place(init(rngs.params(), shape, param_dtype), replicated))

            self.shared_gate, self.shared_up = dense((h, fs)), dense((h, fs))
            self.shared_down = dense((fs, h))
        else:
            self.shared_gate = self.shared_up = self.shared_down = None

    # -------------------------------------------------------------- helpers

    def recv_capacity(self, tokens_per_rank: int) -> int:
        """Receive rows per rank for T_local tokens (the worst case when capacity_factor=None)."""
        r, k, a = self.buffer.num_ranks, self.top_k, self.expert_alignment
        worst = default_recv_capacity("expert", r, tokens_per_rank, k, self.num_experts // r, a)
        if self.capacity_factor is None:
            return worst
        want = _align_up(max(math.ceil(self.capacity_factor * tokens_per_rank * k), 1), a)
        return min(want, worst)

    def update_bias(self, counts, rate: float) -> None:
        """Aux-loss-free balancing: see Router.update_bias (counts from MoEOutput)."""
        self.router.update_bias(counts, rate)

    def _weights(self):
        shared = (self.shared_gate, self.shared_up, self.shared_down)
        shared = tuple(None if v is None else v[...] for v in shared)
        return (self.router.kernel[...], self.router.bias_value(), self.w_gate[...],
                self.w_up[...], self.w_down[...]) + shared

    # -------------------------------------------------------------- forward

    def __call__(self, x, *, return_aux: bool = False):
        """x [..., H] -> [..., H] (or MoEOutput with return_aux=True).

        Only return_aux=True computes the group-wide statistics (the load-balance loss, drops
        and counts: psums over the EP axis); without it the layer runs no XLA collective besides
        what the backend itself needs (backend "cuda": none)."""
        if x.ndim < 2 or x.shape[-1] != self.hidden:
            raise ValueError(f"MoE expects [..., {self.hidden}] inputs, got {x.shape}")
        lead = x.shape[:-1]
        n = int(np.prod(lead))
        r = self.buffer.num_ranks
        if n % r:
            raise ValueError(f"MoE: the number of tokens ({'*'.join(map(str, lead))} = {n}) "
                             f"must be a multiple of the EP ranks ({r})")
        t_local = n // r
        cfg = _ShardConfig(self.router.config, self.num_experts, self.recv_capacity(t_local),
                           self.expert_alignment, self.dtype, self.router.bias is not None,
                           self.num_shared_experts > 0, bool(return_aux))
        ax = self.buffer.axis_name
        args, specs = _layer_args(cfg, ax, x.reshape(n, self.hidden), self._weights())
        fn = _sharded_moe(cfg, self.buffer, tuple(specs))
        if not return_aux:
            return fn(*args).reshape(x.shape)
        y, aux_loss, dropped, counts = fn(*args)
        return MoEOutput(y.reshape(x.shape), aux_loss, dropped, counts)

    def decode(self, x, *, use_fp8: bool = True, buffer: Optional[Buffer] = None):
        """Inference forward through the low-latency ops: x [..., H] -> [..., H] x.dtype.

        The same parameters and router as __call__; per rank: route (float32, as __call__),
        jax_ep.low_latency.dispatch of the bfloat16 tokens (FP8 e4m3 + per-128-channel scales
        with use_fp8, else bfloat16), dequantize to the compute dtype, SwiGLU experts as one
        batched matmul over the expert-major [E_local, R * M, H] rows (rows past recv_count are
        computed too and never read), jax_ep.low_latency.combine (bfloat16), shared experts
        added in the compute dtype. Tokens are sharded over the EP axis; their number need not
        be a multiple of the ranks (the last rows are padded, not routed, and cut off), but at
        most M = buffer.ll_max_tokens_per_rank land on each rank. No gradient (inference).

        Versus __call__ the output differs by the roundings of the low-latency format: tokens
        cast to bfloat16 (or FP8: ~2^-4 relative per element), expert outputs, partial sums and
        the result rounded to bfloat16.

        Args:
          x: [..., H] tokens (any leading dims), any float dtype.
          use_fp8: FP8 dispatch (H a multiple of 128); False: bfloat16 (H a multiple of 8).
          buffer: the Buffer whose low-latency workspace to use (default: the layer's); it
            must be over the same mesh axis and ranks, e.g. one sized for a prefill and one
            for single-token steps.
        """
        if x.ndim < 2 or x.shape[-1] != self.hidden:
            raise ValueError(f"MoE expects [..., {self.hidden}] inputs, got {x.shape}")
        buffer = self.buffer if buffer is None else buffer
        if not isinstance(buffer, Buffer):
            raise TypeError(f"buffer must be a jax_ep.Buffer, got {type(buffer).__name__}")
        if (buffer.mesh, buffer.axis_name) != (self.buffer.mesh, self.buffer.axis_name):
            raise ValueError("MoE.decode: the buffer must be over the layer's mesh and EP axis "
                             f"({self.buffer.axis_name!r}), its experts are sharded there")
        if buffer.ll_max_tokens_per_rank is None:
            raise ValueError("MoE.decode runs the low-latency ops: create the Buffer with "
                             "ll_max_tokens_per_rank=M (tokens per rank per call)")
        n = int(np.prod(x.shape[:-1]))
        r = buffer.num_ranks
        t_local = max(-(-n // r), 1)
        if t_local > buffer.ll_max_tokens_per_rank:
            raise ValueError(f"MoE.decode: {n} tokens over {r} ranks put {t_local} on a rank, "
                             f"more than the Buffer's ll_max_tokens_per_rank="
                             f"{buffer.ll_max_tokens_per_rank}")
        cfg = _DecodeConfig(self.router.config, self.num_experts, n, t_local, bool(use_fp8),
                            self.dtype, self.router.bias is not None, self.num_shared_experts > 0)
        ax = buffer.axis_name
        xf = x.reshape(n, self.hidden)
        if r * t_local != n:
            xf = jnp.pad(xf, ((0, r * t_local - n), (0, 0)))
        args, specs = _layer_args(cfg, ax, xf, self._weights())
        y = _sharded_decode(cfg, buffer, tuple(specs))(*args)
        return y[:n].reshape(x.shape)


def _layer_args(cfg, ax, x, weights):
    """Arguments of a layer's shard_map and their specs: tokens and routed experts sharded over
    the EP axis, router (and bias, shared experts, where cfg has them) replicated. weights:
    MoE._weights()."""
    kernel, bias, wg, wu, wd, sg, su, sd = weights
    args, specs = [x, kernel, wg, wu, wd], [P(ax), P(), P(ax), P(ax), P(ax)]
    if cfg.has_bias:
        args.append(bias)
        specs.append(P())
    if cfg.has_shared:
        args += [sg, su, sd]
        specs += [P()] * 3
    return args, specs


@functools.lru_cache(maxsize=64)
def _sharded_moe(cfg: _ShardConfig, buffer: Buffer, in_specs):
    """jit(shard_map(_moe_shard)): cached per configuration, so eager calls compile once (under
    an outer jit it is simply inlined)."""
    ax = buffer.axis_name

    def shard(*a):
        return _moe_shard(cfg, buffer, *a)

    out_specs = (P(ax), P(), P(), P()) if cfg.with_stats else P(ax)
    return jax.jit(jax.shard_map(shard, mesh=buffer.mesh, in_specs=in_specs,
                                 out_specs=out_specs))


def _moe_shard(cfg: _ShardConfig, buffer: Buffer, x, kernel, wg, wu, wd, *rest):
    """Per-rank body of MoE.__call__: x [T, H] local tokens, w* [E_local, ...] local experts."""
    rest = list(rest)
    bias = rest.pop(0) if cfg.has_bias else None
    ax = buffer.axis_name
    routing = route(cfg.router, kernel, x, bias)
    xc = x.astype(cfg.dtype)
    res = dispatch(buffer, xc, routing.topk_idx, routing.topk_weights,
                   num_experts=cfg.num_experts, layout="expert",
                   recv_capacity=cfg.recv_capacity, expert_alignment=cfg.expert_alignment)
    y = grouped_swiglu(res.recv_x, res.group_sizes, wg, wu, wd, cfg.dtype)
    # Padding / empty rows carry weight 0; zero them so nothing undefined reaches combine.
    y = jnp.where((res.recv_topk_idx >= 0)[:, None], y, jnp.zeros((), y.dtype))
    out = combine(buffer, y, res.handle)
    if cfg.has_shared:
        out = (out.astype(f32) + swiglu(xc, *rest, cfg.dtype).astype(f32)).astype(cfg.dtype)
    out = out.astype(x.dtype)
    if not cfg.with_stats:
        return out
    aux_loss, counts = load_balance_stats(cfg.router, routing, ax)
    return out, aux_loss, lax.psum(res.num_dropped, ax), counts


@functools.lru_cache(maxsize=64)
def _sharded_decode(cfg: _DecodeConfig, buffer: Buffer, in_specs):
    """jit(shard_map(_decode_shard)), cached per configuration like _sharded_moe."""
    def shard(*a):
        return _decode_shard(cfg, buffer, *a)

    return jax.jit(jax.shard_map(shard, mesh=buffer.mesh, in_specs=in_specs,
                                 out_specs=P(buffer.axis_name)))


def _decode_shard(cfg: _DecodeConfig, buffer: Buffer, x, kernel, wg, wu, wd, *rest):
    """Per-rank body of MoE.decode: x [T, H] local tokens (T <= M), w* [E_local, ...]."""
    rest = list(rest)
    bias = rest.pop(0) if cfg.has_bias else None
    routing = route(cfg.router, kernel, x, bias)
    topk_idx = routing.topk_idx
    t = x.shape[0]
    if cfg.num_tokens < cfg.tokens_per_rank * buffer.num_ranks:  # padding rows: not routed
        row = lax.axis_index(buffer.axis_name) * t + jnp.arange(t)
        topk_idx = jnp.where((row < cfg.num_tokens)[:, None], topk_idx, -1)
    res = ll.dispatch(buffer, x.astype(jnp.bfloat16), topk_idx, routing.topk_weights,
                      num_experts=cfg.num_experts, use_fp8=cfg.use_fp8)
    rows = res.recv_x
    if cfg.use_fp8:
        rows = dequantize_fp8(rows, res.recv_x_scales, cfg.dtype)
    y = batched_swiglu(rows, wg, wu, wd, cfg.dtype).astype(jnp.bfloat16)
    out = ll.combine(buffer, y, res.handle).out
    if cfg.has_shared:
        xc = x.astype(cfg.dtype)
        out = (out.astype(f32) + swiglu(xc, *rest, cfg.dtype).astype(f32)).astype(cfg.dtype)
    return out.astype(x.dtype)


# ------------------------------------------------------------------------------ oracle


def dense_reference(moe: MoE, x, *, return_aux: bool = False):
    """The same layer computed densely on one device, without dispatch or capacity limits:
    every expert runs on every token and is weighted by the token's routing weights.

    Matches MoE(x) exactly in semantics (up to float rounding) whenever MoE drops nothing.
    """
    def local(a):  # gathered to the host, then one (the default) device, uncommitted
        return None if a is None else jnp.asarray(np.asarray(a))

    return dense_forward(moe, tuple(map(local, moe._weights())), local(x), return_aux=return_aux)


def dense_forward(moe: MoE, weights, x, *, return_aux: bool = False):
    """dense_reference on given weights (traceable: differentiate it w.r.t. weights or x).

    weights: (router kernel [H, E], bias [E] or None, w_gate [E, H, F], w_up [E, H, F],
    w_down [E, F, H], shared gate/up/down or None), as MoE holds them, on one device.
    """
    kernel, bias, wg, wu, wd, sg, su, sd = weights
    cfg, dtype = moe.router.config, moe.dtype
    xf = x.reshape(-1, x.shape[-1])
    n = xf.shape[0]
    routing = route(cfg, kernel, xf, bias)
    aux_loss, counts = load_balance_stats(cfg, routing)
    comb = jnp.zeros((n, moe.num_experts), f32)
    comb = comb.at[jnp.arange(n)[:, None], routing.topk_idx].add(routing.topk_weights)
    xc = xf.astype(dtype)
    g = jnp.einsum("nh,ehf->enf", xc, wg.astype(dtype), preferred_element_type=f32)
    u = jnp.einsum("nh,ehf->enf", xc, wu.astype(dtype), preferred_element_type=f32)
    a = (jax.nn.silu(g) * u).astype(dtype)
    ye = jnp.einsum("enf,efh->enh", a, wd.astype(dtype), preferred_element_type=f32)
    ye = ye.astype(dtype).astype(f32)
    out = jnp.einsum("enh,ne->nh", ye, comb, precision=lax.Precision.HIGHEST)
    if sg is not None:
        out = out + swiglu(xc, sg, su, sd, dtype).astype(f32)
    out = out.astype(x.dtype).reshape(x.shape)
    if return_aux:
        return MoEOutput(out, aux_loss, jnp.zeros((), jnp.int32), counts)
    return out
