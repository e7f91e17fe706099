"""The CUDA extension ``jax_ep._jax_ep_cuda`` as XLA FFI custom calls.

Importing this module never fails: without the extension ``HAS_CUDA_EXTENSION`` is False and
``IMPORT_ERROR`` says why (a built extension that fails to load also warns). The extension's
handlers are registered for platform "CUDA" at import; on a machine without GPUs that
registration is only queued, so the CUDA lowering can still be traced and inspected there.
"""
from __future__ import annotations

import ctypes
import dataclasses
import importlib
import importlib.util
import os
import warnings

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
from jaxlib import xla_client  # CustomCallTargetTraits: jax.ffi has no public alias

_EXT_NAME = f"{__package__}._jax_ep_cuda"
_ext = None
IMPORT_ERROR: str | None = None
if importlib.util.find_spec(_EXT_NAME) is None:  # pure-Python install
    IMPORT_ERROR = f"{_EXT_NAME} was not built"
else:
    try:
        _ext = importlib.import_module(_EXT_NAME)
    except ImportError as e:  # built but unloadable: say so, then fall back
        IMPORT_ERROR = f"{type(e).__name__}: {e}"
        warnings.warn(f"jax_ep: the CUDA extension did not load ({IMPORT_ERROR}); "
                      "using the pure-JAX backend", RuntimeWarning, stacklevel=2)

HAS_CUDA_EXTENSION: bool = _ext is not None

# The NVSHMEM transport (multi-process backend "cuda") is a second extension, loaded on demand:
# it needs NVSHMEM's host library, which the main extension must not.
_NVSHMEM_EXT_NAME = f"{__package__}._jax_ep_nvshmem"
_nvshmem_ext = None

# Bytes of the flags/counts/pointers area at the head of every workspace: exported by the
# extension (xla_ffi/common/comm.h kSignalBytes); the literal serves builds without it.
SIGNAL_BYTES: int = int(getattr(_ext, "SIGNAL_BYTES", 667136))
# Most ranks of one EP group (xla_ffi/common/comm.h kMaxRanks).
MAX_RANKS: int = int(getattr(_ext, "MAX_RANKS", 32))

LAYOUT_TARGET = "jax_ep_dispatch_layout"
LAYOUT_MAX_EXPERTS = 1024  # xla_ffi/layout_kernels.h kLayoutMaxExperts
LAYOUT_MAX_RANKS = 64      # xla_ffi/layout_kernels.h kLayoutMaxRanks

if _ext is not None:
    _graph_safe = set(getattr(_ext, "command_buffer_targets", list)())
    for _name, _capsule in _ext.registrations().items():
        # XLA takes a handler into a CUDA graph only if it was registered with this trait.
        _traits = ({"traits": xla_client.CustomCallTargetTraits.COMMAND_BUFFER_COMPATIBLE}
                   if _name in _graph_safe else {})
        jax.ffi.register_ffi_target(_name, _capsule, platform="CUDA", **_traits)


def extension():
    """The loaded ``jax_ep._jax_ep_cuda`` module, or None."""
    return _ext


def nvshmem_available() -> bool:
    """Whether the NVSHMEM transport was built (it may still fail to load: see below)."""
    return _ext is not None and importlib.util.find_spec(_NVSHMEM_EXT_NAME) is not None


def _nvshmem_host_library() -> str:
    """Path of libnvshmem_host.so.3: $NVSHMEM_HOME/lib, else the pip package nvidia-nvshmem-cu13."""
    home = os.environ.get("NVSHMEM_HOME")
    if not home:
        try:
            import nvidia.nvshmem  # noqa: PLC0415 (namespace package of the pip wheel)
        except ImportError:
            raise RuntimeError(
                "jax_ep: NVSHMEM is missing: multi-process backend 'cuda' needs it "
                "(pip install nvidia-nvshmem-cu13, or set NVSHMEM_HOME)") from None
        home = list(nvidia.nvshmem.__path__)[0]
    for name in ("libnvshmem_host.so.3", "libnvshmem_host.so"):
        path = os.path.join(home, "lib", name)
        if os.path.exists(path):
            return path
    raise RuntimeError(f"jax_ep: NVSHMEM is missing: no libnvshmem_host.so.3 in {home}/lib")


