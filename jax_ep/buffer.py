"""jax_ep.Buffer: the expert-parallel group and (for GPU backends) its device workspace."""
from __future__ import annotations

import os
from typing import Optional

import jax
import numpy as np
from jax.sharding import Mesh

from . import _ffi
from .backends import transport as transports
from .layout import static_int

BACKENDS = ("auto", "xla", "cuda")


def _cuda_kernels_available() -> bool:
    """True when the extension carries the dispatch/combine kernels (not only the layout one)."""
    return _ffi.HAS_CUDA_EXTENSION and hasattr(_ffi.extension(), "create_workspace")


def _ep_groups(mesh: Mesh, axis_name: str) -> np.ndarray:
    """[G, R] devices: one EP group per slice of the other mesh axes, in rank order."""
    devices = np.asarray(mesh.devices)
    axis = list(mesh.axis_names).index(axis_name)
    return np.moveaxis(devices, axis, -1).reshape(-1, mesh.shape[axis_name])


def _check_recv_sms(num_recv_sms: int, num_sms: Optional[int]) -> None:
    if num_recv_sms < 0 or (num_sms is not None and num_recv_sms >= num_sms):
        bound = "num_sms" if num_sms is None else f"num_sms={num_sms}"
        raise ValueError(f"num_recv_sms must be in [0, {bound}), got {num_recv_sms}")


def _align16(n: int) -> int:
    return (n + 15) // 16 * 16


