"""Trace-time errors of the contract, and the checked (checkify) mode."""
from __future__ import annotations


import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.experimental import checkify
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import jax_ep
from conftest import ep_devices, make_buffer, make_mesh


R, T, H, K, E = 2, 4, 8, 2, 4
ERRORS = (ValueError, TypeError)


def shard_jit(mesh, f):
    return jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P("ep"), out_specs=P("ep")))


def arrays(rng, *, t=T, h=H, k=K, e=E, r=R, x_dtype=np.float32):
    x = rng.uniform(0.5, 1.5, size=(r * t, h)).astype(np.float32).astype(x_dtype)
    idx = rng.integers(0, e, size=(r * t, k)).astype(np.int32)
    w = rng.uniform(0.1, 1.0, size=(r * t, k)).astype(np.float32)
    return x, idx, w


def dispatch_call(mesh, buf, args, **kw):
    """Runs jit(shard_map(dispatch)) on ``args`` = (x or (x, scales), idx, w)."""

    def f(x, idx, w):
        res = jax_ep.dispatch(buf, x, idx, w, **kw)
        return res.recv_x

    return shard_jit(mesh, f)(*args)


@pytest.fixture(scope="module")
def mesh():
    return make_mesh(R)


@pytest.fixture(scope="module")
def buf(mesh):
    with make_buffer(mesh, tokens=T + 2, hidden=256, topk=K) as b:
        yield b


# ------------------------------------------------------------------------------------------------
# Static-argument errors
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_experts", [3, 5])
def test_num_experts_not_multiple_of_ranks(mesh, buf, rng, num_experts):
    with pytest.raises(ERRORS, match=r"(?i)expert"):
        dispatch_call(mesh, buf, arrays(rng), num_experts=num_experts)


def test_get_dispatch_layout_num_experts_not_multiple(mesh, rng):
    _, idx, _ = arrays(rng)
    with pytest.raises(ERRORS, match=r"(?i)expert"):
        shard_jit(mesh, lambda i: jax_ep.get_dispatch_layout(i, 5, R).num_tokens_per_rank)(idx)


@pytest.mark.parametrize("capacity", [0, -3])
@pytest.mark.parametrize("layout", ["token", "expert"])
def test_capacity_below_one(mesh, buf, rng, capacity, layout):
    with pytest.raises(ERRORS, match=r"(?i)capacity"):
        dispatch_call(mesh, buf, arrays(rng), num_experts=E, layout=layout,
                      recv_capacity=capacity)


@pytest.mark.parametrize("alignment", [0, -4])
def test_alignment_below_one(mesh, buf, rng, alignment):
    with pytest.raises(ERRORS, match=r"(?i)align"):
        dispatch_call(mesh, buf, arrays(rng), num_experts=E, layout="expert",
                      expert_alignment=alignment)


@pytest.mark.parametrize("layout", ["tokens", "Expert", "dense", ""])
def test_unknown_layout(mesh, buf, rng, layout):
    with pytest.raises(ERRORS, match=r"(?i)layout"):
        dispatch_call(mesh, buf, arrays(rng), num_experts=E, layout=layout)


# Static sizes must be integers: a float is not truncated (2.5 -> 2), a string not parsed.
NOT_INTEGERS = [2.5, 4.0, np.float32(4.0), np.float64(2.5), "4", None, True, np.bool_(True),
                np.array([4]), jnp.int32(4)]


def _not_integer_id(v):
    return f"{type(v).__name__}-{v!r}"


@pytest.mark.parametrize("value", [v for v in NOT_INTEGERS if v is not None], ids=_not_integer_id)
@pytest.mark.parametrize("layout", ["token", "expert"])
def test_capacity_not_an_integer(mesh, buf, rng, value, layout):
    with pytest.raises(TypeError, match=r"recv_capacity .*must be a static integer.*got "):
        dispatch_call(mesh, buf, arrays(rng), num_experts=E, layout=layout, recv_capacity=value)


