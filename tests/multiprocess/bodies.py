"""Test bodies that run in every process of a multi-process test (see launcher.py).

Each process builds the same global inputs from the seed it is given (numpy), runs the jax_ep
program over the global mesh (one device per process) and checks its own rank's outputs against
the numpy model. Nothing here runs an XLA collective on backend "cuda" (processes sharing a GPU
cannot: NCCL refuses duplicate GPUs); backend "xla" (CPU) exchanges with gloo.
"""
from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jax_ep
import numpy_model as nm
from cases import (DTYPES, assert_bits_equal, assert_float_equal, make_inputs, random_values,
                   split)

__all__ = ["checks", "exchange", "gradients", "moe_layer", "back_to_back", "missing_rank"]


# ------------------------------------------------------------------------------ helpers


class Group:
    """The global EP mesh (one device per process, in process order) and this process's rank.
    ranks_per_node: "virtual nodes" of that many consecutive ranks (None: the host)."""

    def __init__(self, ranks_per_node=None):
        self.ranks_per_node = ranks_per_node
        devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
        self.mesh = Mesh(np.array(devices), ("ep",))
        self.num_ranks = len(devices)
        self.rank = [d.process_index for d in devices].index(jax.process_index())
        on_gpu = devices[0].platform == "gpu"
        self.backend = os.environ.get("JAX_EP_TEST_BACKEND") or ("cuda" if on_gpu else "xla")
        if self.backend == "auto":
            self.backend = "cuda" if on_gpu else "xla"

    def buffer(self, *, tokens, hidden, topk, **kw) -> jax_ep.Buffer:
        buf = jax_ep.Buffer(self.mesh, "ep", backend=self.backend, max_tokens_per_rank=tokens,
                            hidden=hidden, num_topk=topk,
                            num_ranks_per_node=self.ranks_per_node, **kw)
        if self.backend == "cuda":
            assert buf.transport == ("nvshmem" if self.num_ranks > 1 else "p2p"), buf
        # One host here: without virtual nodes, one node.
        assert buf.num_ranks_per_node == (self.ranks_per_node or self.num_ranks), buf
        return buf

    def put(self, host: np.ndarray, spec=P("ep")) -> jax.Array:
        """A global array from the full host value (the same on every process)."""
        host = np.asarray(host)
        return jax.make_array_from_callback(host.shape, NamedSharding(self.mesh, spec),
                                            lambda index: host[index])

    def shard_jit(self, f):
        return jax.jit(jax.shard_map(f, mesh=self.mesh, in_specs=P("ep"), out_specs=P("ep")))

    def mine(self, arr) -> np.ndarray:
        """This rank's block of a global array sharded over "ep"."""
        shards = arr.addressable_shards
        assert len(shards) == 1, shards
        return np.asarray(shards[0].data)

    def blocks(self, tree):
        return jax.tree.map(self.mine, tree)


# ------------------------------------------------------------------------------ dispatch/combine

# T, H, K, experts per rank, layout, alignment, capacity, dtype, routing.
EXCHANGE_CASES = [
    (33, 136, 4, 2, "token", 1, None, "bf16", "random"),
    (33, 136, 4, 2, "expert", 8, None, "bf16", "random"),
    (40, 256, 3, 2, "token", 1, None, "fp8", "random+invalid"),
    (40, 256, 3, 2, "expert", 4, None, "fp8", "dup"),
    (17, 7, 2, 1, "token", 1, None, "f32", "skew"),          # every token to one expert
    (17, 7, 2, 1, "expert", 4, None, "f32", "skew"),
    (25, 40, 5, 3, "token", 1, 9, "f16", "random+empty"),    # capacity overflow
    (25, 40, 5, 3, "expert", 8, 21, "bf16", "invalid+dup"),  # overflow, C % A != 0
    (9, 16, 2, 2, "token", 1, None, "bf16", "none"),          # routed nowhere (-1)
    (9, 16, 2, 2, "expert", 4, None, "bf16", "none"),
    (0, 128, 2, 2, "token", 1, None, "bf16", "random"),       # T = 0
    (0, 256, 2, 2, "expert", 4, None, "fp8", "random"),
]