def slot_bytes_for(hidden: int, num_topk: int) -> int:
    """Largest staging slot any op needs for rows of `hidden` channels (float32 worst case):
    the row, its FP8 scales, and the routing metadata (id, weight, rank per top-k entry)."""
    return _align16(hidden * 4) + _align16(-(-hidden // 128) * 4) + _align16(num_topk * 12)


LL_CHUNK = 512  # channels per low-latency combine chunk (xla_ffi/low_latency/low_latency.h)
LL_MAX_LOCAL_EXPERTS = 1024  # xla_ffi/common/comm.h kMaxLocalExperts


def ll_slot_bytes_for(hidden: int, num_topk: int) -> int:
    """Staging slot of the low-latency workspace: a dispatched token (routing metadata, a
    bfloat16 row, FP8 scales), a combined partial row with its chunk flags, or a header of
    per-expert counts (one 8-byte word each)."""
    dispatch = _align16(num_topk * 12) + _align16(hidden * 2) + _align16(-(-hidden // 128) * 4)
    combine = _align16(hidden * 2) + _align16(-(-hidden // LL_CHUNK) * 8)
    return max(dispatch, combine, 8 * LL_MAX_LOCAL_EXPERTS)


def ll_slots_for(max_tokens: int) -> int:
    """Slots per source rank: per buffer parity, M dispatch slots + a header, and M combine."""
    return 2 * (max_tokens + 1) + 2 * max_tokens


class Buffer:
    """The EP group: mesh axis, backend and static options; create it outside jit.

    Args:
      mesh: a jax.sharding.Mesh holding the EP axis.
      axis_name: the EP axis (R = mesh.shape[axis_name] ranks).
      backend: "auto" (best available), "xla" (pure-JAX reference, any platform) or "cuda".
      checked: make invalid expert ids and dropped rows checkify errors (wrap the caller in
        jax.experimental.checkify.checkify).
      num_sms: blocks (one per SM) every CUDA kernel runs on (None = all SMs, at most 256).
      num_recv_sms: of those, the blocks an expert-layout dispatch devotes to receiving: they
        expand each arriving row into its expert rows while the others push (None = all but a
        quarter: the expansion's local copies outweigh the pushes; 0 = every block pushes first
        and receives after).
      max_tokens_per_rank, hidden, num_topk: backend "cuda": the largest call the workspace must
        hold (T, H, K); "auto" uses "cuda" only when they are given.
      ll_max_tokens_per_rank: M, the most tokens a rank sends per low-latency call
        (jax_ep.low_latency; with hidden and num_topk): backend "cuda" allocates a second,
        double-buffered workspace for them. Both backends need it for the low-latency ops
        (it fixes their receive shape [E_local, R * M, H]).
      timeout_s: backend "cuda": bound of every wait on a peer (default: env JAX_EP_TIMEOUT_S or
        60); on expiry the call fails naming the rank and phase instead of hanging.
      num_ranks_per_node: G, consecutive ranks of the EP axis that form one node (NVLink
        domain); R must be a multiple. None: backend "cuda" across processes groups the ranks by
        host; otherwise all R ranks form one node. With several nodes, backend "cuda" runs the
        internode kernels (NVSHMEM puts between nodes, NVLink inside them; one process per GPU)
        and combine (every backend) reduces inside each node before summing the nodes
        (docs/api.md). Smaller than the host (e.g. 1 or 2) makes "virtual nodes" on one host.

    Backend "cuda" picks its transport from the mesh (attribute `transport`): "p2p" when this
    process drives every GPU of it, "nvshmem" when it spans processes with one GPU each
    (jax.distributed; NVSHMEM initialises once per process). Creating and closing an "nvshmem"
    Buffer is collective: every process does it, in the same order.

    Use as a context manager, or call close(). A Buffer is static state: close over it in jit.
    An unclosed "nvshmem" Buffer keeps its memory until the process exits (freeing is
    collective, so garbage collection does not free it).
    """

    def __init__(self, mesh: Mesh, axis_name: str = "ep", *, backend: str = "auto",
                 checked: bool = False, num_sms: Optional[int] = None,
                 num_recv_sms: Optional[int] = None,
                 max_tokens_per_rank: Optional[int] = None, hidden: Optional[int] = None,
                 num_topk: Optional[int] = None, ll_max_tokens_per_rank: Optional[int] = None,
                 timeout_s: Optional[float] = None, num_ranks_per_node: Optional[int] = None):
        if not isinstance(mesh, Mesh):
            raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
        if axis_name not in mesh.shape:
            raise ValueError(f"axis {axis_name!r} is not in the mesh axes {tuple(mesh.shape)}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        platforms = {d.platform for d in np.asarray(mesh.devices).ravel()}
        on_gpu = platforms == {"gpu"}
        if ll_max_tokens_per_rank is not None and int(ll_max_tokens_per_rank) < 1:
            raise ValueError(f"ll_max_tokens_per_rank must be >= 1, got {ll_max_tokens_per_rank}")
        sized = None not in (hidden, num_topk) and (
            max_tokens_per_rank is not None or ll_max_tokens_per_rank is not None)
        num_ranks = int(mesh.shape[axis_name])
        if num_ranks_per_node is not None:  # before "auto" looks at it
            num_ranks_per_node = static_int(
                "num_ranks_per_node", num_ranks_per_node,
                meaning="G, consecutive ranks of the EP axis forming one node")
            if num_ranks % num_ranks_per_node:
                raise ValueError(f"num_ranks_per_node ({num_ranks_per_node}) must divide the "
                                 f"number of EP ranks ({num_ranks})")
        groups = _ep_groups(mesh, axis_name)
        if backend == "auto":
            usable = on_gpu and sized and _cuda_kernels_available()
            usable = usable and transports.available(groups, num_ranks_per_node)
            backend = "cuda" if usable else "xla"
        elif backend == "cuda":
            if not on_gpu:
                raise ValueError(f"backend 'cuda' needs a mesh of GPUs, got {sorted(platforms)}")
            if not _cuda_kernels_available():
                raise NotImplementedError(
                    "backend 'cuda': jax_ep was built without its CUDA extension (no nvcc at "
                    "install time); use backend='xla' or 'auto'")
            if not sized:
                raise ValueError("backend 'cuda' sizes its workspace at creation: pass "
                                 "hidden, num_topk and max_tokens_per_rank (and/or "
                                 "ll_max_tokens_per_rank for the low-latency ops)")
        if num_sms is not None and num_sms < 1:
            raise ValueError(f"num_sms must be >= 1, got {num_sms}")
        if num_recv_sms is not None:
            _check_recv_sms(num_recv_sms, num_sms)
        self.mesh = mesh
        self.axis_name = axis_name
        self.num_ranks = num_ranks
        # Resolved below for backend "cuda" across processes (ranks grouped by host).
        self.num_ranks_per_node = num_ranks_per_node or self.num_ranks
        self.backend = backend
        self.checked = bool(checked)
        self.num_sms, self.num_recv_sms = num_sms, num_recv_sms
        self.max_tokens_per_rank = max_tokens_per_rank
        self.hidden, self.num_topk = hidden, num_topk
        self.ll_max_tokens_per_rank = (None if ll_max_tokens_per_rank is None
                                       else int(ll_max_tokens_per_rank))
        self.workspace_id = 0
        self.ll_workspace_id = 0
        self.transport = None
        self._transport = None
        self._closed = False
        if backend == "cuda":
            self._create_workspace(groups, max_tokens_per_rank, hidden, num_topk, num_sms,
                                   num_recv_sms, timeout_s, num_ranks_per_node)

    def _create_workspace(self, groups, max_tokens, hidden, num_topk, num_sms, num_recv_sms,
                          timeout_s, num_ranks_per_node):
        if timeout_s is None:
            timeout_s = float(os.environ.get("JAX_EP_TIMEOUT_S", "60"))
        transport = transports.for_groups(groups, timeout_s)
        self.num_ranks_per_node = transport.ranks_per_node(groups, num_ranks_per_node)
        if num_sms is None:
            local = [d for d in groups.ravel() if d.process_index == jax.process_index()]
            num_sms = min(getattr(local[0], "core_count", 132) or 132, 256)
        if num_recv_sms is None:
            # EP2 H200, DeepEP config: 66 / 100 / 120 of 132 took 295 / 260 / 338 us; 33
            # senders still push ~320 GB/s (benchmarks/nvlink_probe.cu: 24 blocks, 318 GB/s).
            num_recv_sms = num_sms - max(num_sms // 4, 1)
        _check_recv_sms(num_recv_sms, num_sms)  # num_sms may only now be known
        self._transport, self.transport = transport, transport.name
        if max_tokens is not None:
            self.slot_bytes = slot_bytes_for(hidden, num_topk)
            spec = transports.WorkspaceSpec(int(max_tokens), int(self.slot_bytes), int(num_sms),
                                            int(num_recv_sms), int(timeout_s * 1e9),
                                            self.num_ranks_per_node)
            self.workspace_id = transport.create_workspace(groups, spec)
        if self.ll_max_tokens_per_rank is not None:
            spec = transports.WorkspaceSpec(ll_slots_for(self.ll_max_tokens_per_rank),
                                            ll_slot_bytes_for(hidden, num_topk), int(num_sms), 0,
                                            int(timeout_s * 1e9))
            self.ll_workspace_id = transport.create_workspace(groups, spec)
        self.num_sms, self.num_recv_sms = num_sms, num_recv_sms

    def check_fits(self, num_tokens: int, hidden: int, num_topk: int) -> None:
        """Trace-time check that a call fits the workspace of backend "cuda" (else ValueError)."""
        if self.backend != "cuda":
            return
        if not self.workspace_id:
            raise ValueError("this Buffer has only a low-latency workspace: create it with "
                             "max_tokens_per_rank for jax_ep.dispatch / combine")
        limits = (self.max_tokens_per_rank, self.hidden, self.num_topk)
        if num_tokens > limits[0] or hidden > limits[1] or num_topk > limits[2]:
            raise ValueError(
                f"this call has T={num_tokens}, H={hidden}, K={num_topk} but the Buffer's workspace "
                f"was sized for max_tokens_per_rank={limits[0]}, hidden={limits[1]}, "
                f"num_topk={limits[2]}: create the Buffer with larger ones")

    def check(self) -> None:
        """Raises RuntimeError if a kernel of this Buffer timed out waiting for a peer."""
        if self._closed:
            return
        for workspace_id in (self.workspace_id, self.ll_workspace_id):
            message = self._transport.error(workspace_id) if workspace_id else ""
            if message:
                raise RuntimeError(message)

    @staticmethod
    def workspace_bytes(*, num_experts: int, num_topk: int, hidden: int,
                        max_tokens_per_rank: int, num_ranks: int, dtype=None,
                        num_ranks_per_node: Optional[int] = None) -> int:
        """Device workspace backend "cuda" allocates per GPU for one MoE shape.

        Every rank may receive each peer's max_tokens_per_rank tokens once: a staging slot per
        (source rank, token) holding a row (sized for float32, so combines of any row dtype and
        FP8 dispatches fit; `dtype` is accepted for symmetry), an arrival flag per slot, and the
        signal area (flags, counts, pointers). With several nodes (num_ranks_per_node < R) also
        the network leg's message slots: a receive and a send slot per (node, token).
        """
        if num_experts % num_ranks:
            raise ValueError(f"num_experts ({num_experts}) must be a multiple of num_ranks "
                             f"({num_ranks})")
        del dtype
        spec = transports.WorkspaceSpec(max_tokens_per_rank, slot_bytes_for(hidden, num_topk),
                                        1, 0, 0, num_ranks_per_node or num_ranks)
        return spec.bytes_per_rank(num_ranks)

    def close(self) -> None:
        """Frees the device workspace (nothing to free for the xla backend). Idempotent.
        Collective for the "nvshmem" transport: every process closes it, in the same order."""
        if not self._closed:
            self._closed = True
            for workspace_id in (self.workspace_id, self.ll_workspace_id):
                if workspace_id:
                    self._transport.release(workspace_id)
        self._closed = True

    def __del__(self):
        if getattr(self, "transport", None) in (None, "nvshmem"):
            return  # nothing to free, or freeing is collective: it stays until the process exits
        try:
            self.close()
        except Exception:  # noqa: BLE001 (interpreter shutdown)
            pass

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> "Buffer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        transport = f", transport={self.transport!r}" if self.transport else ""
        nodes = self.num_ranks // self.num_ranks_per_node
        nodes = f", nodes={nodes}x{self.num_ranks_per_node}" if nodes > 1 else ""
        return (f"Buffer(axis={self.axis_name!r}, ranks={self.num_ranks}{nodes}, "
                f"backend={self.backend!r}{transport}, checked={self.checked})")