@pytest.mark.parametrize("value", NOT_INTEGERS, ids=_not_integer_id)
def test_alignment_not_an_integer(mesh, buf, rng, value):
    with pytest.raises(TypeError, match=r"expert_alignment .*must be a static integer.*got "):
        dispatch_call(mesh, buf, arrays(rng), num_experts=E, layout="expert",
                      expert_alignment=value)


@pytest.mark.parametrize("value", NOT_INTEGERS, ids=_not_integer_id)
def test_num_experts_not_an_integer(mesh, buf, rng, value):
    with pytest.raises(TypeError, match=r"num_experts .*must be a static integer.*got "):
        dispatch_call(mesh, buf, arrays(rng), num_experts=value)


@pytest.mark.parametrize("what", ["num_experts", "num_ranks"])
@pytest.mark.parametrize("value", NOT_INTEGERS, ids=_not_integer_id)
def test_get_dispatch_layout_sizes_not_integers(mesh, rng, what, value):
    _, idx, _ = arrays(rng)
    kw = {"num_experts": E, "num_ranks": R, what: value}
    with pytest.raises(TypeError, match=rf"{what} .*must be a static integer.*got "):
        shard_jit(mesh, lambda i: jax_ep.get_dispatch_layout(i, **kw).num_tokens_per_rank)(idx)


@pytest.mark.parametrize("layout", ["token", "expert"])
def test_numpy_integer_sizes_accepted(mesh, buf, rng, layout):
    """numpy integer scalars are integers: same result as Python ints."""
    args = arrays(rng)
    want = dispatch_call(mesh, buf, args, num_experts=E, layout=layout, recv_capacity=6,
                         expert_alignment=2)
    got = dispatch_call(mesh, buf, args, num_experts=np.int64(E), layout=layout,
                        recv_capacity=np.int32(6), expert_alignment=np.uint8(2))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


# ------------------------------------------------------------------------------------------------
# FP8
# ------------------------------------------------------------------------------------------------
def test_fp8_hidden_not_multiple_of_128(mesh, buf, rng):
    x, idx, w = arrays(rng, h=64, x_dtype=ml_dtypes.float8_e4m3fn)
    scales = np.ones((R * T, 1), np.float32)
    with pytest.raises(ERRORS, match=r"128"):
        dispatch_call(mesh, buf, ((x, scales), idx, w), num_experts=E)


@pytest.mark.parametrize("bad", ["cols", "rows", "dtype", "rank"])
def test_fp8_wrong_scales(mesh, buf, rng, bad):
    x, idx, w = arrays(rng, h=256, x_dtype=ml_dtypes.float8_e4m3fn)
    scales = {
        "cols": np.ones((R * T, 1), np.float32),
        "rows": np.ones((R * (T + 1), 2), np.float32),
        "dtype": np.ones((R * T, 2), ml_dtypes.bfloat16),
        "rank": np.ones((R * T, 2, 1), np.float32),
    }[bad]
    with pytest.raises(ERRORS, match=r"(?i)scale"):
        dispatch_call(mesh, buf, ((x, scales), idx, w), num_experts=E)


# ------------------------------------------------------------------------------------------------
# Shape / dtype mismatches between x, topk_idx, topk_weights
# ------------------------------------------------------------------------------------------------
def _bad_inputs(rng, case):
    x, idx, w = arrays(rng)
    if case == "x_rows":
        x = np.concatenate([x, x[: 2 * R]])  # T+2 rows per shard vs T
    elif case == "x_rank1":
        x = x[:, 0]
    elif case == "x_rank3":
        x = x[:, :, None]
    elif case == "x_int":
        x = x.astype(np.int32)
    elif case == "x_fp8_plain":  # FP8 without its scales
        x, _, _ = arrays(rng, h=128, x_dtype=ml_dtypes.float8_e4m3fn)
    elif case == "idx_float":
        idx = idx.astype(np.float32)
    elif case == "idx_int16":
        idx = idx.astype(np.int16)
    elif case == "idx_rank1":
        idx = idx[:, 0]
    elif case == "w_cols":
        w = w[:, :1]
    elif case == "w_rows":
        w = np.concatenate([w, w[: 2 * R]])
    elif case == "w_bf16":
        w = w.astype(ml_dtypes.bfloat16)
    elif case == "w_int":
        w = idx.copy()
    else:
        raise AssertionError(case)
    return x, idx, w


