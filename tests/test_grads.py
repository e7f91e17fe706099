"""Gradients of dispatch / combine (custom_vjp): finite differences and the contract's VJP rules.

custom_vjp only supports reverse mode, so check_grads runs with order=1, modes=("rev",).
Everything is float32 and small.
"""
from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from jax.test_util import check_grads

import jax_ep
import numpy_model as nm
from conftest import make_buffer, make_mesh


# Everything below is (piecewise) linear or smooth; f32 central differences with this step are
# accurate to ~1e-4 relative.
EPS = 1e-2
TOL = dict(atol=2e-2, rtol=2e-2)

R, T, H, K, E = 4, 5, 8, 3, 8
LAYOUT_KW = {
    "token": dict(layout="token"),
    "expert": dict(layout="expert", expert_alignment=4),
}


def shard_jit(mesh, f):
    return jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P("ep"), out_specs=P("ep")))


def inputs(rng):
    """f32 inputs; routing mixes valid, -1, invalid and duplicate entries."""
    x = rng.uniform(-2, 2, size=(R * T, H)).astype(np.float32)
    idx = rng.integers(-1, E, size=(R * T, K))
    idx[rng.random((R * T, K)) < 0.1] = E + 3  # invalid
    idx[0, :] = -1  # a token routed nowhere
    idx[1, :] = 2  # duplicates
    w = rng.uniform(0.1, 1.0, size=(R * T, K)).astype(np.float32)
    return x, idx.astype(np.int32), w


def check(f, args):
    check_grads(f, args, order=1, modes=("rev",), eps=EPS, **TOL)


@pytest.fixture(scope="module")
def mesh():
    return make_mesh(R)


@pytest.fixture(scope="module")
def buf(mesh):
    with make_buffer(mesh, tokens=T, hidden=128, topk=K) as b:
        yield b


@pytest.mark.parametrize("layout", ["token", "expert"])
@pytest.mark.parametrize("capacity", [None, 6])
def test_dispatch_grads(layout, capacity, mesh, buf, rng):
    """d dispatch / d (x, topk_weights) vs finite differences (also with drops)."""
    x, idx, w = inputs(rng)

    def per_shard(x, idx, w):
        res = jax_ep.dispatch(buf, x, idx, w, num_experts=E, recv_capacity=capacity,
                              **LAYOUT_KW[layout])
        return res.recv_x, res.recv_topk_weights

    g = shard_jit(mesh, per_shard)
    check(lambda x, w: g(x, idx, w), (x, w))


@pytest.mark.parametrize("layout", ["token", "expert"])
def test_dispatch_vjp_matches_contract(layout, mesh, buf, rng):
    """The VJP is the unweighted combine of row cotangents / the gather of weight cotangents."""
    x, idx, w = inputs(rng)
    kw = LAYOUT_KW[layout]
    cap = 7 if layout == "token" else 9  # with drops

    def per_shard(x, idx, w):
        res = jax_ep.dispatch(buf, x, idx, w, num_experts=E, recv_capacity=cap, **kw)
        return res.recv_x, res.recv_topk_weights

    g = shard_jit(mesh, per_shard)
    (rx, rw), vjp = jax.vjp(lambda x, w: g(x, idx, w), x, w)
    ct_x = rng.normal(size=rx.shape).astype(np.float32)
    ct_w = rng.normal(size=rw.shape).astype(np.float32)
    dx, dw = jax.device_get(vjp((ct_x, ct_w)))

    split = lambda a: list(np.asarray(a).reshape(R, -1, *np.asarray(a).shape[1:]))  # noqa: E731
    model = nm.dispatch(split(x), split(idx), split(w), num_experts=E, recv_capacity=cap,
                        expert_alignment=kw.get("expert_alignment", 1), layout=layout)
    dx_ref = nm.combine_unweighted(split(ct_x), model, layout=layout, tokens=T)
    dw_ref = nm.topk_weights_grad(split(ct_w), model, split(idx), num_experts=E, layout=layout)
    np.testing.assert_allclose(dx, np.concatenate(dx_ref), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, np.concatenate(dw_ref), rtol=1e-5, atol=1e-5)


