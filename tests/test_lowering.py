"""The Python -> XLA FFI -> CUDA chain of the routing-layout kernel.

CPU: the CUDA lowering (traced on this machine) holds the `jax_ep_dispatch_layout` custom call,
the CPU lowering does not. GPU: the kernel's results equal a numpy computation exactly.
Lowering tests skip when the extension is not built, unless JAX_EP_REQUIRE_CUDA_EXT=1 (CI).
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jax_ep
from conftest import make_mesh
from jax_ep import _ffi

TARGET = "jax_ep_dispatch_layout"


@pytest.fixture
def extension():
    if not _ffi.HAS_CUDA_EXTENSION:
        why = f"CUDA extension not built ({_ffi.IMPORT_ERROR})"
        if os.environ.get("JAX_EP_REQUIRE_CUDA_EXT") == "1":
            pytest.fail(why + " but JAX_EP_REQUIRE_CUDA_EXT=1")
        pytest.skip(why)
    return _ffi.extension()


def numpy_layout(topk_idx, num_experts, num_ranks):
    """The contract (docs/api.md) in numpy."""
    valid = (topk_idx >= 0) & (topk_idx < num_experts)
    per_expert = np.bincount(topk_idx[valid], minlength=num_experts).astype(np.int32)
    rank = np.where(valid, topk_idx // (num_experts // num_ranks), -1)
    in_rank = (rank[:, :, None] == np.arange(num_ranks)).any(axis=1)
    invalid = np.int32(np.sum((topk_idx < -1) | (topk_idx >= num_experts)))
    return in_rank.sum(axis=0, dtype=np.int32), per_expert, in_rank, invalid


def random_topk(rng, num_tokens, num_topk, num_experts):
    """[T, K] int32 ids with some -1s and some invalid ids (including the int32 extremes)."""
    idx = rng.integers(-1, num_experts, size=(num_tokens, num_topk), dtype=np.int32)
    bad = rng.random(idx.shape) < 0.05
    junk = rng.choice(np.array([-2, -7, num_experts, num_experts + 3,
                                np.iinfo(np.int32).min, np.iinfo(np.int32).max], np.int32),
                      size=idx.shape)
    return np.where(bad, junk, idx).astype(np.int32)


def sharded_layout(layout_fn, mesh, num_experts):
    """shard_map over "ep" of a per-shard layout function; scalar outputs become [1]."""
    num_ranks = mesh.shape["ep"]

    def per_shard(idx):
        per_rank, per_expert, in_rank, invalid = layout_fn(idx, num_experts, num_ranks)
        return per_rank, per_expert, in_rank, invalid[None]

    return jax.jit(jax.shard_map(per_shard, mesh=mesh, in_specs=P("ep"), out_specs=P("ep")))


def _ffi_layout(idx, num_experts, num_ranks):
    return _ffi.dispatch_layout_cuda(idx, num_experts, num_ranks)


def _public_layout(idx, num_experts, num_ranks):
    out = jax_ep.get_dispatch_layout(idx, num_experts, num_ranks)
    return out.num_tokens_per_rank, out.num_tokens_per_expert, out.is_token_in_rank, out.num_invalid


def _hlo(fn, args, platform):
    return fn.trace(*args).lower(lowering_platforms=(platform,)).as_text()


@pytest.mark.parametrize("layout_fn", [_ffi_layout, _public_layout], ids=["ffi", "public"])
def test_cuda_lowering_has_custom_call(extension, layout_fn):
    mesh = make_mesh(4)
    idx = jnp.zeros((4 * 6, 3), jnp.int32)
    text = _hlo(sharded_layout(layout_fn, mesh, 16), (idx,), "cuda")
    assert f"@{TARGET}(" in text
    assert "config = {num_experts = 16 : i64, num_ranks = 4 : i64}" in text


def _varying(aval):
    """The varying-manual-axes marking of an aval (its attribute name differs across jax)."""
    return getattr(aval, "manual_axis_type", None) or getattr(aval, "vma", None)


def test_results_keep_varying_axes(extension):
    """Inside shard_map the results vary over "ep" like topk_idx (GPU.md: ShapeDtypeStruct
    results would lose that and break custom_vjp / platform_dependent type checks)."""
    mesh = make_mesh(4)
    seen = []

    def per_shard(idx):
        outs = _ffi.dispatch_layout_cuda(idx, 16, 4)
        seen.append([_varying(jax.typeof(o)) for o in outs] + [_varying(jax.typeof(idx))])
        return outs[0]

    jax.jit(jax.shard_map(per_shard, mesh=mesh, in_specs=P("ep"), out_specs=P("ep"))).trace(
        jnp.zeros((24, 3), jnp.int32))
    (marks,) = seen
    assert marks[-1] and marks == [marks[-1]] * 5, marks


def test_cpu_lowering_has_no_custom_call(extension):
    mesh = make_mesh(4)
    idx = jnp.zeros((4 * 6, 3), jnp.int32)
    assert TARGET not in _hlo(sharded_layout(_public_layout, mesh, 16), (idx,), "cpu")


def test_public_layout_on_cpu_matches_numpy(extension, rng):
    """With the extension built, the platform_dependent path still runs the pure-JAX branch here."""
    mesh = make_mesh(4)
    idx = random_topk(rng, 4 * 37, 5, 16)
    got = sharded_layout(_public_layout, mesh, 16)(idx)
    for r, shard in enumerate(np.split(idx, 4)):
        want = numpy_layout(shard, 16, 4)
        np.testing.assert_array_equal(np.asarray(got[0]).reshape(4, 4)[r], want[0])
        np.testing.assert_array_equal(np.asarray(got[1]).reshape(4, 16)[r], want[1])
        np.testing.assert_array_equal(np.asarray(got[2]).reshape(4, 37, 4)[r], want[2])
        assert int(got[3][r]) == want[3]


def test_extension_lists_its_targets(extension):
    assert TARGET in extension.registrations()


def test_layout_config_validation():
    assert _ffi.LayoutConfig(256, 8).attribute() == {"num_experts": 256, "num_ranks": 8}
    assert _ffi.dispatch_layout_supported(1024, 64)
    for e, r in [(2048, 8), (16, 3), (64, 128), (0, 1), (8, 0)]:
        assert not _ffi.dispatch_layout_supported(e, r)
        with pytest.raises(ValueError):
            _ffi.dispatch_layout_cuda(jnp.zeros((4, 2), jnp.int32), e, r)
    with pytest.raises(TypeError):
        _ffi.dispatch_layout_cuda(jnp.zeros((4, 2), jnp.int16), 8, 2)
    with pytest.raises(ValueError):
        _ffi.dispatch_layout_cuda(jnp.zeros((4,), jnp.int32), 8, 2)


# (T, K, E, R): T = 0 and K = 0, one block and many (grid-stride) blocks, vector and scalar
# loads (K % 4), word and byte writes of is_token_in_rank (R % 4), the largest E and R.
GPU_CASES = [(0, 8, 64, 4), (3, 0, 8, 2), (1, 1, 8, 8), (5, 3, 16, 4), (255, 4, 6, 3),
             (257, 8, 256, 8), (1000, 9, 1024, 64), (4099, 6, 12, 3), (70001, 8, 256, 8),
             (333, 32, 64, 64), (2048, 2, 1, 1)]


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens,num_topk,num_experts,num_ranks", GPU_CASES)
def test_gpu_layout_matches_numpy(extension, rng, num_tokens, num_topk, num_experts, num_ranks):
    gpu = jax.devices("gpu")[0]
    idx = random_topk(rng, num_tokens, num_topk, num_experts)
    fn = jax.jit(lambda x: _ffi.dispatch_layout_cuda(x, num_experts, num_ranks))
    got = jax.device_get(fn(jax.device_put(idx, gpu)))
    want = numpy_layout(idx, num_experts, num_ranks)
    assert got[2].dtype == np.bool_ and got[2].shape == (num_tokens, num_ranks)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    # A second call on the same executable must start from zero again.
    np.testing.assert_array_equal(jax.device_get(fn(jax.device_put(idx, gpu))[1]), want[1])


@pytest.mark.gpu
def test_gpu_layout_in_shard_map(extension, rng):
    """Every GPU of the mesh runs the kernel on its own tokens; also through the public API."""
    num_gpus = min(4, len(jax.devices("gpu")))
    mesh = make_mesh(num_gpus)
    num_experts, num_tokens = 8 * num_gpus, 301
    idx = random_topk(rng, num_gpus * num_tokens, 7, num_experts)
    for layout_fn in (_ffi_layout, _public_layout):
        f = sharded_layout(layout_fn, mesh, num_experts)
        assert f"@{TARGET}(" in f.trace(idx).lower().as_text()
        per_rank, per_expert, in_rank, invalid = jax.device_get(f(idx))
        for r, shard in enumerate(np.split(idx, num_gpus)):
            want = numpy_layout(shard, num_experts, num_gpus)
            np.testing.assert_array_equal(per_rank.reshape(num_gpus, -1)[r], want[0])
            np.testing.assert_array_equal(per_expert.reshape(num_gpus, -1)[r], want[1])
            np.testing.assert_array_equal(in_rank.reshape(num_gpus, num_tokens, -1)[r], want[2])
            assert invalid[r] == want[3]


@pytest.mark.gpu
def test_gpu_handler_reports_bad_config(extension):
    """A configuration the Python side would refuse comes back as an error naming the target."""
    idx = jnp.zeros((4, 2), jnp.int32)
    out_types = (jax.ShapeDtypeStruct((3,), jnp.int32), jax.ShapeDtypeStruct((16,), jnp.int32),
                 jax.ShapeDtypeStruct((4, 3), jnp.bool_), jax.ShapeDtypeStruct((), jnp.int32))
    call = jax.ffi.ffi_call(TARGET, out_types)
    with pytest.raises(Exception, match=f"{TARGET}: num_experts must be a multiple"):
        jax.block_until_ready(jax.jit(lambda x: call(x, config={"num_experts": 16,
                                                               "num_ranks": 3}))(idx))


def _lower_backend_cuda(layout: str, num_nodes: int = 1):
    """(custom-call targets, dispatch handle) of the forward and backward of backend "cuda"
    (dispatch -> combine -> loss, gradients of x and topk_weights) over 4 ranks, lowered for
    CUDA on this machine."""
    import re

    from jax_ep import ops
    from jax_ep.types import DispatchConfig

    R, T, H, K, E = 4, 16, 256, 2, 8
    mesh = make_mesh(R)
    cap = ops.default_recv_capacity(layout, R, T, K, E // R, 4)
    cfg = DispatchConfig(axis_name="ep", backend="cuda", layout=layout, num_ranks=R,
                         num_experts=E, num_tokens=T, num_topk=K, recv_capacity=cap,
                         send_capacity=T, expert_alignment=4, workspace_id=1,
                         num_nodes=num_nodes)
    seen = {}

    def per_shard(x, idx, w):
        res = ops._dispatch(cfg, x, None, idx, w)
        seen["handle"] = res.handle
        return ops._combine(cfg, res.recv_x * 2, res.handle)

    def loss(x, w, idx):
        f = jax.shard_map(per_shard, mesh=mesh, in_specs=P("ep"), out_specs=P("ep"))
        return f(x, idx, w).astype(jnp.float32).sum()

    x = jnp.ones((R * T, H), jnp.bfloat16)
    idx = jnp.zeros((R * T, K), jnp.int32)
    w = jnp.ones((R * T, K), jnp.float32)
    text = jax.jit(jax.grad(loss, argnums=(0, 1))).trace(x, w, idx).lower(
        lowering_platforms=("cuda",)).as_text()
    return set(re.findall(r"@(jax_ep_\w+)\(", text)), seen["handle"]


@pytest.mark.parametrize("layout", ["token", "expert"])
def test_cuda_backend_lowers_to_ep_custom_calls(layout, extension):
    """Forward and backward of backend "cuda" lower (on this CPU machine) to the jax_ep custom
    calls: the exchange, the return-and-reduce and the broadcast of combine's VJP."""
    targets, handle = _lower_backend_cuda(layout)
    assert {"jax_ep_dispatch", "jax_ep_combine", "jax_ep_broadcast"} <= targets, targets
    assert handle.node_pos is None and handle.fwd_slots is None


