"""The decode step's tensors at fixed device addresses, updated by deltas (CUDA-graph ready).

The C++ ``SeqTable`` keeps the step's host arrays in buffers allocated once: a ``[G, max_seqs, W]`` block
table (one ``[max_seqs, W]`` table per KV-cache group) and ``io`` = seq_lens ``[rows]`` | slot_mapping
``[G, rows]`` | query_start_loc ``[rows + 1]``, packed, so for a given row count they always sit at the same
offsets. This module gives the kernels device tensors at fixed addresses (with one group, G = 1, the
table is ``[max_seqs, W]`` and the slot mapping ``[rows]``, as they always were):

- on the CPU the tensors ARE those host buffers (``torch.from_numpy``: no copy at all);
- on a GPU (or with ``mirror=True``, which tests use to run the same path on the CPU) the device holds
  its own table and io buffer; per step the host sends ``io`` (``(G + 2) * rows + 1`` int32) in one copy
  and only the table entries that changed (every group's), as (flat index, block id) pairs applied with
  one ``index_copy_``. A new block every 16 tokens makes that ~12.5 bytes per sequence per step and group
  (a windowed group also zeroes the entry its window released, ~12 more).

Views are cached per row count, so a step builds no new tensor objects and a captured CUDA graph that
reads ``block_table[:rows]`` / ``seq_lens[:rows]`` reads the same memory after every later step.
"""
from __future__ import annotations

import numpy as np
import torch


class StepBuffers:
    """Device-side decode-step tensors of one ``SeqTable``.

    Parameters
    ----------
    core : kvpool._C.SeqTable
        Owns the host buffers (``step_table()`` ``[G, max_seqs, W] int32``, ``step_io()``
        ``[(G + 2) * max_seqs + 1] int32``) and the deltas of the last step (``step_deltas()``: flat indices
        into the whole ``[G, max_seqs, W]`` table).
    device : torch.device
    mirror : bool
        Keep separate device buffers even on the CPU (the GPU path, for tests).
    """

    def __init__(self, core, device: torch.device, mirror: bool = False):
        self.core = core
        self.device = device
        host_table = torch.from_numpy(core.step_table())
        self.num_groups = host_table.shape[0]
        if self.num_groups == 1:
            host_table = host_table[0]  # one group: today's [max_seqs, W] table, same memory
        host_io = torch.from_numpy(core.step_io())
        self.max_seqs = host_table.shape[-2]
        self.staged = device.type != "cpu" or mirror
        if not self.staged:
            self.table, self.io = host_table, host_io
        else:
            pin = device.type == "cuda"
            self.table = torch.zeros_like(host_table, device=device)
            self.io = torch.zeros_like(host_io, device=device)
            self._host_io = torch.empty_like(host_io, pin_memory=pin)
            self._np_io = core.step_io()
            cap = host_table.numel()
            self._host_index = torch.empty(cap, dtype=torch.int64, pin_memory=pin)
            self._host_value = torch.empty(cap, dtype=torch.int32, pin_memory=pin)
            self._dev_index = torch.empty(cap, dtype=torch.int64, device=device)
            self._dev_value = torch.empty(cap, dtype=torch.int32, device=device)
            self._flat_table = self.table.view(-1)
            self._copied = None  # CUDA event: the pinned buffers may be refilled once it has passed
        self._views: dict[int, tuple] = {}
        self._lens: dict[int, np.ndarray] = {}
        self._host_io_view = core.step_io()
        self.rows = 0  # rows of the last step

    def views(self, rows: int) -> tuple:
        """``(block_table [rows, W], seq_lens [rows], slot_mapping [rows], query_start_loc [rows + 1])``; with
        G > 1 groups ``block_table`` is ``[G, rows, W]`` and ``slot_mapping`` ``[G, rows]``."""
        v = self._views.get(rows)
        if v is None:
            io, g = self.io, self.num_groups
            if g == 1:
                table, slots = self.table[:rows], io[rows:2 * rows]
            else:
                table, slots = self.table[:, :rows], io[rows:(g + 1) * rows].view(g, rows)
            v = (table, io[:rows], slots, io[(g + 1) * rows:(g + 2) * rows + 1])
            self._views[rows] = v
        return v

    def host_lens(self, rows: int) -> np.ndarray:
        """``[rows] int32`` host copy of the step's seq_lens: a batch marked computed after a later step
        still records its own lengths."""
        v = self._lens.get(rows)
        if v is None:
            v = self._lens[rows] = self._host_io_view[:rows]
        return v.copy()

    def h2d_bytes(self) -> int:
        """Bytes a device copy of the last step sends: ``io`` plus 12 per changed table entry."""
        return 4 * ((self.num_groups + 2) * self.rows + 1) + 12 * len(self.core.step_deltas()[0])

    def publish(self, rows: int) -> None:
        """Send what the last ``decode_step`` of ``core`` changed to the device tensors."""
        self.rows = rows
        n_io = (self.num_groups + 2) * rows + 1
        if not self.staged:  # the device tensors are the host buffers themselves
            return
        index, value = self.core.step_deltas()
        if self._copied is not None:
            self._copied.synchronize()  # the previous step's copies may still read the pinned buffers
        n = len(index)
        np.copyto(self._host_io.numpy()[:n_io], self._np_io[:n_io])
        blocking = self.device.type != "cuda"
        self.io[:n_io].copy_(self._host_io[:n_io], non_blocking=not blocking)
        if n:
            self._host_index.numpy()[:n] = index
            self._host_value.numpy()[:n] = value
            self._dev_index[:n].copy_(self._host_index[:n], non_blocking=not blocking)
            self._dev_value[:n].copy_(self._host_value[:n], non_blocking=not blocking)
            self._flat_table.index_copy_(0, self._dev_index[:n], self._dev_value[:n])
        if not blocking:
            self._copied = torch.cuda.Event()
            self._copied.record()
