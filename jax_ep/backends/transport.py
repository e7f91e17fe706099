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


def _align(n: int, a: int) -> int:
    return -(-n // a) * a


@dataclasses.dataclass(frozen=True)
class WorkspaceSpec:
    """Sizes of one workspace (mirrors xla_ffi/runtime/workspace.h WorkspaceConfig)."""

    slots_per_rank: int   # staging slots per source rank (= max_tokens_per_rank)
    slot_bytes: int       # bytes of the largest slot
    num_blocks: int       # grid of every kernel
    num_recv_blocks: int  # receive-only blocks of the SM split
    timeout_ns: int       # bound of every wait on a peer
    ranks_per_node: int = 0  # G; 0 or R: one node (no internode area)

    def bytes_per_rank(self, num_ranks: int) -> int:
        """Workspace bytes per GPU: the extension's own count when it is built (it allocates
        them), else the same formula here (Buffer.workspace_bytes on machines without it)."""
        ext = _ffi.extension()
        if ext is not None and hasattr(ext, "workspace_bytes"):
            return int(ext.workspace_bytes(num_ranks, self.slots_per_rank, self.slot_bytes,
                                           self.ranks_per_node))
        flags = _align(num_ranks * self.slots_per_rank * 8, 256)
        staging = num_ranks * self.slots_per_rank * self.slot_bytes
        return _ffi.SIGNAL_BYTES + flags + staging + self.internode_bytes(num_ranks)

    def internode_bytes(self, num_ranks: int) -> int:
        """The network leg's area (Workspace::internode_bytes): per source node a message slot
        per token (its arrival signal, the receive slot) and per destination node a send slot
        (puts read symmetric memory), each message carrying up to MAX_RANKS forward slots."""
        nodes = num_ranks // self.ranks_per_node if self.ranks_per_node else 1
        if nodes <= 1:
            return 0
        message = self.slot_bytes + _align(4 * _ffi.MAX_RANKS, 16)
        signals = _align(nodes * self.slots_per_rank * 8, 256)
        return signals + 2 * nodes * self.slots_per_rank * message


def _ints(spec: WorkspaceSpec):
    return (int(spec.slots_per_rank), int(spec.slot_bytes), int(spec.num_blocks),
            int(spec.num_recv_blocks), int(spec.timeout_ns))


class P2PTransport:
    """Every GPU of the EP groups in this process."""

    name = "p2p"

    def ranks_per_node(self, groups: np.ndarray, requested) -> int:
        """One process drives the whole EP axis: one node."""
        num_ranks = groups.shape[1]
        if requested is not None and requested < num_ranks:
            raise ValueError(
                f"num_ranks_per_node={requested} < {num_ranks} ranks selects the internode "
                f"kernels of backend 'cuda', which run one process per GPU (NVSHMEM; "
                f"jax.distributed): this mesh is driven by one process (transport 'p2p'). Use "
                f"backend='xla' for the same semantics in one process")
        return num_ranks

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

    def ranks_per_node(self, groups: np.ndarray, requested) -> int:
        """`requested`, else the ranks of one host (hostnames through the key-value store)."""
        if requested is not None:
            return requested
        hosts = _bootstrap.process_hosts(self.timeout_s)
        return ranks_per_node_from_hosts(groups, hosts)

    def create_workspace(self, groups: np.ndarray, spec: WorkspaceSpec) -> int:
        mine = [d for d in groups.ravel() if d.process_index == jax.process_index()]
        device = int(mine[0].local_hardware_id)
        bytes_needed = spec.bytes_per_rank(groups.shape[1])
        ext = _bootstrap.init_nvshmem(device, heap_bytes=bytes_needed, timeout_s=self.timeout_s)
        pes = [[int(d.process_index) for d in g] for g in groups]
        workspace_id = _ffi.extension().create_workspace(pes, *_ints(spec), ext.mapping(),
                                                         int(spec.ranks_per_node))
        if 0 < spec.ranks_per_node < groups.shape[1]:
            ext.preload(device)  # the internode kernels (this extension's), outside jit
        # Every process has zeroed its signal area before any peer's first kernel writes to it.
        _bootstrap.barrier("workspace_created", self.timeout_s)
        return workspace_id

    def release(self, workspace_id: int) -> None:
        _bootstrap.barrier("workspace_release", self.timeout_s)  # no peer still uses it
        _ffi.extension().release_workspace(workspace_id)

    def error(self, workspace_id: int) -> str:
        return _ffi.extension().workspace_error(workspace_id)


def ranks_per_node_from_hosts(groups: np.ndarray, hosts) -> int:
    """G for EP groups [Gs, R] of devices whose processes run on hosts[process_index]: the
    ranks of one host must be consecutive on the EP axis and every host must hold as many."""
    sizes = set()
    for group in groups:
        names = [hosts[d.process_index] for d in group]
        runs = [1]
        for prev, cur in zip(names, names[1:]):
            if cur == prev:
                runs[-1] += 1
            else:
                runs.append(1)
        if len(runs) != len(set(names)) or len(set(runs)) != 1:
            raise ValueError(
                f"jax_ep: the EP axis spans hosts {names} (in rank order): the internode kernels "
                f"need each host's ranks consecutive and equally many per host; order the mesh "
                f"that way or pass num_ranks_per_node")
        sizes.add(runs[0])
    if len(sizes) != 1:
        raise ValueError(f"jax_ep: EP groups with different ranks per host {sorted(sizes)}: pass "
                         f"num_ranks_per_node")
    return sizes.pop()


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


def available(groups: np.ndarray, ranks_per_node=None) -> bool:
    """Whether backend "cuda" can run over these groups in this build (for backend="auto"):
    several nodes need the internode kernels, one process per GPU."""
    try:
        layout = process_layout(groups)
    except ValueError:
        return False
    if layout == "p2p":
        return ranks_per_node is None or ranks_per_node >= groups.shape[1]
    return _ffi.nvshmem_available()