def _exchange_program(g: Group, buf, *, num_experts, layout, capacity, alignment, fp8):
    def f(args):
        x = (args["x"], args["scales"]) if fp8 else args["x"]
        res = jax_ep.dispatch(buf, x, args["idx"], args["w"], num_experts=num_experts,
                              layout=layout, recv_capacity=capacity, expert_alignment=alignment)
        out = {
            "recv_x": res.recv_x, "recv_topk_idx": res.recv_topk_idx,
            "recv_topk_weights": res.recv_topk_weights,
            "num_tokens_per_expert": res.num_tokens_per_expert,
            "counts": jnp.stack([res.num_recv_rows, res.num_dropped, res.num_invalid]),
            "combine": jax_ep.combine(buf, args["y"], res.handle),
        }
        if fp8:
            out["recv_x_scales"] = res.recv_x_scales
        if layout == "expert":
            out["group_sizes"] = res.group_sizes
        return out

    return g.shard_jit(f)


def exchange(seed: int, ranks_per_node=None) -> dict:
    """Both layouts, BF16/F16/F32/FP8, skew, -1, invalid, overflow, T = 0: bit-exact."""
    g = Group(ranks_per_node)
    R, r = g.num_ranks, g.rank
    sizes = [max(c[j] for c in EXCHANGE_CASES) for j in range(3)]
    with g.buffer(tokens=sizes[0], hidden=sizes[1], topk=sizes[2]) as buf:
        for i, (T, H, K, e_local, layout, A, C, dtype, mode) in enumerate(EXCHANGE_CASES):
            tag = f"rank {r} of {R}, case {i} {(T, H, K, e_local, layout, A, C, dtype, mode)}"
            E = R * e_local
            rng = np.random.default_rng(seed + i)
            fp8 = dtype == "fp8"
            x, scales, idx, w = make_inputs(rng, R, T, H, K, E, dtype, mode)
            models = nm.dispatch(split(x, R), split(idx, R), split(w, R), num_experts=E,
                                 layout=layout, recv_capacity=C, expert_alignment=A,
                                 scales=split(scales, R))
            model, cap = models[r], models[r].capacity
            y_dtype = DTYPES["bf16"] if fp8 else DTYPES[dtype]
            y = random_values(rng, (R * cap, H), y_dtype, mantissa_bits=16)
            want_combine = nm.combine(split(y, R), models, layout=layout, tokens=T,
                                      ranks_per_node=ranks_per_node)[r]
            args = {"x": g.put(x), "idx": g.put(idx), "w": g.put(w), "y": g.put(y)}
            if fp8:
                args["scales"] = g.put(scales)
            fn = _exchange_program(g, buf, num_experts=E, layout=layout, capacity=C,
                                   alignment=A, fp8=fp8)
            out = g.blocks(fn(args))
            assert_bits_equal(out["recv_x"], model.recv_x, f"recv_x {tag}")
            if fp8:
                assert_bits_equal(out["recv_x_scales"], model.recv_x_scales, f"scales {tag}")
            assert_bits_equal(out["recv_topk_idx"], model.recv_topk_idx, f"recv_topk_idx {tag}")
            assert_bits_equal(out["recv_topk_weights"], model.recv_topk_weights,
                              f"recv_topk_weights {tag}")
            assert_bits_equal(out["num_tokens_per_expert"], model.num_tokens_per_expert,
                              f"num_tokens_per_expert {tag}")
            if layout == "expert":
                assert_bits_equal(out["group_sizes"], model.group_sizes, f"group_sizes {tag}")
            counts = [model.num_recv_rows, model.num_dropped, model.num_invalid]
            assert out["counts"].tolist() == counts, (tag, out["counts"].tolist(), counts)
            assert_float_equal(out["combine"], want_combine, f"combine {tag}")
        if buf.backend == "cuda":
            buf.check()
    return {"rank": r, "cases": len(EXCHANGE_CASES), "backend": g.backend}