@pytest.mark.parametrize("case", ["x_rows", "x_rank1", "x_rank3", "x_int", "x_fp8_plain",
                                  "idx_float", "idx_int16", "idx_rank1", "w_cols", "w_rows",
                                  "w_bf16", "w_int"])
def test_mismatched_inputs(mesh, buf, rng, case):
    args = _bad_inputs(rng, case)
    with pytest.raises(ERRORS) as info:
        dispatch_call(mesh, buf, args, num_experts=E)
    msg = str(info.value).lower()
    assert any(word in msg for word in ("x", "topk", "shape", "dtype", "rows")), msg


# ------------------------------------------------------------------------------------------------
# Axis binding
# ------------------------------------------------------------------------------------------------
def test_axis_not_bound_outside_shard_map(buf, rng):
    x, idx, w = arrays(rng)
    with pytest.raises(ERRORS, match=r"(?i)shard_map|axis|bound"):
        jax.jit(lambda x, i, w: jax_ep.dispatch(buf, x, i, w, num_experts=E).recv_x)(x, idx, w)


def test_axis_not_bound_other_axis_name(buf, rng):
    devices = ep_devices()
    other = Mesh(np.array(devices[:R]), ("dp",))
    x, idx, w = arrays(rng)

    def f(x, i, w):
        return jax_ep.dispatch(buf, x, i, w, num_experts=E).recv_x

    g = jax.jit(jax.shard_map(f, mesh=other, in_specs=P("dp"), out_specs=P("dp")))
    with pytest.raises(ERRORS, match=r"(?i)shard_map|axis|bound"):
        g(x, idx, w)


def test_axis_wrong_size(rng):
    big = make_mesh(4)
    small = make_mesh(2)
    with make_buffer(big, tokens=T, hidden=H, topk=K) as b4:
        x, idx, w = arrays(rng, r=2)
        with pytest.raises(ERRORS, match=r"(?i)rank|size|axis"):
            dispatch_call(small, b4, (x, idx, w), num_experts=E)


# ------------------------------------------------------------------------------------------------
# combine
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["token", "expert"])
@pytest.mark.parametrize("delta", [-1, 1])
def test_combine_y_rows_not_capacity(mesh, buf, rng, layout, delta):
    x, idx, w = arrays(rng)
    cap = 6

    def f(x, i, w):
        res = jax_ep.dispatch(buf, x, i, w, num_experts=E, layout=layout, recv_capacity=cap)
        y = jnp.zeros((cap + delta, H), jnp.float32)
        return jax_ep.combine(buf, y, res.handle)

    with pytest.raises(ERRORS, match=r"(?i)capacity|rows|\by\b"):
        shard_jit(mesh, f)(x, idx, w)


# ------------------------------------------------------------------------------------------------
# checked mode (checkify)
# ------------------------------------------------------------------------------------------------
def _checked_fn(mesh, buf, **kw):
    def f(x, idx, w):
        res = jax_ep.dispatch(buf, x, idx, w, num_experts=E, **kw)
        return res.recv_x

    return jax.jit(checkify.checkify(jax.shard_map(f, mesh=mesh, in_specs=P("ep"),
                                                   out_specs=P("ep"))))


@pytest.fixture(scope="module")
def checked_buf(mesh):
    with make_buffer(mesh, tokens=T, hidden=H, topk=K, checked=True) as b:
        yield b


