"""jax_ep.nn: the expert-parallel MoE layer against its dense single-device oracle."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

import jax_ep
from conftest import make_mesh
from jax_ep.nn import MoE, Router, RouterBias, dense_reference, route

H, F = 16, 24


def make_moe(num_ranks, *, seed=0, hidden=H, intermediate=F, num_experts=8, top_k=2,
             backend="xla", **kw):
    mesh = make_mesh(num_ranks)
    buf = jax_ep.Buffer(mesh, "ep", backend=backend)
    return MoE(buf, hidden, intermediate, num_experts, top_k, rngs=nnx.Rngs(seed), **kw)


def set_random_bias(moe, rng, scale=0.05):
    bias = rng.normal(size=moe.num_experts).astype(np.float32) * scale
    moe.router.bias[...] = jnp.asarray(bias)


CONFIGS = {
    "softmax": dict(),
    "softmax-unnormalised-shared": dict(norm_topk_prob=False, num_shared_experts=1),
    "sigmoid": dict(scoring="sigmoid", routed_scaling_factor=2.5),
    "sigmoid-grouped-bias-shared": dict(scoring="sigmoid", n_group=4, topk_group=2,
                                        score_bias=True, num_shared_experts=2,
                                        routed_scaling_factor=2.5),
    "softmax-grouped-k3": dict(n_group=2, topk_group=1, top_k=3, expert_alignment=4),
}
CASES = [("softmax", 2), ("softmax-unnormalised-shared", 4), ("sigmoid", 8),
         ("sigmoid-grouped-bias-shared", 2), ("sigmoid-grouped-bias-shared", 8),
         ("softmax-grouped-k3", 4), ("softmax", 8)]


@pytest.mark.parametrize("name,num_ranks", CASES)
def test_moe_matches_dense(name, num_ranks, rng):
    kw = dict(CONFIGS[name])
    moe = make_moe(num_ranks, seed=int(rng.integers(1 << 30)), **kw)
    if moe.router.bias is not None:
        set_random_bias(moe, rng)
    batch, seq = 2 * num_ranks, 5
    x = jnp.asarray(rng.normal(size=(batch, seq, H)).astype(np.float32))
    out = jax.jit(lambda x: moe(x, return_aux=True))(x)
    ref = dense_reference(moe, x, return_aux=True)
    assert out.output.shape == x.shape and out.output.dtype == x.dtype
    np.testing.assert_allclose(np.asarray(out.output), np.asarray(ref.output),
                               atol=1e-5, rtol=1e-5)
    assert int(out.num_dropped) == 0  # default capacity: worst case, never drops
    np.testing.assert_array_equal(np.asarray(out.expert_counts), np.asarray(ref.expert_counts))
    assert int(np.sum(out.expert_counts)) == batch * seq * moe.top_k
    np.testing.assert_allclose(float(out.aux_loss), float(ref.aux_loss), rtol=1e-5)


def test_moe_eager_and_any_leading_dims(rng):
    moe = make_moe(4, num_shared_experts=1)
    x = jnp.asarray(rng.normal(size=(3, 4, H)).astype(np.float32))  # batch 3: 12 tokens / 4
    np.testing.assert_allclose(np.asarray(moe(x)), np.asarray(dense_reference(moe, x)),
                               atol=1e-5, rtol=1e-5)
    x2 = x.reshape(12, H)
    np.testing.assert_allclose(np.asarray(moe(x2)), np.asarray(moe(x)).reshape(12, H),
                               atol=1e-6, rtol=1e-6)


def test_moe_bfloat16_compute(rng):
    moe = make_moe(4, dtype=jnp.bfloat16, num_shared_experts=1)
    x = jnp.asarray(rng.normal(size=(4, 8, H)).astype(np.float32))
    out = jax.jit(moe)(x)
    ref = dense_reference(moe, x)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=5e-2, rtol=5e-2)
    # bfloat16 in, bfloat16 out.
    out16 = jax.jit(moe)(x.astype(jnp.bfloat16))
    assert out16.dtype == jnp.bfloat16


def test_expert_weights_are_sharded_over_ep():
    moe = make_moe(4, num_experts=8)
    for w in (moe.w_gate, moe.w_up, moe.w_down):
        shards = w[...].addressable_shards
        assert len(shards) == 4
        assert all(s.data.shape[0] == 2 for s in shards)  # E_local = 2 per rank
    assert isinstance(moe.router.kernel, nnx.Param)


def _expected_drops(counts, num_ranks, capacity, alignment):
    """Rows the expert layout cannot store, from the global per-expert counts."""
    counts = np.asarray(counts).reshape(num_ranks, -1)
    dropped = 0
    for per_rank in counts:
        offset = 0
        for c in per_rank:
            dropped += c - int(np.clip(capacity - offset, 0, c))
            offset += -(-int(c) // alignment) * alignment
    return dropped


@pytest.mark.parametrize("factor,alignment", [(0.5, 1), (1.0, 4)])
def test_capacity_factor_drops(factor, alignment, rng):
    num_ranks, batch, seq = 4, 4, 8
    moe = make_moe(num_ranks, capacity_factor=factor, expert_alignment=alignment)
    t_local = batch * seq // num_ranks
    cap = moe.recv_capacity(t_local)
    assert cap == -(-math.ceil(factor * t_local * moe.top_k) // alignment) * alignment
    x = jnp.asarray(rng.normal(size=(batch, seq, H)).astype(np.float32))
    out = jax.jit(lambda x: moe(x, return_aux=True))(x)
    want = _expected_drops(out.expert_counts, num_ranks, cap, alignment)
    assert int(out.num_dropped) == want
    # A generous factor stores everything and equals the dense layer.
    big = make_moe(num_ranks, capacity_factor=float(num_ranks * 2), expert_alignment=alignment)
    got = big(x, return_aux=True)
    assert int(got.num_dropped) == 0
    np.testing.assert_allclose(np.asarray(got.output), np.asarray(dense_reference(big, x)),
                               atol=1e-5, rtol=1e-5)


def test_tokens_must_divide_ranks():
    moe = make_moe(4)
    with pytest.raises(ValueError, match="multiple of the EP ranks"):
        moe(jnp.zeros((1, 7, H)))
    with pytest.raises(ValueError, match="num_experts"):
        make_moe(4, num_experts=6)


@pytest.mark.parametrize("kw", [dict(), dict(scoring="sigmoid", num_shared_experts=1)],
                         ids=["softmax", "sigmoid-shared"])
def test_check_grads(kw):
    """Finite differences of the whole layer (output and aux loss) w.r.t. input and params.

    The routing is piecewise constant: the fixed seed keeps every top-k margin far above the
    finite-difference step (asserted), so the layer is smooth around the test point.
    """
    moe = make_moe(2, seed=3, hidden=8, intermediate=8, num_experts=4, top_k=2, **kw)
    x = jax.random.normal(jax.random.key(7), (2, 4, 8), jnp.float32)
    graphdef, params, rest = nnx.split(moe, nnx.Param, ...)
    scores = route(moe.router.config, params["router"]["kernel"][...], x.reshape(-1, 8)).scores
    top = np.sort(np.asarray(scores), axis=1)[:, ::-1]
    assert np.min(top[:, 1] - top[:, 2]) > 1e-3

    def f(x, params):
        out = nnx.merge(graphdef, params, rest)(x, return_aux=True)
        return out.output, out.aux_loss

    check_grads(f, (x, params), order=1, modes=("rev",), eps=1e-4, atol=1e-2, rtol=1e-2)


def test_router_gets_gradients_through_combine_and_aux():
    moe = make_moe(4, score_bias=True)
    x = jax.random.normal(jax.random.key(1), (4, 4, H), jnp.float32)
    graphdef, params, rest = nnx.split(moe, nnx.Param, ...)

    @jax.jit
    def grads(params, x):
        def loss(params, aux_coef):
            out = nnx.merge(graphdef, params, rest)(x, return_aux=True)
            return jnp.sum(out.output ** 2) + aux_coef * out.aux_loss
        return jax.grad(loss)(params, 0.0), jax.grad(lambda p: loss(p, 1.0) - loss(p, 0.0))(params)

    g_main, g_aux = grads(params, x)
    for g in (g_main, g_aux):
        assert float(jnp.abs(g["router"]["kernel"][...]).max()) > 0
    # The aux loss depends only on the router.
    assert float(jnp.abs(g_aux["w_gate"][...]).max()) < 1e-6
    # The score-correction bias is not a trainable parameter.
    assert not any(isinstance(v, RouterBias) for v in jax.tree.leaves(
        params, is_leaf=lambda v: isinstance(v, nnx.Variable)))


def test_router_bias_changes_selection_only(rng):
    router = Router(H, 8, 2, scoring="sigmoid", score_bias=True, rngs=nnx.Rngs(0))
    x = jnp.asarray(rng.normal(size=(32, H)).astype(np.float32))
    base = router(x)
    router.bias[...] = jnp.zeros(8).at[5].set(10.0)  # expert 5 always wins a slot
    biased = router(x)
    np.testing.assert_array_equal(np.asarray(biased.scores), np.asarray(base.scores))
    assert np.all(np.any(np.asarray(biased.topk_idx) == 5, axis=1))
    assert not np.array_equal(np.asarray(biased.topk_idx), np.asarray(base.topk_idx))
    # The weights come from the unbiased scores of the selected experts.
    picked = np.take_along_axis(np.asarray(base.scores), np.asarray(biased.topk_idx), axis=1)
    np.testing.assert_allclose(np.asarray(biased.topk_weights),
                               picked / picked.sum(1, keepdims=True), rtol=1e-6)
    # update_bias: overloaded experts go down, underloaded go up.
    router.bias[...] = jnp.zeros(8)
    counts = jnp.array([10, 0, 4, 4, 4, 4, 4, 2])
    router.update_bias(counts, 0.01)
    want = 0.01 * np.sign(np.mean(np.asarray(counts)) - np.asarray(counts))
    np.testing.assert_allclose(np.asarray(router.bias[...]), want, rtol=1e-6)


def test_group_limited_routing_stays_in_groups(rng):
    router = Router(H, 16, 4, scoring="sigmoid", n_group=4, topk_group=2, rngs=nnx.Rngs(1))
    x = jnp.asarray(rng.normal(size=(64, H)).astype(np.float32))
    res = router(x)
    groups = np.asarray(res.topk_idx) // 4
    assert all(len(set(g)) <= 2 for g in groups)
    # The chosen groups are the two with the largest top-2 score sums.
    s = np.asarray(res.scores).reshape(64, 4, 4)
    sums = np.sort(s, axis=2)[:, :, -2:].sum(-1)
    best = np.argsort(-sums, axis=1, kind="stable")[:, :2]
    for t in range(64):
        assert set(groups[t]) <= set(best[t])