def nvshmem_extension():
    """The ``jax_ep._jax_ep_nvshmem`` module (loaded on first use), or RuntimeError saying why
    it cannot be."""
    global _nvshmem_ext
    if _nvshmem_ext is not None:
        return _nvshmem_ext
    if not nvshmem_available():
        raise RuntimeError(
            "jax_ep was built without its NVSHMEM transport (NVSHMEM was not found at install "
            "time, or nvcc was not): pip install nvidia-nvshmem-cu13, then reinstall jax_ep")
    # Its soname must resolve before the extension loads; the library finds its plugins
    # (bootstrap, transports) next to itself.
    ctypes.CDLL(_nvshmem_host_library(), mode=ctypes.RTLD_GLOBAL)
    module = importlib.import_module(_NVSHMEM_EXT_NAME)
    # The internode handlers live there and reach the main extension's workspaces by its table.
    module.bind_workspace_api(_ext.workspace_api())
    for name, capsule in module.registrations().items():
        jax.ffi.register_ffi_target(name, capsule, platform="CUDA")
    _nvshmem_ext = module
    return _nvshmem_ext


def preload(devices=None) -> None:
    """Loads every kernel of the extension on each GPU of ``devices`` (default: local GPUs) now.

    Call outside jit, e.g. when an EP group is created: a kernel's first launch otherwise
    takes the driver's module-loading lock, which can deadlock against a peer kernel that spins.
    """
    if _ext is None:
        return
    devices = jax.local_devices() if devices is None else devices
    for d in devices:
        if d.platform == "gpu":
            _ext.preload(d.local_hardware_id)


@dataclasses.dataclass(frozen=True)
class LayoutConfig:
    """Static configuration of ``jax_ep_dispatch_layout`` (C++: ``jax_ep::LayoutConfig``)."""

    num_experts: int
    num_ranks: int

    def __post_init__(self):
        e, r = self.num_experts, self.num_ranks
        if not 1 <= r <= LAYOUT_MAX_RANKS:
            raise ValueError(f"the CUDA layout kernel supports 1..{LAYOUT_MAX_RANKS} ranks, "
                             f"got {r}")
        if not 1 <= e <= LAYOUT_MAX_EXPERTS or e % r:
            raise ValueError(f"the CUDA layout kernel needs num_experts in 1..{LAYOUT_MAX_EXPERTS} "
                             f"and a multiple of num_ranks ({r}), got {e}")

    def attribute(self) -> dict:
        """The FFI dictionary attribute (Python ints lower to i64)."""
        return {"num_experts": int(self.num_experts), "num_ranks": int(self.num_ranks)}


def result_type(aval, shape, dtype):
    """A result type on ``aval``'s mesh with its varying manual axes (a plain ShapeDtypeStruct
    loses them inside shard_map), replicated over the other axes: the call is per shard."""
    sharding = aval.sharding
    if getattr(sharding, "spec", None) is not None:
        sharding = sharding.update(spec=P())
    return aval.update(shape=tuple(shape), dtype=jnp.dtype(dtype), sharding=sharding)


def dispatch_layout_supported(num_experts: int, num_ranks: int) -> bool:
    """Whether ``dispatch_layout_cuda`` accepts this configuration (E <= 1024, R <= 64, R | E)."""
    try:
        LayoutConfig(num_experts, num_ranks)
    except ValueError:
        return False
    return True


def dispatch_layout_cuda(topk_idx, num_experts: int, num_ranks: int):
    """The ``jax_ep_dispatch_layout`` custom call (CUDA only; the caller picks the platform).

    Per shard; usable inside ``jax.shard_map`` (results keep ``topk_idx``'s varying axes).

    Args:
      topk_idx: [T, K] int32 expert ids; -1 = not routed; ids outside [-1, E) are invalid:
        ignored like -1 and counted. T and K may be 0.
      num_experts: E, 1..1024, a multiple of num_ranks; expert e lives on rank e // (E // R).
      num_ranks: R, 1..64.

    Returns:
      (num_tokens_per_rank [R] int32, num_tokens_per_expert [E] int32,
       is_token_in_rank [T, R] bool, num_invalid [] int32).

    Raises:
      TypeError / ValueError: wrong dtype or rank of topk_idx, or an unsupported (E, R).
    """
    config = LayoutConfig(int(num_experts), int(num_ranks))
    aval = jax.typeof(topk_idx)
    if aval.dtype != jnp.int32:
        raise TypeError(f"topk_idx must be int32, got {aval.dtype}")
    if aval.ndim != 2:
        raise ValueError(f"topk_idx must be [T, K], got shape {aval.shape}")
    e, r, t = config.num_experts, config.num_ranks, aval.shape[0]
    out_types = (result_type(aval, (r,), jnp.int32), result_type(aval, (e,), jnp.int32),
                 result_type(aval, (t, r), jnp.bool_), result_type(aval, (), jnp.int32))
    call = jax.ffi.ffi_call(LAYOUT_TARGET, out_types, has_side_effect=False,
                            vmap_method="sequential")
    return tuple(call(topk_idx, config=config.attribute()))
