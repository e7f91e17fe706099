"""The seams behind the public ops (jax_ep/ops.py is written once over them).

A Backend implements the per-shard primitives with the semantics of docs/api.md; every function
is called inside shard_map and reads its static configuration from the DispatchConfig or the
handle. A Transport creates (at Buffer creation, outside jit) the device workspace a kernel
backend runs over, and frees it.
"""
from __future__ import annotations

from typing import Optional, Protocol

import numpy as np

from ..types import DispatchConfig, DispatchHandle, DispatchResult


class Backend(Protocol):
    """Per-shard primitives: dispatch, combine and the pieces of their VJPs."""

    def dispatch(self, cfg: DispatchConfig, x, x_scales, topk_idx,
                 topk_weights) -> DispatchResult:
        """x [T, H], x_scales [T, H // 128] float32 or None, topk_idx [T, K] int32,
        topk_weights [T, K] float32 -> DispatchResult (docs/api.md)."""

    def combine(self, y, handle: DispatchHandle, weights=None):
        """y [C, W] -> [T, W]: sum over ranks of the rows (expert layout: of sum_k weights[row] *
        y[row]; weights [C] float32, None = unit weights), float32 accumulation in rank order."""

    def weights_to_slots(self, handle: DispatchHandle, row_grads):
        """Row-weight gradients (token layout [C, K]; expert layout [C]) -> [T, K] float32."""

    def broadcast_to_rows(self, handle: DispatchHandle, values):
        """values [T, ...] -> [C, ...]: every receive row gets its token's value (cached layout)."""


class Transport(Protocol):
    """Creates and frees the device workspaces of backend "cuda" (one id per Buffer)."""

    name: str  # "p2p" | "nvshmem"

    def create_workspace(self, groups: np.ndarray, spec) -> int:
        """groups: [G, R] jax Devices, one EP group per row in rank order; spec: WorkspaceSpec.
        Returns the workspace id the FFI handlers look up."""

    def release(self, workspace_id: int) -> None:
        """Frees the workspace (collective for transports spanning processes)."""

    def error(self, workspace_id: int) -> Optional[str]:
        """The timeout report of the workspace's kernels, or '' / None."""
