"""jax_ep: expert-parallel dispatch/combine for JAX (see docs/api.md for the contract)."""
from . import _ffi, low_latency, nn
from .buffer import Buffer
from .layout import get_dispatch_layout
from .ops import combine, default_recv_capacity, dispatch
from .types import DispatchConfig, DispatchHandle, DispatchLayout, DispatchResult

__version__ = "0.1.0"

__all__ = [
    "Buffer", "low_latency", "nn", "DispatchConfig", "DispatchHandle", "DispatchLayout", "DispatchResult",
    "combine", "default_recv_capacity", "dispatch", "get_dispatch_layout",
]