@pytest.mark.parametrize("layout", ["token", "expert"])
def test_checked_passes_silently(mesh, checked_buf, rng, layout):
    x, idx, w = arrays(rng)
    idx[::3, -1] = -1  # -1 is "not routed", not an error
    err, out = _checked_fn(mesh, checked_buf, layout=layout)(x, idx, w)
    assert err.get() is None, err.get()
    err.throw()  # no-op
    assert np.asarray(out).shape[1] == H


@pytest.mark.parametrize("layout", ["token", "expert"])
@pytest.mark.parametrize("bad_id", [E, -2, 2**31 - 1])
def test_checked_reports_invalid_ids(mesh, checked_buf, rng, layout, bad_id):
    x, idx, w = arrays(rng)
    idx[3, 0] = bad_id  # one invalid entry on rank 0 only
    err, _ = _checked_fn(mesh, checked_buf, layout=layout)(x, idx, w)
    msg = err.get()
    assert msg is not None
    assert "invalid" in msg.lower() or "outside" in msg.lower() or "topk_idx" in msg, msg
    with pytest.raises(checkify.JaxRuntimeError):
        err.throw()


def _all_to_expert0(idx):
    idx[:] = 0  # every slot to expert 0 (rank 0)


def _padding_overflow(idx):
    idx[:] = -1  # two real rows: one for each local expert of rank 0
    idx[0, 0] = 0
    idx[1, 0] = 1


@pytest.mark.parametrize("layout,kw,route", [
    ("token", dict(recv_capacity=1), _all_to_expert0),
    ("expert", dict(recv_capacity=3), _all_to_expert0),
    # 2 real rows, but expert 0's group is padded to 8 rows so expert 1's row starts at C:
    ("expert", dict(recv_capacity=8, expert_alignment=8), _padding_overflow),
], ids=["token", "expert", "expert-padding"])
def test_checked_reports_drops(mesh, checked_buf, rng, layout, kw, route):
    x, idx, w = arrays(rng)
    route(idx)
    err, _ = _checked_fn(mesh, checked_buf, layout=layout, **kw)(x, idx, w)
    msg = err.get()
    assert msg is not None
    assert "drop" in msg.lower() or "capacity" in msg.lower(), msg
    with pytest.raises(checkify.JaxRuntimeError):
        err.throw()


def test_checked_no_drop_at_exact_capacity(mesh, checked_buf, rng):
    """A capacity that exactly fits is not an error."""
    x, idx, w = arrays(rng)
    idx[:] = 0
    idx[:, 1:] = -1  # R*T rows to expert 0
    err, _ = _checked_fn(mesh, checked_buf, layout="expert", recv_capacity=R * T)(x, idx, w)
    assert err.get() is None, err.get()


def test_unchecked_does_not_raise(mesh, buf, rng):
    """Without checked=True, invalid ids and drops are only counted (no error, no checkify)."""
    x, idx, w = arrays(rng)
    idx[0, 0] = E + 1

    def f(x, idx, w):
        res = jax_ep.dispatch(buf, x, idx, w, num_experts=E, recv_capacity=1)
        return jnp.stack([res.num_invalid, res.num_dropped])[None]

    out = np.asarray(shard_jit(mesh, f)(x, idx, w))
    assert out[0, 0] == 1 and out[1, 0] == 0
    assert out[:, 1].sum() > 0