def combine_after_dispatch(layout, mesh, buf, rng):
    """(g, x, idx, w, y): g(x, idx, w, y) = combine(y, dispatch(x, idx, w).handle) over the mesh,
    with random inputs and random rows y [R * C, H]."""
    x, idx, w = inputs(rng)
    kw = LAYOUT_KW[layout]
    cap = nm.default_capacity(layout, R, T, K, E, kw.get("expert_alignment", 1))
    y = rng.uniform(-2, 2, size=(R * cap, H)).astype(np.float32)

    def per_shard(x, idx, w, y):
        res = jax_ep.dispatch(buf, x, idx, w, num_experts=E, **kw)
        return jax_ep.combine(buf, y, res.handle)

    return shard_jit(mesh, per_shard), x, idx, w, y


@pytest.mark.parametrize("layout", ["token", "expert"])
def test_combine_grads_wrt_y(layout, mesh, buf, rng):
    g, x, idx, w, y = combine_after_dispatch(layout, mesh, buf, rng)
    check(lambda y: g(x, idx, w, y), (y,))


def test_combine_grads_through_handle_weights(mesh, buf, rng):
    """Expert layout: router weights train through combine (the handle's row weights)."""
    g, x, idx, w, y = combine_after_dispatch("expert", mesh, buf, rng)
    check(lambda w: g(x, idx, w, y), (w,))
    check(lambda w, y: g(x, idx, w, y), (w, y))

    # Not zero: the gradient really reaches topk_weights.
    dw = jax.grad(lambda w: jnp.sum(g(x, idx, w, y) ** 2))(w)
    valid = (idx >= 0) & (idx < E)
    assert np.all(np.asarray(dw)[~valid] == 0)
    assert np.any(np.asarray(dw)[valid] != 0)


def _expert_fn(recv_x, local_id):
    """Elementwise, expert-dependent, nonlinear 'expert' (row-wise, so padding rows are inert)."""
    scale = 1.0 + 0.25 * local_id.astype(jnp.float32)
    return jnp.tanh(recv_x) * scale[:, None] + 0.1 * recv_x * recv_x


