"""Random inputs and bitwise comparisons shared by the single- and multi-process suites.

numpy only (no jax, no jax_ep): the multi-process workers import it after jax.distributed is up.
Inputs are never zeros; routing covers -1, invalid ids, duplicates, skew and empty rows.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np

DTYPES = {
    "f32": np.dtype(np.float32),
    "bf16": np.dtype(ml_dtypes.bfloat16),
    "f16": np.dtype(np.float16),
    "fp8": np.dtype(ml_dtypes.float8_e4m3fn),
}

INVALID_IDS = np.array([-2, -3, -1000, -(2**31), 2**31 - 1], np.int64)


# ------------------------------------------------------------------------------------------------
# Random inputs
# ------------------------------------------------------------------------------------------------
def random_values(rng, shape, dtype, mantissa_bits=None):
    """Random values that are never zero (|v| in [0.25, 2]); optionally with at most
    ``mantissa_bits`` significant bits."""
    mag = rng.uniform(0.25, 2.0, size=shape)
    if mantissa_bits is not None:
        m, e = np.frexp(mag)
        mag = np.ldexp(np.round(m * 2.0**mantissa_bits) / 2.0**mantissa_bits, e)
    sign = rng.choice(np.array([-1.0, 1.0]), size=shape)
    return (mag * sign).astype(np.float32).astype(dtype)


def make_routing(rng, R, T, K, E, mode):
    """Global ``[R*T, K]`` int32 topk_idx. ``mode`` is '+'-joined flags:

    random: distinct experts per row, ~15% of slots -1;  dup: experts drawn with replacement plus
    forced duplicates; skew: every token to one expert (slot 0, other slots that expert or -1);
    none: all -1;  empty: ~30% of rows all -1;  invalid: ~25% of slots out of [-1, E).
    """
    flags = set(mode.split("+"))
    n = R * T
    if "none" in flags:
        return np.full((n, K), -1, np.int32)
    if "skew" in flags:
        e0 = int(rng.integers(0, E))
        idx = np.where(rng.random((n, K)) < 0.5, e0, -1)
        idx[:, 0] = e0
    elif "dup" in flags:
        idx = rng.integers(0, E, size=(n, K))
        if K > 1:
            rows = rng.random(n) < 0.5
            idx[rows, K - 1] = idx[rows, 0]
    else:  # random
        assert K <= E
        idx = np.array([rng.permutation(E)[:K] for _ in range(n)], np.int64).reshape(n, K)
        idx[rng.random((n, K)) < 0.15] = -1
    idx = idx.astype(np.int64)
    if "empty" in flags:
        idx[rng.random(n) < 0.3] = -1
    if "invalid" in flags:
        mask = rng.random((n, K)) < 0.25
        bad = rng.choice(np.concatenate([INVALID_IDS, [E, E + 1, E + 7]]), size=(n, K))
        idx = np.where(mask, bad, idx)
    return idx.astype(np.int32)


def make_inputs(rng, R, T, H, K, E, dtype, mode, exact_products=True):
    """exact_products: weights k/128 (<= 7 significant bits), so that with the <= 16-bit
    mantissas of ``random_y`` every product ``w * y`` is exact in float32 (see ``run_case``)."""
    fp8 = dtype == "fp8"
    x = random_values(rng, (R * T, H), DTYPES[dtype])
    scales = rng.uniform(0.01, 10.0, size=(R * T, H // 128)).astype(np.float32) if fp8 else None
    idx = make_routing(rng, R, T, K, E, mode)
    if exact_products:
        w = (rng.integers(6, 129, size=(R * T, K)) / 128).astype(np.float32)
    else:
        w = rng.uniform(0.05, 1.0, size=(R * T, K)).astype(np.float32)
    return x, scales, idx, w


def split(a, R):
    return None if a is None else list(np.asarray(a).reshape(R, -1, *np.asarray(a).shape[1:]))


def bits(a):
    a = np.ascontiguousarray(np.asarray(a))
    return a.view(np.uint8)


def assert_bits_equal(actual, expected, what):
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    if not np.array_equal(bits(actual), bits(expected)):
        nbytes = actual.dtype.itemsize
        a = bits(actual).reshape(actual.shape + (nbytes,))
        e = bits(expected).reshape(expected.shape + (nbytes,))
        diff = np.argwhere((a != e).any(-1))
        show = (lambda v: v) if actual.dtype.kind in "iub" else (lambda v: v.astype(np.float32))
        raise AssertionError(
            f"{what} differs bitwise at {len(diff)} element(s); first: {diff[:10].tolist()}\n"
            f"actual:\n{show(actual)}\nexpected:\n{show(expected)}")


def assert_float_equal(actual, expected, what):
    """Exact equality of float values (as float32; +0 == -0)."""
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    np.testing.assert_array_equal(actual.astype(np.float32), expected.astype(np.float32),
                                  err_msg=what)