def test_cuda_workspace_limits_checked_at_trace_time():
    """A call larger than a "cuda" Buffer's workspace is refused while tracing, naming the sizes."""
    buf = jax_ep.Buffer(make_mesh(2), "ep", backend="xla")
    buf.check_fits(10**6, 10**6, 99)  # the reference backend has no workspace limits
    buf.backend, buf.max_tokens_per_rank, buf.hidden, buf.num_topk = "cuda", 64, 128, 4
    with pytest.raises(ValueError, match="only a low-latency workspace"):
        buf.check_fits(1, 1, 1)  # no workspace for the normal ops (ll_max_tokens_per_rank only)
    buf.workspace_id = 1  # as if it had one
    buf.check_fits(64, 128, 4)
    for too_big in [(65, 128, 4), (64, 129, 4), (64, 128, 5)]:
        with pytest.raises(ValueError, match="max_tokens_per_rank=64, hidden=128, num_topk=4"):
            buf.check_fits(*too_big)


@pytest.mark.parametrize("kw", [dict(num_sms=0), dict(num_recv_sms=-1),
                                dict(num_sms=8, num_recv_sms=8)])
def test_bad_sm_budget(kw):
    """SM budgets are checked at Buffer creation, before any device work, naming the option."""
    with pytest.raises(ValueError, match="num_recv_sms" if "num_recv_sms" in kw else "num_sms"):
        jax_ep.Buffer(make_mesh(2), "ep", backend="xla", **kw)


@pytest.mark.parametrize("value,error,match", [
    (3, ValueError, "must divide the number of EP ranks"),
    (0, ValueError, "num_ranks_per_node must be >= 1"),
    (2.0, TypeError, "num_ranks_per_node .* must be a static integer"),
    ("2", TypeError, "must be a static integer"),
])
def test_bad_num_ranks_per_node(value, error, match):
    with pytest.raises(error, match=match):
        jax_ep.Buffer(make_mesh(4), "ep", backend="xla", num_ranks_per_node=value)


def test_num_ranks_per_node_resolution():
    """Given: kept (numpy integers too) and shown; not given: one node on one process; backend
    "auto" never picks the kernels for nodes a single process cannot serve."""
    mesh = make_mesh(4)
    buf = jax_ep.Buffer(mesh, "ep", backend="xla", num_ranks_per_node=np.int64(2))
    assert buf.num_ranks_per_node == 2 and "nodes=2x2" in repr(buf)
    assert jax_ep.Buffer(mesh, "ep", backend="xla").num_ranks_per_node == 4
    auto = jax_ep.Buffer(mesh, "ep", num_ranks_per_node=1, max_tokens_per_rank=8, hidden=16,
                         num_topk=2)
    assert auto.backend == "xla" and auto.num_ranks_per_node == 1
    auto.close()


def test_hosts_group_the_ranks_into_nodes():
    """The default node grouping of backend "cuda" across processes: consecutive ranks of one
    host, as many per host; anything else asks for num_ranks_per_node."""
    from types import SimpleNamespace

    from jax_ep.backends import transport

    def groups(*processes):
        return np.array([[SimpleNamespace(process_index=p) for p in processes]], object)

    hosts = ["a", "a", "b", "b", "c", "c"]
    assert transport.ranks_per_node_from_hosts(groups(0, 1, 2, 3), hosts) == 2
    assert transport.ranks_per_node_from_hosts(groups(0, 1), hosts) == 2
    assert transport.ranks_per_node_from_hosts(groups(0, 2, 4), hosts) == 1
    with pytest.raises(ValueError, match="consecutive and equally many"):
        transport.ranks_per_node_from_hosts(groups(0, 2, 1, 3), hosts)
    with pytest.raises(ValueError, match="consecutive and equally many"):
        transport.ranks_per_node_from_hosts(groups(0, 1, 2), hosts)


