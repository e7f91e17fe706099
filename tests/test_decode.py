"""jax_ep.nn.MoE.decode (the low-latency inference path) against MoE.__call__ (training path).

Tolerances (relative to the reference output's Frobenius norm, and per element relative to its
largest magnitude):

- use_fp8=False: the low-latency format rounds to bfloat16 four times (the tokens, the expert
  outputs, each rank's partial sum, the result), each <= 2^-9 relative; observed <= 0.5% of the
  norm and <= 0.8% of max|out| per element over many seeds -> tolerance 1.5% / 2%.
- use_fp8=True: e4m3 keeps 3 mantissa bits, <= 2^-4 relative per element (~2.6% RMS), and both
  the gate and the up projection see it, so the output moves by ~3.5-5% of its norm (observed
  <= 5.3% per element of max|out|) -> tolerance 8% / 10%. That loose bound is complemented by
  a tight one: a dense oracle whose experts see the FP8 round trip of the tokens must match
  decode within the bfloat16 tolerance, i.e. the tokens' quantization is the only extra error.

A broken path fails these by far: with the experts permuted (every row computed by another
expert's weights) the error is ~100% of the norm; each case asserts that too.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jax_ep
from conftest import make_mesh
from jax_ep.nn import MoE, route, swiglu

H, F, E = 128, 32, 8  # H = one FP8 scale block
TOL = {True: (0.08, 0.10), False: (0.015, 0.02)}  # use_fp8 -> (norm-relative, per element)


def backend():
    return os.environ.get("JAX_EP_TEST_BACKEND", "auto")  # "auto": "cuda" on GPU hosts


def make_moe(num_ranks, num_tokens, *, seed, top_k=2, **kw):
    """A layer whose Buffer serves both paths: __call__ (num_tokens rounded up to the ranks)
    and decode (ll_max_tokens_per_rank = its tokens per rank)."""
    mesh = make_mesh(num_ranks)
    per_rank = -(-num_tokens // num_ranks)
    buf = jax_ep.Buffer(mesh, "ep", backend=backend(), max_tokens_per_rank=per_rank, hidden=H,
                        num_topk=top_k, ll_max_tokens_per_rank=per_rank)
    return MoE(buf, H, F, E, top_k, rngs=nnx.Rngs(seed), **kw)


def train_path(moe, x):
    """MoE.__call__ on x [n, H], padded with zero tokens to a multiple of the ranks (rows are
    independent: same routing per token, nothing dropped at the default capacity)."""
    n, r = x.shape[0], moe.buffer.num_ranks
    pad = -(-n // r) * r - n
    return np.asarray(moe(jnp.pad(x, ((0, pad), (0, 0)))))[:n].astype(np.float32)


def errors(got, want):
    got = np.asarray(got, np.float32)
    diff = got - want
    return (float(np.linalg.norm(diff) / np.linalg.norm(want)),
            float(np.abs(diff).max() / np.abs(want).max()))


def fp8_oracle(moe, x):
    """The layer densely on one device with the routing of the exact tokens x [n, H] but every
    expert fed the tokens as the FP8 dispatch carries them (bfloat16, then per 128 channels
    e4m3 with scale amax / 448, dequantized), quantized on the host by the numpy model (bit-exact
    with the kernels, independent of how an XLA backend rounds). No shared experts."""
    import ll_model  # noqa: PLC0415 (tests/)

    xb = np.asarray(np.asarray(x, np.float32).astype(ll_model.BF16), np.float32)
    q, scales = ll_model.np_fp8(xb)
    xq = (q.astype(np.float32).reshape(len(xb), -1, 128) * scales[..., None]).reshape(xb.shape)

    @jax.jit
    def dense(x, xq, kernel, bias, wg, wu, wd):
        routing = route(moe.router.config, kernel, x, bias)
        ye = jax.vmap(lambda g, u, d: swiglu(xq, g, u, d, jnp.float32))(wg, wu, wd)  # [E, n, H]
        picked = ye[routing.topk_idx, jnp.arange(x.shape[0])[:, None]]  # [n, K, H]
        return jnp.einsum("nkh,nk->nh", picked, routing.topk_weights)

    weights = [None if a is None else jnp.asarray(np.asarray(a)) for a in moe._weights()[:5]]
    return np.asarray(dense(jnp.asarray(np.asarray(x)), jnp.asarray(xq), *weights))


CONFIGS = {
    "softmax": dict(),
    "sigmoid-grouped-bias-shared": dict(scoring="sigmoid", n_group=4, topk_group=2,
                                        score_bias=True, num_shared_experts=1,
                                        routed_scaling_factor=2.5),
    "softmax-k3-unnormalised": dict(top_k=3, norm_topk_prob=False),
    "softmax-bf16-compute": dict(dtype=jnp.bfloat16),
}
# (config, EP ranks, tokens in all, use_fp8, per_token). Token counts that are no multiple of
# the ranks exercise decode's padding; 1 token on 8 ranks leaves 7 ranks with padding only.
CASES = [
    ("softmax", 1, 3, True, False),
    ("sigmoid-grouped-bias-shared", 2, 5, True, False),
    ("softmax-k3-unnormalised", 4, 9, True, False),
    ("softmax", 8, 17, True, True),
    ("softmax-bf16-compute", 1, 4, True, False),
    ("softmax", 4, 6, False, False),
    ("sigmoid-grouped-bias-shared", 8, 1, False, False),
]


@pytest.mark.parametrize("name,num_ranks,num_tokens,use_fp8,per_token", CASES,
                         ids=[f"{c}-ep{r}-t{t}-{'fp8' if f else 'bf16'}"
                              for c, r, t, f, _ in CASES])
def test_decode_matches_call(name, num_ranks, num_tokens, use_fp8, per_token, rng):
    moe = make_moe(num_ranks, num_tokens, seed=int(rng.integers(1 << 30)), **CONFIGS[name])
    if moe.router.bias is not None:
        moe.router.bias[...] = jnp.asarray(rng.normal(size=E).astype(np.float32) * 0.05)
    x = jnp.asarray(rng.normal(size=(num_tokens, 1, H)).astype(np.float32))  # [batch, 1, H]
    got = moe.decode(x, use_fp8=use_fp8)
    assert got.shape == x.shape and got.dtype == x.dtype
    want = train_path(moe, x[:, 0])
    rel, elem = errors(got[:, 0], want)
    tol_rel, tol_elem = TOL[use_fp8]
    assert rel < tol_rel and elem < tol_elem, (rel, elem)
    if use_fp8 and moe.dtype == jnp.float32 and moe.num_shared_experts == 0:
        # Tight: against the experts fed the FP8 round trip of the tokens (routing from the
        # exact ones, as decode does), only the bfloat16 roundings remain.
        rel_q, elem_q = errors(got[:, 0], fp8_oracle(moe, x[:, 0]))
        assert rel_q < TOL[False][0] and elem_q < TOL[False][1], (rel_q, elem_q)
    if per_token:
        # A token's output does not depend on the other tokens of the call (FP8 scales per
        # token, rows computed independently, combine summed per token): alone it is the same.
        one = np.asarray(moe.decode(x[5:6], use_fp8=use_fp8))
        np.testing.assert_allclose(one, np.asarray(got[5:6]), rtol=0,
                                   atol=1e-6 * np.abs(want).max())
    # The test has power: the experts permuted over E (every row through another expert's
    # weights) is far outside the tolerance.
    perm = np.roll(np.arange(E), 1)
    for w in (moe.w_gate, moe.w_up, moe.w_down):
        w[...] = jax.device_put(w[...][perm], w[...].sharding)
    broken = errors(moe.decode(x, use_fp8=use_fp8)[:, 0], want)
    assert broken[0] > 5 * tol_rel, broken


def test_decode_errors(rng):
    mesh = make_mesh(2)
    no_ll = MoE(jax_ep.Buffer(mesh, "ep", backend="xla"), H, F, E, 2, rngs=nnx.Rngs(0))
    x = jnp.asarray(rng.normal(size=(4, H)).astype(np.float32))
    with pytest.raises(ValueError, match="ll_max_tokens_per_rank"):
        no_ll.decode(x)
    small = jax_ep.Buffer(mesh, "ep", backend="xla", ll_max_tokens_per_rank=1)
    with pytest.raises(ValueError, match="ll_max_tokens_per_rank=1"):
        no_ll.decode(x, buffer=small)  # 2 tokens per rank
    other_mesh = jax_ep.Buffer(make_mesh(4), "ep", backend="xla", ll_max_tokens_per_rank=4)
    with pytest.raises(ValueError, match="same|mesh"):
        no_ll.decode(x, buffer=other_mesh)
    with pytest.raises(NotImplementedError, match="no gradient"):  # inference only
        jax.eval_shape(jax.grad(lambda x: no_ll.decode(x, buffer=small).sum()), x[:2])