@pytest.mark.parametrize("layout", ["token", "expert"])
def test_composite_dispatch_expert_combine(layout, mesh, buf, rng):
    x, idx, w = inputs(rng)
    kw = LAYOUT_KW[layout]

    def per_shard(x, idx, w):
        res = jax_ep.dispatch(buf, x, idx, w, num_experts=E, **kw)
        if layout == "expert":
            y = _expert_fn(res.recv_x, res.recv_topk_idx)
        else:
            # Caller reduces its local experts into the row (DeepEP normal mode).
            y = jnp.zeros_like(res.recv_x)
            for k in range(K):
                wk = res.recv_topk_weights[:, k:k + 1]
                y = y + wk * _expert_fn(res.recv_x, res.recv_topk_idx[:, k])
        return jax_ep.combine(buf, y, res.handle)

    g = shard_jit(mesh, per_shard)
    check(lambda x, w: g(x, idx, w), (x, w))

    # Matches a dense (no communication) reference of the same MoE, value and gradient.
    def dense(x, w):
        valid = (idx >= 0) & (idx < E)
        local = jnp.where(valid, idx % (E // R), 0)
        out = jnp.zeros_like(x)
        for k in range(K):
            out = out + jnp.where(valid[:, k:k + 1], w[:, k:k + 1], 0.0) * _expert_fn(
                x, local[:, k])
        return out

    np.testing.assert_allclose(g(x, idx, w), dense(x, w), rtol=1e-5, atol=1e-5)
    loss = lambda fn: (lambda x, w: jnp.sum(jnp.sin(fn(x, w))))  # noqa: E731
    gx, gw = jax.grad(loss(lambda x, w: g(x, idx, w)), argnums=(0, 1))(x, w)
    rx, rw = jax.grad(loss(dense), argnums=(0, 1))(x, w)
    np.testing.assert_allclose(gx, rx, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(gw, rw, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layout", ["token", "expert"])
def test_fp8_pair_vjp(layout, mesh, buf, rng):
    """FP8 pairs follow the chain rule literally: cotangents in the input dtypes."""
    Hq = 128
    x = rng.uniform(-2, 2, size=(R * T, Hq)).astype(jnp.float8_e4m3fn)
    scales = rng.uniform(0.1, 4, size=(R * T, 1)).astype(np.float32)
    _, idx, w = inputs(rng)
    kw = LAYOUT_KW[layout]

    def per_shard(x, scales, idx, w):
        res = jax_ep.dispatch(buf, (x, scales), idx, w, num_experts=E, **kw)
        return res.recv_x, res.recv_x_scales

    g = shard_jit(mesh, per_shard)
    (rx, rs), vjp = jax.vjp(lambda x, s: g(x, s, idx, w), x, scales)
    assert rx.dtype == jnp.float8_e4m3fn and rs.dtype == jnp.float32
    # Small integer cotangents: every sum of them is exact in float8_e4m3fn.
    ct_x = rng.choice(np.array([-2.0, -1.0, 1.0, 2.0]), size=rx.shape).astype(jnp.float8_e4m3fn)
    ct_s = rng.normal(size=rs.shape).astype(np.float32)
    dx, ds = jax.device_get(vjp((ct_x, ct_s)))
    assert dx.dtype == jnp.float8_e4m3fn and dx.shape == x.shape
    assert ds.dtype == np.float32 and ds.shape == scales.shape

    split = lambda a: list(np.asarray(a).reshape(R, -1, *np.asarray(a).shape[1:]))  # noqa: E731
    model = nm.dispatch(split(x), split(idx), split(w), num_experts=E, scales=split(scales),
                        expert_alignment=kw.get("expert_alignment", 1), layout=layout)
    ct_x32 = [c.astype(np.float32) for c in split(ct_x)]
    dx_ref = np.concatenate(nm.combine_unweighted(ct_x32, model, layout=layout, tokens=T))
    ds_ref = np.concatenate(nm.combine_unweighted(split(ct_s), model, layout=layout, tokens=T))
    np.testing.assert_array_equal(dx.astype(np.float32), dx_ref)
    np.testing.assert_allclose(ds, ds_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fp8", [False, True], ids=["f32", "fp8"])
@pytest.mark.parametrize("layout", ["token", "expert"])
def test_grads_with_no_tokens(layout, fp8, mesh, buf, rng):
    """T = 0 tokens per rank: dispatch -> expert -> combine differentiates to empty cotangents
    for x / scales / topk_weights and to zeros for the receive rows y (no row holds data)."""
    hidden = 128 if fp8 else H
    kw = LAYOUT_KW[layout]
    cap = nm.default_capacity(layout, R, 0, K, E, kw.get("expert_alignment", 1))
    x = np.zeros((0, hidden), jnp.float8_e4m3fn if fp8 else np.float32)
    scales = np.zeros((0, hidden // 128), np.float32)
    idx = np.zeros((0, K), np.int32)
    w = np.zeros((0, K), np.float32)
    y = rng.uniform(-2, 2, size=(R * cap, hidden)).astype(np.float32)

    def per_shard(x, scales, w, y, idx):
        res = jax_ep.dispatch(buf, (x, scales) if fp8 else x, idx, w, num_experts=E, **kw)
        assert res.recv_x.shape == (cap, hidden)
        rows = res.recv_x.astype(jnp.float32)
        if fp8:
            rows = rows * jnp.repeat(res.recv_x_scales, 128, axis=1)
        out = jax_ep.combine(buf, jnp.tanh(rows) + y, res.handle)
        return out, jnp.sum(rows, axis=1), jnp.reshape(res.num_recv_rows, (1,))

    g = shard_jit(mesh, per_shard)
    out, rows, num_rows = jax.device_get(g(x, scales, w, y, idx))
    assert out.shape == (0, hidden) and rows.shape == (R * cap,)
    np.testing.assert_array_equal(rows, 0)
    np.testing.assert_array_equal(num_rows, 0)

    def loss(x, scales, w, y):
        out, rows, _ = g(x, scales, w, y, idx)
        return jnp.sum(out * out) + jnp.sum(jnp.sin(rows))

    argnums = (0, 1, 2, 3) if fp8 else (0, 2, 3)
    grads = jax.device_get(jax.grad(loss, argnums=argnums)(x, scales, w, y))
    want = [a for i, a in enumerate((x, scales, w, y)) if i in argnums]
    for got, ref in zip(grads, want):
        assert got.shape == ref.shape and got.dtype == ref.dtype
    np.testing.assert_array_equal(grads[-1], 0)  # dy: combine of no tokens reads no row
    if not fp8:
        check(lambda y: g(x, scales, w, y, idx)[0], (y,))