@pytest.mark.parametrize("layout", ["token", "expert"])
def test_internode_lowers_to_internode_custom_calls(layout, extension):
    """With two nodes of two ranks (DispatchConfig.num_nodes = 2) the forward and backward of
    backend "cuda" lower to the internode targets (NVSHMEM extension), with the node fields."""
    targets, handle = _lower_backend_cuda(layout, num_nodes=2)
    want = {"jax_ep_internode_dispatch", "jax_ep_internode_combine", "jax_ep_internode_broadcast"}
    assert want <= targets and not {"jax_ep_dispatch", "jax_ep_combine"} & targets, targets
    assert handle.node_pos.shape == (16, 2)
    assert handle.fwd_slots.shape == (2, 16, 2) and handle.node_recv_count.shape == (2,)


def test_nvshmem_transport_is_built_and_loads(extension):
    """The NVSHMEM transport compiles wherever the CUDA extension does (CI has nvcc) and, with
    NVSHMEM's host library installed, loads and draws unique IDs without a GPU."""
    if not _ffi.nvshmem_available():
        why = "the NVSHMEM transport was not built (NVSHMEM not found at build time)"
        if os.environ.get("JAX_EP_REQUIRE_CUDA_EXT") == "1":
            pytest.fail(why + " but JAX_EP_REQUIRE_CUDA_EXT=1")
        pytest.skip(why)
    try:
        module = _ffi.nvshmem_extension()
    except RuntimeError as e:  # NVSHMEM's runtime package is not installed here
        assert "nvidia-nvshmem-cu13" in str(e) or "NVSHMEM" in str(e), e
        pytest.skip(str(e))
    assert module.version().startswith("3.")
    assert module.state() is None  # nothing initialised it in this process
    # The internode handlers live there, bound to the main extension's workspaces at load.
    assert set(module.registrations()) == {"jax_ep_internode_dispatch", "jax_ep_internode_combine",
                                           "jax_ep_internode_broadcast"}
    module.bind_workspace_api(extension.workspace_api())  # idempotent
    with pytest.raises(TypeError):
        module.bind_workspace_api(b"not a capsule")
    first, second = module.unique_id(), module.unique_id()
    assert len(first) == len(second) > 0 and first != second
    with pytest.raises(RuntimeError, match="not initialised"):
        module.mapping()
    with pytest.raises(ValueError, match="unique ID has"):
        module.init(b"short", 0, 1, 0)
    assert extension.SIGNAL_BYTES == _ffi.SIGNAL_BYTES == 667136