# ------------------------------------------------------------------------------ gradients


def gradients(seed: int, ranks_per_node=None) -> dict:
    """The VJPs of dispatch (d x, d topk_weights) and combine (d y) against the contract's
    closed forms in the numpy model; all values exact in float32, so compared bitwise."""
    g = Group(ranks_per_node)
    R, r = g.num_ranks, g.rank
    T, H, K, E = 21, 24, 3, 4 * g.num_ranks
    checked = 0
    with g.buffer(tokens=T, hidden=H, topk=K) as buf:
        for i, (layout, A, C) in enumerate([("token", 1, None), ("expert", 4, None),
                                            ("token", 1, 11), ("expert", 4, 13)]):
            rng = np.random.default_rng(seed + 100 + i)
            tag = f"rank {r} of {R}, {layout} C={C}"
            x, _, idx, w = make_inputs(rng, R, T, H, K, E, "f32", "random+invalid+dup")
            models = nm.dispatch(split(x, R), split(idx, R), split(w, R), num_experts=E,
                                 layout=layout, recv_capacity=C, expert_alignment=A)
            cap = models[0].capacity
            idx_g = g.put(idx)

            def disp(x, w, idx, layout=layout, A=A, C=C):
                res = jax_ep.dispatch(buf, x, idx, w, num_experts=E, layout=layout,
                                      recv_capacity=C, expert_alignment=A)
                return res.recv_x, res.recv_topk_weights

            f = g.shard_jit(disp)
            _, vjp = jax.vjp(lambda x, w: f(x, w, idx_g), g.put(x), g.put(w))
            ct_x = random_values(rng, (R * cap, H), np.float32, mantissa_bits=8)
            w_cols = (cap, K) if layout == "token" else (cap,)
            ct_w = random_values(rng, (R * w_cols[0],) + w_cols[1:], np.float32, mantissa_bits=8)
            dx, dw = g.blocks(vjp((g.put(ct_x), g.put(ct_w))))
            want_dx = nm.combine_unweighted(split(ct_x, R), models, layout=layout, tokens=T,
                                            ranks_per_node=ranks_per_node)[r]
            want_dw = nm.topk_weights_grad(split(ct_w, R), models, split(idx, R), num_experts=E,
                                           layout=layout)[r]
            assert_bits_equal(dx, want_dx, f"d x {tag}")
            assert_bits_equal(dw, want_dw, f"d topk_weights {tag}")

            # combine: d y = the output cotangent broadcast to the rows (times w, expert layout).
            def comb(x, w, idx, y, layout=layout, A=A, C=C):
                res = jax_ep.dispatch(buf, x, idx, w, num_experts=E, layout=layout,
                                      recv_capacity=C, expert_alignment=A)
                return jax_ep.combine(buf, y, res.handle)

            h = g.shard_jit(comb)
            y = random_values(rng, (R * cap, H), np.float32, mantissa_bits=8)
            _, vjp_y = jax.vjp(lambda y: h(g.put(x), g.put(w), idx_g, y), g.put(y))
            ct_out = random_values(rng, (R * T, H), np.float32, mantissa_bits=8)
            (dy,) = vjp_y(g.put(ct_out))
            dy = g.mine(dy)
            want_dy = np.zeros((cap, H), np.float32)
            cts = split(ct_out, R)
            m = models[r]
            for row in m.rows:
                pos, s, t = row[0], row[1], row[2]
                scale = m.recv_topk_weights[pos] if layout == "expert" else np.float32(1)
                want_dy[pos] = np.float32(scale) * cts[s][t]
            assert_bits_equal(dy, want_dy, f"d y {tag}")
            checked += 1
    return {"rank": r, "checked": checked}