def test_internode_workspace_bytes():
    """Several nodes add the network leg's message slots: a receive and a send slot per (node,
    token) of slot + 128 bytes (forward slots for up to 32 ranks), a signal word per receive
    slot."""
    shape = dict(num_experts=16, num_topk=8, hidden=7168, max_tokens_per_rank=4096, num_ranks=16)
    flat = jax_ep.Buffer.workspace_bytes(**shape)
    assert jax_ep.Buffer.workspace_bytes(**shape, num_ranks_per_node=16) == flat
    slot = jax_ep.buffer.slot_bytes_for(7168, 8)
    extra = -(-2 * 4096 * 8 // 256) * 256 + 2 * 2 * 4096 * (slot + 128)
    assert jax_ep.Buffer.workspace_bytes(**shape, num_ranks_per_node=8) == flat + extra


@pytest.mark.parametrize("ranks,per_node", [(1, 0), (2, 1), (4, 2), (8, 8), (16, 4), (6, 3)])
def test_workspace_bytes_agree_with_the_extension(ranks, per_node, monkeypatch):
    """The Python fallback formula (machines without the extension) equals what the extension
    allocates (Workspace::BytesPerDevice), which sizes NVSHMEM's heap."""
    from jax_ep import _ffi
    from jax_ep.backends import transport

    if _ffi.extension() is None:
        pytest.skip("the CUDA extension is not built")
    for slots, slot_bytes in [(1, 16), (37, 1040), (4096, 29008)]:
        spec = transport.WorkspaceSpec(slots, slot_bytes, 1, 0, 0, per_node)
        native = spec.bytes_per_rank(ranks)
        monkeypatch.setattr(_ffi, "extension", lambda: None)
        assert spec.bytes_per_rank(ranks) == native, (slots, slot_bytes)
        monkeypatch.undo()


@pytest.mark.gpu
def test_internode_needs_one_process_per_gpu():
    """One process cannot run the internode kernels: a clear error naming the fix."""
    with pytest.raises(ValueError, match="one process per GPU"):
        jax_ep.Buffer(make_mesh(2), "ep", backend="cuda", max_tokens_per_rank=8, hidden=16,
                      num_topk=2, num_ranks_per_node=1)


def test_process_layouts_the_transports_cannot_serve():
    """Multi-process meshes: one GPU of the mesh per process, and every process in it."""
    from types import SimpleNamespace

    import jax
    from jax_ep.backends import transport

    me = jax.process_index()

    def dev(process):
        return SimpleNamespace(process_index=process)

    assert transport.process_layout(np.array([[dev(me), dev(me)]], object)) == "p2p"
    with pytest.raises(ValueError, match="one GPU of the mesh per process"):
        transport.process_layout(np.array([[dev(me), dev(me), dev(me + 1)]], object))
    with pytest.raises(ValueError, match="a mesh over every process"):
        transport.process_layout(np.array([[dev(me), dev(me + 1)]], object))
    assert not transport.available(np.array([[dev(me), dev(me + 1)]], object))


def test_nvshmem_initialises_once_per_process(monkeypatch):
    """A later Buffer on another GPU than NVSHMEM came up on is refused, naming both."""
    import jax
    from jax_ep import _bootstrap, _ffi

    class Initialised:  # NVSHMEM already running on GPU 1 as PE 0 of 1
        @staticmethod
        def state():
            return (1, jax.process_index(), jax.process_count())

    monkeypatch.setattr(_ffi, "nvshmem_extension", lambda: Initialised)
    with pytest.raises(ValueError, match="initialises once per process; it runs on GPU 1"):
        _bootstrap.init_nvshmem(0, heap_bytes=1 << 20, timeout_s=1.0)
    assert _bootstrap.init_nvshmem(1, heap_bytes=1 << 20, timeout_s=1.0) is Initialised


def test_nvshmem_bootstrap_needs_jax_distributed(monkeypatch):
    """Without jax.distributed the unique ID has nowhere to travel: a clear error."""
    from jax_ep import _bootstrap, _ffi

    class Fresh:
        @staticmethod
        def state():
            return None

    monkeypatch.setattr(_ffi, "nvshmem_extension", lambda: Fresh)
    with pytest.raises(RuntimeError, match="needs jax.distributed.initialize"):
        _bootstrap.init_nvshmem(0, heap_bytes=1 << 20, timeout_s=1.0)
