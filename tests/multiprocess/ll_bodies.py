"""Multi-process bodies of the low-latency ops (one device per process; see launcher.py).

Every process builds the same global inputs from the seed, runs the program of ll_model over the
global mesh and checks its own rank against the numpy model (dispatch bit-exact; combine bitwise
on backend "cuda", within 1 bfloat16 ulp on "xla").
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

import jax_ep
import ll_model
from bodies import Group
from jax_ep import low_latency as ll

__all__ = ["ll_checks", "ll_skipped_rank"]

# T, H, K, experts per rank, M, FP8, routing, split, failed rank (or None)
CASES = [
    (16, 256, 4, 3, 16, True, "uniform", False, None),
    (11, 136, 3, 2, 13, False, "messy", True, None),    # -1, invalid, repeated experts, T < M
    (9, 384, 2, 1, 9, True, "skewed", True, None),      # every token to expert 0
    (7, 128, 3, 2, 8, True, "uniform", False, "last"),  # the last rank masked as failed
    (6, 1408, 4, 2, 7, True, "messy", True, None),     # several combine chunks, the last partial
]


def _buffer(g: Group, m: int, timeout_s: float = 120.0) -> jax_ep.Buffer:
    buf = jax_ep.Buffer(g.mesh, "ep", backend=g.backend, ll_max_tokens_per_rank=m, hidden=1408,
                        num_topk=5, timeout_s=timeout_s)
    if g.backend == "cuda":
        assert buf.transport == ("nvshmem" if g.num_ranks > 1 else "p2p"), buf
    return buf


def _inputs(rng, r_, t_, h, k_, num_experts, kind):
    x = rng.standard_normal((r_, t_, h)).astype(np.float32) * rng.uniform(0.01, 30.0, (r_, t_, 1))
    idx, w = ll_model.routing(rng, r_, t_, k_, num_experts, kind)
    return x.astype(ll_model.BF16), idx, w


def ll_checks(seed: int) -> dict:
    """Every case of CASES, fused and split, on one Buffer per M."""
    g = Group()
    r_, checked = g.num_ranks, 0
    start = time.monotonic()
    for i, (t_, h, k_, per_rank, m, fp8, kind, split, failed_at) in enumerate(CASES):
        num_experts = per_rank * r_
        rng = np.random.default_rng(seed + i)
        x, idx, w = _inputs(rng, r_, t_, h, k_, num_experts, kind)
        failed = np.zeros(r_, bool)
        if failed_at == "last":
            failed[-1] = True
        with _buffer(g, m) as buf:
            body = ll_model.program(buf, num_experts, fp8, split)
            f = jax.jit(jax.shard_map(body, mesh=g.mesh, in_specs=(P("ep"),) * 3 + (P(),),
                                      out_specs=(P("ep"),) * 3))
            out, comb, missing = f(g.put(x.reshape(r_ * t_, h)), g.put(idx.reshape(r_ * t_, k_)),
                                   g.put(w.reshape(r_ * t_, k_)),
                                   g.put(failed.astype(np.int32), P()))
            got = {k: g.mine(v)[0] for k, v in out.items()}
            want = ll_model.np_dispatch(x, idx, w, num_experts, m, fp8, failed)
            label = f"rank {g.rank} case {i}"
            ll_model.assert_dispatch_rank(got, want[g.rank], fp8, label)
            # The combine model needs every rank's expert outputs: the closed form of the model.
            ys = np.stack([ll_model.expected_y(want[d], fp8) for d in range(r_)])
            count = want[g.rank]["recv_count"]
            for j in range(count.shape[0]):
                np.testing.assert_array_equal(ll_model.bits(got["y"][j, :count[j]]),
                                              ll_model.bits(ys[g.rank][j, :count[j]]),
                                              err_msg=f"{label} y expert {j}")
            want_out, want_missing = ll_model.np_combine(ys, want, idx, num_experts, failed)
            np.testing.assert_array_equal(g.mine(missing), want_missing[g.rank], err_msg=label)
            ll_model.assert_combine(g.mine(comb), want_out[g.rank], g.backend == "cuda", label)
            checked += 1
    return {"rank": g.rank, "cases": checked, "seconds": round(time.monotonic() - start, 1)}


def ll_skipped_rank(seed: int) -> dict:
    """Backend "cuda": the last rank never calls the low-latency ops (as if it had died) and the
    others mask it: they complete, and its tokens' experts are reported missing."""
    g = Group()
    r_, t_, h, k_, m = g.num_ranks, 6, 128, 3, 6
    num_experts = 2 * r_
    rng = np.random.default_rng(seed)
    x, idx, w = _inputs(rng, r_, t_, h, k_, num_experts, "uniform")
    failed = np.zeros(r_, bool)
    failed[-1] = True
    with _buffer(g, m, timeout_s=30.0) as buf:
        def body(x, idx, w, failed_ranks):
            def run(args):
                x, idx, w = args
                res = ll.dispatch(buf, x, idx, w, num_experts=num_experts, failed_ranks=failed_ranks)
                rows = (res.recv_x.astype(jnp.float32)
                        * jnp.repeat(res.recv_x_scales, 128, axis=-1)).astype(jnp.bfloat16)
                comb = ll.combine(buf, rows, res.handle, failed_ranks=failed_ranks)
                return comb.out, comb.num_missing

            def skip(args):
                x = args[0]
                return x * 0, jnp.full((x.shape[0],), -1, jnp.int32) + (x[:, 0] * 0).astype(jnp.int32)

            return jax.lax.cond(jax.lax.axis_index("ep") == r_ - 1, skip, run, (x, idx, w))

        f = jax.jit(jax.shard_map(body, mesh=g.mesh, in_specs=(P("ep"),) * 3 + (P(),),
                                  out_specs=(P("ep"), P("ep"))))
        out, missing = f(g.put(x.reshape(r_ * t_, h)), g.put(idx.reshape(r_ * t_, k_)),
                         g.put(w.reshape(r_ * t_, k_)), g.put(failed.astype(np.int32), P()))
        out, missing = g.mine(out), g.mine(missing)
    if g.rank == r_ - 1:
        return {"rank": g.rank, "skipped": True}
    want = ll_model.np_dispatch(x, idx, w, num_experts, m, True, failed)
    ys = np.stack([ll_model.expected_y(want[d], True) / ll_model.expert_scale(num_experts // r_)
                   for d in range(r_)]).astype(ll_model.BF16)
    want_out, want_missing = ll_model.np_combine(ys, want, idx, num_experts, failed)
    np.testing.assert_array_equal(missing, want_missing[g.rank])
    ll_model.assert_combine(out, want_out[g.rank], True, f"rank {g.rank}")
    return {"rank": g.rank, "missing": int(missing.sum())}
