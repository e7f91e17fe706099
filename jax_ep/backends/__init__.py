"""Backends of the public ops (the protocol is in base.py) and their transports.

"xla" (xla.py) is the pure-JAX reference; "cuda" (cuda.py) calls the FFI kernels, whose
workspaces a transport (transport.py: P2P in one process, NVSHMEM across processes) creates at
Buffer creation.
"""
from __future__ import annotations

from .base import Backend, Transport

__all__ = ["Backend", "Transport", "get"]


def get(name: str) -> Backend:
    """The backend module named `name` ("xla" or "cuda"); it satisfies the Backend protocol."""
    if name == "xla":
        from . import xla  # noqa: PLC0415

        return xla
    if name == "cuda":
        from . import cuda  # noqa: PLC0415 (needs the extension only when traced)

        return cuda
    raise ValueError(f"unknown backend {name!r}")
