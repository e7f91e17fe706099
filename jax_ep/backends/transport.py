"""Transports of backend "cuda": who allocates the workspaces and how ranks reach each other.

Chosen once, at Buffer creation, from the mesh's process layout:
- "p2p": every GPU of the mesh belongs to this process (JAX's default model); one cudaMalloc
  per GPU, peer access enabled; kernels may write peers' XLA buffers directly.
- "nvshmem": the mesh spans processes, one GPU each (jax.distributed); NVSHMEM initialises
  once per process, the workspace comes from nvshmem_malloc and peers are mapped with
  nvshmem_ptr; every row travels through the workspaces (the kernels' staged paths).
"""
from __future__ import annotations

import collections
import dataclasses

import jax
import numpy as np

from .. import _bootstrap, _ffi


@dataclasses.dataclass(frozen=True)
class WorkspaceSpec:
    """Sizes of one workspace (mirrors xla_ffi/runtime/workspace.h WorkspaceConfig)."""

    slots_per_rank: int   # staging slots per source rank (= max_tokens_per_rank)
    slot_bytes: int       # bytes of the largest slot
    num_blocks: int       # grid of every kernel
    num_recv_blocks: int  # receive-only blocks of the SM split
    timeout_ns: int       # bound of every wait on a peer

    def bytes_per_rank(self, num_ranks: int) -> int:
        flags = -(-num_ranks * self.slots_per_rank * 8 // 256) * 256
        return _ffi.SIGNAL_BYTES + flags + num_ranks * self.slots_per_rank * self.slot_bytes


def _ints(spec: WorkspaceSpec):
    return (int(spec.slots_per_rank), int(spec.slot_bytes), int(spec.num_blocks),
            int(spec.num_recv_blocks), int(spec.timeout_ns))


class P2PTransport:
    """Every GPU of the EP groups in this process."""

    name = "p2p"

    def create_workspace(self, groups: np.ndarray, spec: WorkspaceSpec) -> int:
        ordinals = [[int(d.local_hardware_id) for d in g] for g in groups]
        return _ffi.extension().create_workspace(ordinals, *_ints(spec))

    def release(self, workspace_id: int) -> None:
        _ffi.extension().release_workspace(workspace_id)

    def error(self, workspace_id: int) -> str:
        return _ffi.extension().workspace_error(workspace_id)


class NvshmemTransport:
    """One GPU per process; creation and release are collective over all processes."""

    name = "nvshmem"

    def __init__(self, timeout_s: float):
        self.timeout_s = max(float(timeout_s), 60.0)  # creation waits for the slowest process

    def create_workspace(self, groups: np.ndarray, spec: WorkspaceSpec) -> int:
        mine = [d for d in groups.ravel() if d.process_index == jax.process_index()]
        device = int(mine[0].local_hardware_id)
        bytes_needed = spec.bytes_per_rank(groups.shape[1])
        ext = _bootstrap.init_nvshmem(device, heap_bytes=bytes_needed, timeout_s=self.timeout_s)
        pes = [[int(d.process_index) for d in g] for g in groups]
        workspace_id = _ffi.extension().create_workspace(pes, *_ints(spec), ext.mapping())
        # Every process has zeroed its signal area before any peer's first kernel writes to it.
        _bootstrap.barrier("workspace_created", self.timeout_s)
        return workspace_id

    def release(self, workspace_id: int) -> None:
        _bootstrap.barrier("workspace_release", self.timeout_s)  # no peer still uses it
        _ffi.extension().release_workspace(workspace_id)

    def error(self, workspace_id: int) -> str:
        return _ffi.extension().workspace_error(workspace_id)


def process_layout(groups: np.ndarray) -> str:
    """"p2p" or "nvshmem" for EP groups [G, R] of devices; ValueError for layouts neither
    transport can serve."""
    processes = collections.Counter(d.process_index for d in groups.ravel())
    if set(processes) == {jax.process_index()}:
        return "p2p"
    crowded = {p: n for p, n in processes.items() if n > 1}
    if crowded:
        p, n = next(iter(crowded.items()))
        raise ValueError(
            f"backend 'cuda' across processes needs one GPU of the mesh per process (NVSHMEM "
            f"runs one GPU per PE), but process {p} holds {n} of them: start one process per "
            f"GPU (jax.distributed.initialize(..., local_device_ids=[i])) or keep the whole EP "
            f"mesh in one process")
    if len(processes) != jax.process_count():
        missing = sorted(set(range(jax.process_count())) - set(processes))
        raise ValueError(
            f"backend 'cuda' across processes needs a mesh over every process (NVSHMEM spans "
            f"all of them and allocates collectively); processes {missing} have no device in it")
    return "nvshmem"


def for_groups(groups: np.ndarray, timeout_s: float):
    """The transport serving EP groups [G, R] of devices (see process_layout)."""
    if process_layout(groups) == "p2p":
        return P2PTransport()
    return NvshmemTransport(timeout_s)


def available(groups: np.ndarray) -> bool:
    """Whether backend "cuda" can run over these groups in this build (for backend="auto")."""
    try:
        layout = process_layout(groups)
    except ValueError:
        return False
    return layout == "p2p" or _ffi.nvshmem_available()