# ------------------------------------------------------------------------------ Flax layer


def moe_layer(seed: int, ranks_per_node=None) -> dict:
    """jax_ep.nn.MoE forward and backward (d x, d expert weights) in multi-process mode against
    the dense single-device reference of the same parameters."""
    from flax import nnx  # noqa: PLC0415

    from jax_ep import nn  # noqa: PLC0415

    g = Group(ranks_per_node)
    R, r = g.num_ranks, g.rank
    n, H, F, E, K = 16 * R, 32, 48, 2 * R, 2
    rng = np.random.default_rng(seed + 200)
    x = rng.standard_normal((n, H)).astype(np.float32)
    ct = rng.standard_normal((n, H)).astype(np.float32)
    def layer_on(buf):  # the same parameters on any Buffer (same seed, same init order)
        return nn.MoE(buf, H, F, E, K, num_shared_experts=1, expert_alignment=4,
                      rngs=nnx.Rngs(seed % 1000))

    with g.buffer(tokens=n // R, hidden=H, topk=K) as buf:
        moe = layer_on(buf)
        local_mesh = Mesh(np.array([jax.local_devices()[0]]), ("ep",))
        ref = layer_on(jax_ep.Buffer(local_mesh, "ep", backend="xla"))
        names = ("w_gate", "w_up", "w_down")  # sharded over the EP axis: no psum in the VJP
        graphdef, experts, rest = nnx.split(moe, lambda path, _: path[-1] in names, ...)

        def layer(experts, x):
            return nnx.merge(graphdef, experts, rest)(x)

        y, vjp = jax.vjp(layer, experts, g.put(x))
        d_experts, d_x = vjp(g.put(ct))
        y = g.mine(y)
        grads = [g.mine(d_experts[name][...]) for name in names] + [g.mine(d_x)]

        weights = list(map(lambda a: None if a is None else jnp.asarray(np.asarray(a)),
                           ref._weights()))

        def dense(wg, wu, wd, x):
            return nn.dense_forward(ref, tuple(weights[:2]) + (wg, wu, wd) + tuple(weights[5:]),
                                    x)

        want_y, vjp_ref = jax.vjp(dense, *weights[2:5], jnp.asarray(x))
        want = vjp_ref(jnp.asarray(ct))
    rows, experts = slice(r * n // R, (r + 1) * n // R), slice(r * E // R, (r + 1) * E // R)
    tol = dict(rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(y, np.asarray(want_y)[rows], err_msg=f"output rank {r}", **tol)
    for name, got, ref_grad in zip(("w_gate", "w_up", "w_down"), grads[:3], want[:3]):
        np.testing.assert_allclose(got, np.asarray(ref_grad)[experts], err_msg=f"d {name}", **tol)
    np.testing.assert_allclose(grads[3], np.asarray(want[3])[rows], err_msg="d x", **tol)
    return {"rank": r, "max_abs_y": float(np.abs(y).max())}


# ------------------------------------------------------------------------------ endurance


def back_to_back(seed: int, calls: int = 200, ranks_per_node=None) -> dict:
    """`calls` expert-layout dispatch+combine round trips in one program: weights summing to
    exactly 1 make each trip the exact identity, so any stale read or drift shows."""
    g = Group(ranks_per_node)
    R, r = g.num_ranks, g.rank
    T, H, K, E = 64, 128, 4, 4 * R
    rng = np.random.default_rng(seed + 300)
    x = random_values(rng, (R * T, H), np.float32, mantissa_bits=16)
    idx = np.stack([rng.permutation(E)[:K] for _ in range(R * T)]).astype(np.int32)
    cuts = np.sort(rng.integers(1, 128, size=(R * T, K - 1)), axis=1)
    w = (np.diff(np.concatenate([np.zeros((R * T, 1)), cuts, np.full((R * T, 1), 128)], 1),
                 axis=1) / 128).astype(np.float32)
    with g.buffer(tokens=T, hidden=H, topk=K) as buf:
        def loop(x, idx, w):
            def trip(_, v):
                res = jax_ep.dispatch(buf, v, idx, w, num_experts=E, layout="expert")
                return jax_ep.combine(buf, res.recv_x, res.handle)
            return jax.lax.fori_loop(0, calls, trip, x)

        f = g.shard_jit(loop)
        args = (g.put(x), g.put(idx), g.put(w))
        start = time.monotonic()
        out = g.mine(jax.block_until_ready(f(*args)))
        seconds = time.monotonic() - start
        if buf.backend == "cuda":
            buf.check()
    assert_bits_equal(out, split(x, R)[r], f"after {calls} round trips, rank {r}")
    return {"rank": r, "calls": calls, "seconds_incl_compile": round(seconds, 2)}


# ------------------------------------------------------------------------------ timeouts


def missing_rank(seed: int, ranks_per_node=None) -> dict:
    """Every rank runs the same program, but only rank 0 takes the branch that dispatches (a
    divergent control-flow bug): rank 0's kernel must give up within its bound and name itself,
    the phase and the peer (backend "cuda" only). The others stay alive until rank 0 has
    reported, so their workspaces stay mapped."""
    from jax._src.distributed import global_state  # noqa: PLC0415

    g = Group(ranks_per_node)
    client = global_state.client
    T, H, K, E = 8, 128, 2, 2 * g.num_ranks
    buf = g.buffer(tokens=T, hidden=H, topk=K, timeout_s=3.0)
    print(f"rank {g.rank}: Buffer created", flush=True)
    x = random_values(np.random.default_rng(seed), (g.num_ranks * T, H), np.float32)
    idx = np.zeros((g.num_ranks * T, K), np.int32)
    w = np.ones((g.num_ranks * T, K), np.float32)

    def only_rank_0(x, idx, w):
        def call(x):
            return jax_ep.dispatch(buf, x, idx, w, num_experts=E).recv_x

        def skip(x):  # zeros varying over "ep" like the dispatch result
            return jnp.broadcast_to(x[:1] * 0, (g.num_ranks * T, H))

        return jax.lax.cond(jax.lax.axis_index("ep") == 0, call, skip, x)

    f = g.shard_jit(only_rank_0)
    args = (g.put(x), g.put(idx), g.put(w))
    raised = None
    try:
        jax.block_until_ready(f(*args))
    except Exception as e:  # noqa: BLE001 (rank 0: the trapped kernel fails the execution)
        raised = type(e).__name__
    print(f"rank {g.rank}: the call raised {raised}", flush=True)
    if g.rank != 0:
        client.blocking_key_value_get_bytes("jax_ep_test/missing_rank_reported", 90_000)
        return {"rank": g.rank, "raised": raised}
    report = ""
    try:
        buf.check()
    except RuntimeError as e:
        report = str(e)
    print("REPORT", report, flush=True)
    client.key_value_set_bytes("jax_ep_test/missing_rank_reported", b"1")
    return {"rank": 0, "raised": raised, "report": report}


def checks(seed: int, ranks_per_node=None, bodies=None) -> dict:
    """exchange, gradients, moe_layer and back_to_back (or the `bodies` named) in one set of
    processes (process start, NVSHMEM initialisation and compilation dominate a run; on one GPU
    the ranks time-slice). ranks_per_node: virtual nodes (backend "cuda": the internode
    kernels)."""
    out = {}
    every = (exchange, gradients, moe_layer, back_to_back)
    for body in [b for b in every if bodies is None or b.__name__ in bodies]:
        start = time.monotonic()
        out[body.__name__] = body(seed, ranks_per_node=ranks_per_node)
        out[body.__name__]["seconds"] = round(time.monotonic() - start, 2)
        print(f"{body.__name__}: {out[body.__name__]}", flush=True)
    return out
