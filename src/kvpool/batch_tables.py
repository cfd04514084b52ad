"""The int32 tensors describing one forward step over a batch of sequences (docs/page_table.md).

`BlockTables` (and its pure-Python twin) build them; the kernels read them. A `BatchTables` holds views of
buffers its `BlockTables` reuses, so it stays valid until the next batch-building call of that
`BlockTables`. With several KV-cache groups (a hybrid model: ``BlockTables(..., group_windows=...)``) the
per-group tensors gain a leading group axis and ``batch.group(g)`` is group g's batch with the
single-group shapes, what the layers of group g pass to the kernels. The CSR form (``kv_indptr``,
``kv_indices``, ``kv_last_page_len``) of a decode step is derived from ``block_table`` and ``seq_lens`` on
first access, on their device, so a step that does not read it does not pay for it.
"""
from __future__ import annotations

import numpy as np
import torch

from .errors import InvalidArgumentError

# Value of block_table entries past a sequence's last block. 0 is always a valid block id, so a
# kernel that reads a padded entry by mistake still stays inside the pool; kernels bound their reads
# by seq_lens and never use it.
BLOCK_TABLE_PAD = 0
# Value of slot_mapping entries for padding tokens: write_kv skips them.
SLOT_PAD = -1


class BatchTables:
    """The int32 tensors of one batch of sequences, on the cache's device.

    Attributes
    ----------
    seq_ids : tuple or np.ndarray
        The sequences, in row order (as the caller passed them).
    block_table : torch.Tensor
        ``[rows, max_blocks] int32``: row ``i`` holds the ids of sequence ``i``'s first
        ``ceil(seq_lens[i] / block_size)`` blocks, then `BLOCK_TABLE_PAD` (0). ``max_blocks`` is the
        batch's longest row for `BlockTables.batch`, the fixed ``max_blocks_per_seq`` for
        `BlockTables.decode_step`. Padding rows (``pad_batch_to``) are all 0. With ``G > 1`` KV-cache groups
        ``[G, rows, max_blocks]``, and a block a windowed group released is 0 (padding: no kernel reads it).
    seq_lens : torch.Tensor
        ``[rows] int32``: tokens each sequence attends to, this step's new tokens included; 0 on
        padding rows.
    kv_indptr : torch.Tensor
        ``[rows + 1] int32``: CSR row pointer, ``kv_indptr[0] = 0``; sequence ``i``'s blocks are
        ``kv_indices[kv_indptr[i]:kv_indptr[i + 1]]``. ``[G, rows + 1]`` with ``G > 1`` groups (the same
        row in every group: a released block stays in the CSR as 0).
    kv_indices : torch.Tensor
        ``[nnz] int32``: the block ids of all sequences, concatenated (``nnz = kv_indptr[-1]``);
        ``[G, nnz]`` with ``G > 1`` groups.
    kv_last_page_len : torch.Tensor
        ``[rows] int32``: tokens in each sequence's last block, in ``1..block_size`` (0 on padding
        rows); ``seq_len = block_size * (n_blocks - 1) + last_page_len``. ``[G, rows]`` with ``G > 1``.
    slot_mapping : torch.Tensor
        ``[num_new_tokens + padding] int32``: ``block_id * block_size + offset`` of every new token,
        sequence by sequence in token order; `SLOT_PAD` (-1) for padding tokens. ``[G, num_new_tokens +
        padding]`` with ``G > 1`` groups (each group writes its own blocks).
    query_start_loc : torch.Tensor
        ``[rows + 1] int32``: cumulative new-token counts (``cu_seqlens_q`` of varlen attention).
    seq_lens_host : np.ndarray
        ``[rows] int32`` host copy of `seq_lens` (for `BlockTables.mark_computed` and schedulers).
    num_new_tokens : int
        New tokens in the batch (padding excluded).
    max_seq_len : int
        ``max(seq_lens)``.
    """

    __slots__ = ("seq_ids", "block_table", "seq_lens", "slot_mapping", "query_start_loc", "seq_lens_host",
                 "num_new_tokens", "max_seq_len", "block_size", "_csr", "_groups")

    def __init__(self, seq_ids, block_table: torch.Tensor, seq_lens: torch.Tensor, slot_mapping: torch.Tensor,
                 query_start_loc: torch.Tensor, seq_lens_host: np.ndarray, num_new_tokens: int, max_seq_len: int,
                 block_size: int, csr: tuple | None = None):
        self.seq_ids = seq_ids
        self.block_table = block_table
        self.seq_lens = seq_lens
        self.slot_mapping = slot_mapping
        self.query_start_loc = query_start_loc
        self.seq_lens_host = seq_lens_host
        self.num_new_tokens = num_new_tokens
        self.max_seq_len = max_seq_len
        self.block_size = block_size
        self._csr = csr  # (kv_indptr, kv_indices, kv_last_page_len), or None until first read
        self._groups = None  # group g's BatchTables, built on first request

    @property
    def num_groups(self) -> int:
        """KV-cache groups: 1, or ``block_table.shape[0]`` when the tables have a group axis."""
        return 1 if self.block_table.dim() == 2 else self.block_table.shape[0]

    def group(self, g: int) -> BatchTables:
        """Group ``g``'s batch with the single-group shapes (``block_table [rows, max_blocks]``, ``slot_mapping
        [num_new_tokens + padding]``, CSR per group); ``seq_lens`` and ``query_start_loc`` shared. Views, no
        copy. With one group, ``group(0)`` is this batch itself."""
        groups = self.num_groups
        if isinstance(g, bool) or not isinstance(g, (int, np.integer)) or not 0 <= g < groups:
            raise InvalidArgumentError(f"group({g!r}): this batch has {groups} KV-cache group(s); pass 0.."
                                       f"{groups - 1}")
        if self.block_table.dim() == 2:
            return self
        if self._groups is None:
            self._groups = [None] * groups
        view = self._groups[g]
        if view is None:
            csr = None if self._csr is None else tuple(t[g] for t in self._csr)
            view = self._groups[g] = BatchTables(
                self.seq_ids, self.block_table[g], self.seq_lens, self.slot_mapping[g], self.query_start_loc,
                self.seq_lens_host, self.num_new_tokens, self.max_seq_len, self.block_size, csr=csr)
        return view

    def _csr_form(self) -> tuple:
        if self._csr is None:
            bs = self.block_size
            lens = self.seq_lens.to(torch.int64)
            nblk = (lens + bs - 1) // bs
            indptr = torch.zeros(len(lens) + 1, dtype=torch.int32, device=lens.device)
            indptr[1:] = torch.cumsum(nblk, 0)
            cols = torch.arange(self.block_table.shape[-1], device=lens.device)
            mask = cols[None, :] < nblk[:, None]
            last = torch.where(lens > 0, lens - bs * (nblk - 1), torch.zeros_like(lens)).to(torch.int32)
            if self.block_table.dim() == 2:
                self._csr = (indptr, self.block_table[mask].to(torch.int32), last)
            else:  # one CSR per group: the same rows, each group's block ids
                g = self.block_table.shape[0]
                self._csr = (indptr.expand(g, -1).contiguous(), self.block_table[:, mask].to(torch.int32),
                             last.expand(g, -1).contiguous())
        return self._csr

    @property
    def kv_indptr(self) -> torch.Tensor:
        return self._csr_form()[0]

    @property
    def kv_indices(self) -> torch.Tensor:
        return self._csr_form()[1]

    @property
    def kv_last_page_len(self) -> torch.Tensor:
        return self._csr_form()[2]

    def __repr__(self) -> str:
        return (f"BatchTables(rows={self.block_table.shape[0]}, max_blocks={self.block_table.shape[1]}, "
                f"num_new_tokens={self.num_new_tokens}, max_seq_len={self.max_seq_len}, "
                f"device={self.block_table.device})")
