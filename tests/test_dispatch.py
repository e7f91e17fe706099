"""dispatch / combine / get_dispatch_layout against the independent numpy model (numpy_model.py).

Data movement (recv_x, scales, ids, weights, counts) and combine are compared bit-exactly: the
contract fixes the float32 accumulation order, so combine is deterministic and reproducible.
Inputs are fresh random every run (the ``rng`` fixture prints its seed).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jax_ep
import numpy_model as nm
from cases import (DTYPES, assert_bits_equal, assert_float_equal, make_inputs, make_routing,
                   random_values, split)
from conftest import make_buffer, make_mesh


# ------------------------------------------------------------------------------------------------
# Per-shard harness
# ------------------------------------------------------------------------------------------------
def shard_jit(mesh, f):
    return jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P("ep"), out_specs=P("ep")))


def build_dispatch_combine(mesh, buf, *, num_experts, layout, recv_capacity, expert_alignment,
                           fp8, identity):
    """jit(shard_map(...)) running dispatch, combine(y) and (optionally) combine(recv_x)."""
    seen = {}

    def f(args):
        x = (args["x"], args["scales"]) if fp8 else args["x"]
        res = jax_ep.dispatch(buf, x, args["idx"], args["w"], num_experts=num_experts,
                              layout=layout, recv_capacity=recv_capacity,
                              expert_alignment=expert_alignment)
        seen["scales_is_none"] = res.recv_x_scales is None
        seen["group_sizes_is_none"] = res.group_sizes is None
        out = {
            "recv_x": res.recv_x,
            "recv_topk_idx": res.recv_topk_idx,
            "recv_topk_weights": res.recv_topk_weights,
            "num_tokens_per_expert": res.num_tokens_per_expert,
            "num_recv_rows": jnp.reshape(res.num_recv_rows, (1,)),
            "num_dropped": jnp.reshape(res.num_dropped, (1,)),
            "num_invalid": jnp.reshape(res.num_invalid, (1,)),
            "combine": jax_ep.combine(buf, args["y"], res.handle),
        }
        for name in ("num_recv_rows", "num_dropped", "num_invalid"):
            seen[name + "_shape"] = jnp.shape(getattr(res, name))
        if res.recv_x_scales is not None:
            out["recv_x_scales"] = res.recv_x_scales
        if res.group_sizes is not None:
            out["group_sizes"] = res.group_sizes
        if identity:
            out["identity"] = jax_ep.combine(buf, res.recv_x, res.handle)
        return out

    return shard_jit(mesh, f), seen


class Case(NamedTuple):
    R: int
    T: int
    H: int
    K: int
    E: int
    layout: str
    A: int
    C: int | None
    dtype: str
    mode: str

    def __str__(self):
        c = "default" if self.C is None else self.C
        return (f"R{self.R}-T{self.T}-H{self.H}-K{self.K}-E{self.E}-{self.layout}-A{self.A}-C{c}-"
                f"{self.dtype}-{self.mode}")


CASES = [
    # ---- token layout ----
    Case(2, 7, 8, 2, 4, "token", 1, None, "f32", "random"),
    Case(4, 33, 8, 4, 8, "token", 1, None, "bf16", "random"),
    Case(8, 100, 8, 8, 16, "token", 1, None, "bf16", "random+empty"),
    Case(8, 1, 8, 1, 8, "token", 1, None, "f32", "random"),
    Case(4, 1, 128, 3, 4, "token", 1, None, "fp8", "random"),
    Case(2, 33, 256, 2, 8, "token", 1, None, "fp8", "random+invalid"),
    Case(4, 7, 8, 5, 4, "token", 1, None, "f32", "dup"),
    Case(4, 33, 8, 3, 8, "token", 1, None, "f32", "skew"),
    Case(2, 7, 8, 2, 4, "token", 1, None, "bf16", "none"),
    Case(4, 33, 8, 4, 16, "token", 1, 10, "bf16", "random"),
    Case(8, 7, 8, 2, 8, "token", 1, 1, "f32", "random"),
    Case(2, 100, 8, 6, 32, "token", 1, None, "f16", "invalid+dup"),
    Case(4, 33, 128, 2, 8, "token", 1, 20, "fp8", "skew"),
    Case(8, 33, 8, 8, 64, "token", 1, None, "f32", "random+invalid+empty"),
    Case(2, 1, 8, 1, 2, "token", 1, None, "bf16", "invalid"),
    # ---- expert layout ----
    Case(2, 7, 8, 2, 4, "expert", 1, None, "f32", "random"),
    Case(4, 33, 8, 4, 8, "expert", 4, None, "bf16", "random"),
    Case(8, 100, 8, 8, 16, "expert", 8, None, "bf16", "random+empty"),
    Case(8, 1, 8, 1, 8, "expert", 4, None, "f32", "random"),
    Case(4, 1, 128, 3, 4, "expert", 8, None, "fp8", "random"),
    Case(2, 33, 256, 2, 8, "expert", 1, None, "fp8", "invalid"),
    Case(4, 7, 8, 5, 4, "expert", 4, None, "f32", "dup"),
    Case(4, 33, 8, 3, 8, "expert", 8, None, "f32", "skew"),
    Case(2, 7, 8, 2, 4, "expert", 4, None, "bf16", "none"),
    Case(4, 33, 8, 4, 16, "expert", 4, 30, "bf16", "random"),  # C % A != 0, drops
    Case(8, 7, 8, 2, 8, "expert", 8, 5, "f32", "random"),  # C < A
    Case(2, 100, 8, 6, 32, "expert", 1, 50, "f16", "invalid+dup"),
    Case(4, 33, 128, 2, 8, "expert", 4, 16, "fp8", "skew"),
    Case(8, 33, 8, 8, 64, "expert", 4, None, "f32", "random+invalid+empty"),
    Case(2, 7, 8, 1, 2, "expert", 8, 7, "f32", "random"),  # E_local = 1, C < A
    Case(4, 33, 8, 2, 8, "expert", 1, 1, "bf16", "skew"),  # C = 1
    Case(8, 33, 8, 4, 32, "expert", 8, 100, "bf16", "random+dup"),  # truncation mid-group
    Case(2, 1, 8, 3, 4, "expert", 4, None, "f32", "dup+invalid"),
    # ---- T = 0 tokens per rank (T is static, so every rank has none): empty results ----
    Case(4, 0, 8, 2, 8, "token", 1, None, "f32", "random"),
    Case(2, 0, 8, 3, 4, "token", 1, 3, "bf16", "random"),
    Case(4, 0, 128, 2, 8, "token", 1, None, "fp8", "random"),
    Case(4, 0, 8, 2, 8, "expert", 4, None, "f32", "random"),
    Case(8, 0, 8, 4, 16, "expert", 1, 5, "f16", "random"),
    Case(2, 0, 256, 2, 4, "expert", 8, None, "fp8", "random"),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_dispatch_combine_matches_model(case, rng):
    run_case(case, rng)


def random_case(rng):
    """A configuration drawn at random (different every run: see the printed seed)."""
    R = int(rng.choice([2, 4, 8]))
    T = int(rng.choice([1, 2, 3, 5, 7, 16, 33, 40]))
    dtype = str(rng.choice(["f32", "bf16", "f16", "fp8"]))
    H = int(rng.choice([128, 256])) if dtype == "fp8" else int(rng.choice([8, 16]))
    K = int(rng.integers(1, 9))
    E = R * int(rng.choice([1, 2, 4, 8]))
    layout = str(rng.choice(["token", "expert"]))
    A = int(rng.choice([1, 4, 8])) if layout == "expert" else 1
    flags = [str(rng.choice(["random", "dup", "skew", "none"], p=[0.55, 0.25, 0.15, 0.05]))]
    if flags[0] == "random" and K > E:
        flags[0] = "dup"
    flags += [f for f in ("empty", "invalid") if rng.random() < 0.3]
    default = nm.default_capacity(layout, R, T, K, E, A)
    C = None if rng.random() < 0.4 else int(rng.integers(1, default + 1))
    return Case(R, T, H, K, E, layout, A, C, dtype, "+".join(flags))


@pytest.mark.parametrize("draw", range(8))
def test_random_configuration_matches_model(draw, rng):
    case = random_case(rng)
    print("case:", case)
    run_case(case, rng)


def run_case(case, rng, exact_products=True, ranks_per_node=None):
    """Runs one configuration and checks every output against the numpy model.

    The contract fixes the order of the float32 accumulation but not whether a compiler contracts
    ``partial + w * y`` into a fused multiply-add (XLA's CPU and GPU backends do, choosing which
    product to fuse). With ``exact_products`` every product is exact in float32, so the result is
    unique and the expert-layout combine is compared bit-exactly too; otherwise it is compared
    within the rounding bound of the products.
    """
    R, T, H, K, E, layout, A, C, dtype, mode = case
    mesh = make_mesh(R)
    fp8 = dtype == "fp8"
    x, scales, idx, w = make_inputs(rng, R, T, H, K, E, dtype, mode, exact_products)
    xs, ss, idxs, ws = split(x, R), split(scales, R), split(idx, R), split(w, R)

    model = nm.dispatch(xs, idxs, ws, num_experts=E, layout=layout, recv_capacity=C,
                        expert_alignment=A, scales=ss)
    cap = model[0].capacity
    if C is None:
        assert cap == nm.default_capacity(layout, R, T, K, E, A)
    y_dtype = DTYPES["bf16"] if fp8 else DTYPES[dtype]
    y = random_values(rng, (R * cap, H), y_dtype, mantissa_bits=16 if exact_products else None)
    ys = split(y, R)
    model_out = nm.combine(ys, model, layout=layout, tokens=T, ranks_per_node=ranks_per_node)

    identity = not fp8 and C is None
    if ranks_per_node is None:
        buf = make_buffer(mesh, tokens=max(T, 1), hidden=H, topk=K)
    else:  # nodes: the reference semantics in one process (the kernels need one per GPU)
        buf = jax_ep.Buffer(mesh, "ep", backend="xla", num_ranks_per_node=ranks_per_node)
    with buf:
        fn, seen = build_dispatch_combine(mesh, buf, num_experts=E, layout=layout,
                                          recv_capacity=C, expert_alignment=A, fp8=fp8,
                                          identity=identity)
        args = {"x": x, "idx": idx, "w": w, "y": y}
        if fp8:
            args["scales"] = scales
        out = jax.device_get(fn(args))
        out2 = jax.device_get(fn(args))

    # --- structure ---
    assert seen["scales_is_none"] == (not fp8)
    assert seen["group_sizes_is_none"] == (layout == "token")
    for name in ("num_recv_rows", "num_dropped", "num_invalid"):
        assert seen[name + "_shape"] == (), f"{name} must be a scalar per rank"
    E_local = E // R
    idx_cols = (K,) if layout == "token" else ()
    assert out["recv_x"].shape == (R * cap, H)
    assert out["recv_topk_idx"].shape == (R * cap, *idx_cols)
    assert out["recv_topk_weights"].shape == (R * cap, *idx_cols)
    assert out["num_tokens_per_expert"].shape == (R * E_local,)
    for name in ("recv_topk_idx", "num_tokens_per_expert", "num_recv_rows", "num_dropped",
                 "num_invalid"):
        assert out[name].dtype == np.int32, name
    assert out["recv_topk_weights"].dtype == np.float32

    # --- data movement, bit-exact, per rank ---
    for r in range(R):
        m = model[r]
        sl = slice(r * cap, (r + 1) * cap)
        tag = f"rank {r} ({case})"
        assert_bits_equal(out["recv_x"][sl], m.recv_x, f"recv_x {tag}")
        if fp8:
            assert_bits_equal(out["recv_x_scales"][sl], m.recv_x_scales, f"recv_x_scales {tag}")
        assert_bits_equal(out["recv_topk_idx"][sl], m.recv_topk_idx, f"recv_topk_idx {tag}")
        assert_bits_equal(out["recv_topk_weights"][sl], m.recv_topk_weights,
                          f"recv_topk_weights {tag}")
        if layout == "expert":
            assert out["group_sizes"].dtype == np.int32
            assert_bits_equal(out["group_sizes"][r * E_local:(r + 1) * E_local], m.group_sizes,
                              f"group_sizes {tag}")
        assert_bits_equal(out["num_tokens_per_expert"][r * E_local:(r + 1) * E_local],
                          m.num_tokens_per_expert, f"num_tokens_per_expert {tag}")
        assert int(out["num_recv_rows"][r]) == m.num_recv_rows, f"num_recv_rows {tag}"
        assert int(out["num_dropped"][r]) == m.num_dropped, f"num_dropped {tag}"
        assert int(out["num_invalid"][r]) == m.num_invalid, f"num_invalid {tag}"

    # --- combine: exact vs the model, and bitwise identical across runs ---
    assert out["combine"].dtype == y_dtype
    if exact_products or layout == "token":
        assert_float_equal(out["combine"], np.concatenate(model_out), f"combine ({case})")
    else:
        # Products rounded or fused: each of the <= R + K additions may differ by one float32
        # rounding of the magnitudes involved, which can flip the rounding of a partial and of
        # the output to y.dtype.
        ys_abs = [np.abs(v.astype(np.float32)) for v in ys]
        mags = np.concatenate(nm.combine(ys_abs, model, layout=layout, tokens=T,
                                         ranks_per_node=ranks_per_node))
        expected = np.concatenate(model_out).astype(np.float32)
        out_eps = float(ml_dtypes.finfo(y_dtype).eps) if y_dtype != np.float32 else 0.0
        bound = (R + K) * 2.0**-23 * mags + out_eps * (mags + np.abs(expected))
        err = np.abs(out["combine"].astype(np.float32) - expected)
        assert np.all(err <= bound), (
            f"combine ({case}) off by up to {np.max(err - bound)} beyond the rounding bound")
    assert_bits_equal(out2["combine"], out["combine"], "combine run-to-run")
    for key in out:
        assert_bits_equal(out2[key], out[key], f"{key} run-to-run")

    # --- round-trip oracle (default capacity never drops) ---
    if identity:
        valid = (idx >= 0) & (idx < E)
        xf = x.astype(np.float32)
        if layout == "expert":
            expected = xf * np.where(valid, w, 0).sum(axis=1, keepdims=True)
        else:
            ranks = np.zeros((R * T, R), bool)
            for i, j in zip(*np.nonzero(valid)):
                ranks[i, idx[i, j] // E_local] = True
            expected = xf * ranks.sum(axis=1, keepdims=True)
        rtol = 1e-5 if dtype == "f32" else 1e-2
        np.testing.assert_allclose(out["identity"].astype(np.float32), expected, rtol=rtol,
                                   atol=0, err_msg=f"identity round trip ({case})")
        assert out["identity"].dtype == DTYPES[dtype]


@pytest.mark.parametrize("case", [
    Case(4, 33, 8, 4, 8, "expert", 4, None, "f32", "random+dup"),
    Case(8, 7, 16, 8, 16, "expert", 1, None, "bf16", "dup"),
    Case(2, 33, 8, 6, 4, "expert", 8, 40, "f16", "dup"),
], ids=str)
def test_full_precision_weights(case, rng):
    """Unconstrained float32 weights and y: data movement exact, combine within rounding."""
    run_case(case, rng, exact_products=False)


NODE_CASES = [
    (Case(4, 33, 8, 4, 8, "token", 1, None, "bf16", "random"), 2),
    (Case(4, 33, 8, 4, 8, "expert", 4, None, "bf16", "random+invalid"), 2),
    (Case(4, 25, 8, 5, 12, "expert", 8, 21, "f16", "invalid+dup"), 1),  # overflow
    (Case(4, 17, 8, 2, 4, "token", 1, 9, "f32", "skew"), 2),
    (Case(8, 33, 8, 8, 16, "token", 1, None, "bf16", "random+empty"), 2),
    (Case(8, 33, 8, 8, 16, "expert", 4, None, "bf16", "dup"), 4),
    (Case(4, 40, 256, 3, 8, "token", 1, None, "fp8", "random"), 2),
    (Case(4, 0, 8, 2, 8, "expert", 4, None, "f32", "random"), 2),
]


@pytest.mark.parametrize("case,per_node", NODE_CASES, ids=lambda v: str(v))
def test_nodes_reduce_inside_each_node_first(case, per_node, rng):
    """num_ranks_per_node < R (the internode kernels' semantics, on backend "xla" here):
    dispatch is unchanged; combine sums each node's ranks, rounds that node partial to y.dtype
    (16-bit) and sums the nodes in order, exactly as the numpy model."""
    run_case(case, rng, ranks_per_node=per_node)


def test_nodes_change_only_the_rounding(rng):
    """The node grouping is visible: bf16 partials per node differ from the flat rank-order sum
    on some tokens (else the test above could not tell the two orders apart)."""
    R, T, H, K, E = 4, 64, 64, 4, 8
    x, _, idx, w = make_inputs(rng, R, T, H, K, E, "bf16", "random")
    models = nm.dispatch(split(x, R), split(idx, R), split(w, R), num_experts=E, layout="token")
    ys = split(random_values(rng, (R * models[0].capacity, H), DTYPES["bf16"]), R)
    flat = np.concatenate(nm.combine(ys, models, layout="token", tokens=T))
    nodes = np.concatenate(nm.combine(ys, models, layout="token", tokens=T, ranks_per_node=2))
    assert np.any(flat != nodes)
    # ... by at most a few bf16 roundings of the magnitudes involved.
    mags = np.concatenate(nm.combine([np.abs(v.astype(np.float32)) for v in ys], models,
                                     layout="token", tokens=T)).astype(np.float32)
    diff = np.abs(nodes.astype(np.float32) - flat.astype(np.float32))
    assert np.all(diff <= 2.0**-6 * mags), np.max(diff - 2.0**-6 * mags)


def test_nodes_gradient_of_dispatch(rng):
    """d dispatch / d x with two nodes of two ranks is the node-grouped unweighted combine."""
    R, T, H, K, E = 4, 21, 16, 3, 8
    mesh = make_mesh(R)
    x, _, idx, w = make_inputs(rng, R, T, H, K, E, "bf16", "random+dup")
    models = nm.dispatch(split(x, R), split(idx, R), split(w, R), num_experts=E, layout="expert",
                         expert_alignment=4)
    cap = models[0].capacity
    ct = random_values(rng, (R * cap, H), DTYPES["bf16"])
    with jax_ep.Buffer(mesh, "ep", backend="xla", num_ranks_per_node=2) as buf:
        def per_shard(x, idx, w, ct):
            _, vjp = jax.vjp(lambda x: jax_ep.dispatch(
                buf, x, idx, w, num_experts=E, layout="expert", expert_alignment=4).recv_x, x)
            return vjp(ct)[0]

        dx = jax.device_get(shard_jit(mesh, per_shard)(x, idx, w, ct))
    want = nm.combine_unweighted(split(ct, R), models, layout="expert", tokens=T,
                                 ranks_per_node=2)
    assert_bits_equal(dx, np.concatenate(want), "d x with 2 nodes x 2 ranks")


def test_default_capacity_equals_explicit(rng):
    """recv_capacity=None behaves exactly like the documented default (both layouts)."""
    R, T, H, K, E, A = 4, 7, 8, 3, 8, 4
    mesh = make_mesh(R)
    x, _, idx, w = make_inputs(rng, R, T, H, K, E, "f32", "random")
    with make_buffer(mesh, tokens=T, hidden=H, topk=K) as buf:
        for layout in ("token", "expert"):
            a = 1 if layout == "token" else A
            cap = nm.default_capacity(layout, R, T, K, E, a)

            def f(x, idx, w, layout=layout, a=a, cap=cap):
                r1 = jax_ep.dispatch(buf, x, idx, w, num_experts=E, layout=layout,
                                     expert_alignment=a)
                r2 = jax_ep.dispatch(buf, x, idx, w, num_experts=E, layout=layout,
                                     recv_capacity=cap, expert_alignment=a)
                return r1.recv_x, r2.recv_x, r1.recv_topk_idx, r2.recv_topk_idx

            o = jax.device_get(shard_jit(mesh, f)(x, idx, w))
            assert o[0].shape == (R * cap, H)
            assert_bits_equal(o[0], o[1], f"recv_x {layout}")
            assert_bits_equal(o[2], o[3], f"recv_topk_idx {layout}")


# ------------------------------------------------------------------------------------------------
# get_dispatch_layout
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("R,T,K,E,mode", [
    (2, 7, 2, 4, "random"),
    (4, 33, 5, 8, "dup+invalid"),
    (8, 1, 3, 16, "random+invalid"),
    (8, 100, 8, 64, "random+empty+invalid"),
    (4, 33, 3, 8, "skew"),
    (2, 7, 4, 4, "none"),
    (4, 0, 3, 8, "random"),  # T = 0: zero counts, [0, R] is_token_in_rank
])
def test_get_dispatch_layout(R, T, K, E, mode, rng):
    mesh = make_mesh(R)
    idx = make_routing(rng, R, T, K, E, mode)

    def f(idx):
        lay = jax_ep.get_dispatch_layout(idx, E, R)
        return {
            "num_tokens_per_rank": lay.num_tokens_per_rank,
            "num_tokens_per_expert": lay.num_tokens_per_expert,
            "is_token_in_rank": lay.is_token_in_rank,
            "num_invalid": jnp.reshape(lay.num_invalid, (1,)),
        }

    out = jax.device_get(shard_jit(mesh, f)(idx))
    assert out["num_tokens_per_rank"].dtype == np.int32
    assert out["num_tokens_per_expert"].dtype == np.int32
    assert out["is_token_in_rank"].dtype == np.bool_
    assert out["num_invalid"].dtype == np.int32
    for r, idx_r in enumerate(split(idx, R)):
        m = nm.dispatch_layout(idx_r, E, R)
        assert_bits_equal(out["num_tokens_per_rank"][r * R:(r + 1) * R], m.num_tokens_per_rank,
                          f"num_tokens_per_rank rank {r}")
        assert_bits_equal(out["num_tokens_per_expert"][r * E:(r + 1) * E],
                          m.num_tokens_per_expert, f"num_tokens_per_expert rank {r}")
        assert_bits_equal(out["is_token_in_rank"][r * T:(r + 1) * T], m.is_token_in_rank,
                          f"is_token_in_rank rank {r}")
        assert int(out["num_invalid"][r]) == m.num_invalid


def test_layout_consistent_with_dispatch(rng):
    """The layout's counts agree with what dispatch receives (sum over source ranks)."""
    R, T, H, K, E = 4, 33, 8, 4, 16
    mesh = make_mesh(R)
    x, _, idx, w = make_inputs(rng, R, T, H, K, E, "f32", "random+invalid+empty")

    def f(x, idx, w):
        lay = jax_ep.get_dispatch_layout(idx, E, R)
        tok = jax_ep.dispatch(buf, x, idx, w, num_experts=E, layout="token")
        exp = jax_ep.dispatch(buf, x, idx, w, num_experts=E, layout="expert")
        return (lay.num_tokens_per_rank, lay.num_tokens_per_expert,
                jnp.reshape(tok.num_recv_rows, (1,)), tok.num_tokens_per_expert,
                exp.num_tokens_per_expert, jnp.reshape(exp.num_recv_rows, (1,)))

    with make_buffer(mesh, tokens=T, hidden=H, topk=K) as buf:
        per_rank, per_expert, tok_rows, tok_tpe, exp_tpe, exp_rows = jax.device_get(
            shard_jit(mesh, f)(x, idx, w))
    per_rank = per_rank.reshape(R, R).sum(0)  # tokens sent to each destination rank
    per_expert = per_expert.reshape(R, E).sum(0)
    np.testing.assert_array_equal(tok_rows, per_rank)
    np.testing.assert_array_equal(tok_tpe, per_expert)
    np.testing.assert_array_equal(exp_tpe, per_expert)
    np.testing.assert_array_equal(exp_rows, per_expert.reshape(R, E // R).sum(1))
