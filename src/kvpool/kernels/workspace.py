"""The split-K scratch of :func:`kvpool.kernels.paged_decode`: partial outputs and their log-sum-exps.

A split launch writes ``part [batch, q_heads, num_splits, head_dim]`` float32 and ``lse [batch, q_heads,
num_splits]`` float32, which the merge kernel reads back. Allocating them on every call costs two
``torch.empty`` calls of host time; a :class:`DecodeWorkspace` holds one float32 buffer that grows to the
largest call seen and hands out exact-size views of it, so steady-state decode allocates nothing (and a
CUDA graph captures fixed addresses).

The caller may own one (``paged_decode(..., workspace=ws)``: one per stream of concurrent calls, since two
calls in flight on different streams must not share scratch); without one, a workspace cached per
``(device, current CUDA stream)`` is used (:func:`cached_workspace`).
"""
from __future__ import annotations

import torch

from ..errors import KernelError


class DecodeWorkspace:
    """A growable float32 scratch buffer for split-K decode on one device.

    Parameters
    ----------
    device : torch.device or str
        Where the scratch lives (the queries' device).
    numel : int, optional
        float32 elements to reserve up front (e.g. the largest ``batch * q_heads * num_splits *
        (head_dim + 1)`` a server will use, before a CUDA graph capture).

    Examples
    --------
    >>> ws = DecodeWorkspace("cpu")
    >>> part, lse = ws.split_buffers(2, 8, 4, 64)
    >>> tuple(part.shape), tuple(lse.shape), ws.numel  # 2 * 8 * 4 * (64 + 1) = 4160
    ((2, 8, 4, 64), (2, 8, 4), 4160)
    """

    def __init__(self, device, numel: int = 0) -> None:
        self.device = torch.device(device)
        self._buffer = torch.empty(max(0, int(numel)), dtype=torch.float32, device=self.device)
        self._views: dict = {}  # (batch, q_heads, num_splits, head_dim) -> (part, lse) of the current buffer

    @property
    def numel(self) -> int:
        """float32 elements held now (grows, never shrinks)."""
        return self._buffer.numel()

    def split_buffers(self, batch: int, q_heads: int, num_splits: int, head_dim: int):
        """Contiguous ``part [batch, q_heads, num_splits, head_dim]`` and ``lse [batch, q_heads, num_splits]``
        float32 views of the scratch, growing it first when it is too small (the old contents are dropped:
        scratch holds nothing between calls)."""
        shape = (batch, q_heads, num_splits, head_dim)
        views = self._views.get(shape)
        if views is not None:
            return views
        rows = batch * q_heads * num_splits
        need = rows * (head_dim + 1)
        if self._buffer.numel() < need:
            self._buffer = torch.empty(need, dtype=torch.float32, device=self.device)
            self._views.clear()  # views of the old buffer would keep it alive
        part = self._buffer[:rows * head_dim].view(batch, q_heads, num_splits, head_dim)
        lse = self._buffer[rows * head_dim:need].view(batch, q_heads, num_splits)
        if len(self._views) >= 64:
            self._views.clear()
        self._views[shape] = (part, lse)
        return part, lse

    def check_device(self, device: torch.device) -> None:
        """:class:`KernelError` unless the scratch lives on ``device``."""
        if self.device != device and not (self.device.type == device.type == "cuda"
                                          and (self.device.index or 0) == (device.index or 0)):
            raise KernelError(f"workspace is on {self.device} but q is on {device}: pass "
                              f"DecodeWorkspace({str(device)!r})")


_CACHED: dict = {}


def cached_workspace(device: torch.device) -> DecodeWorkspace:
    """The workspace of ``device`` and, on CUDA, its current stream (calls on one stream run in order, so
    they may share scratch; another stream gets its own)."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream)
    ws = _CACHED.get(key)
    if ws is None:
        ws = _CACHED[key] = DecodeWorkspace(device)
    return ws


__all__ = ["DecodeWorkspace", "cached_workspace"]
