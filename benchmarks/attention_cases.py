"""Paged attention cases of the issue-15 benchmarks: the tensors, the same tokens in a dense cache, FLOPs, peaks.

Not a test module: ``bench_prefill.py`` and ``bench_mixed.py`` (and the CPU smoke of both) build their
batches here. A batch is a list of sequences, each with ``q_len`` new tokens that are the last ``q_len`` of
its ``seq_len`` tokens (``q_len = 1``: a decode row), laid out as kvpool's kernels take it (``BatchTables``):

>>> # 2 sequences: 4,096 cached + 1,024 new, and a decode row at 3,000 tokens
>>> # q rows 0..1023 belong to sequence 0, row 1024 to sequence 1: query_start_loc = [0, 1024, 1025]
>>> # seq_lens = [5120, 3000]; with block_size 16 the table is [2, 320] (sequence 1 uses 188 of its 320 slots)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# torch.cuda.get_device_name() -> kvpool.plan.hardware preset, first substring match wins (NVL/PCIe before SXM)
CUDA_NAME_PRESETS = (("H100 NVL", "h100-nvl"), ("H100 PCIe", "h100-pcie"), ("H100", "h100-sxm"), ("H200", "h200"),
                     ("B200", "b200"), ("A100-SXM4-40GB", "a100-40gb"), ("A100", "a100-80gb"), ("L40S", "l40s"),
                     ("L4", "l4"), ("A10", "a10"), ("RTX 4090", "rtx-4090"), ("RTX 3090", "rtx-3090"))


@dataclass
class PagedCase:
    """One batch on shuffled pages.

    Attributes
    ----------
    q : ``[num_new, q_heads, head_dim]`` the new tokens of every sequence, concatenated.
    k_cache, v_cache : ``[num_blocks, block_size, kv_heads, head_dim]``, random values (never zeros).
    block_table : ``[batch, max_blocks]`` int32, each sequence's blocks in a random order of the pool.
    query_start_loc : ``[batch + 1]`` int32, ``q`` rows of sequence ``i`` are ``[qsl[i], qsl[i + 1])``.
    seq_lens : ``[batch]`` int32, tokens each sequence attends to (cached + new).
    q_lens, ctx_lens : the same as Python lists.
    """
    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_table: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    q_lens: list
    ctx_lens: list
    scale: float

    @property
    def max_q(self) -> int:
        return max(self.q_lens)

    @property
    def max_k(self) -> int:
        return max(self.ctx_lens)

    def kvpool_args(self) -> tuple:
        """Positional arguments of ``kvpool.paged_prefill`` / ``kvpool.paged_attention``."""
        return (self.q, self.k_cache, self.v_cache, self.block_table, self.query_start_loc, self.seq_lens,
                self.scale)

    def kv_bytes(self) -> int:
        """K + V bytes the batch's attention reads once (every sequence's tokens)."""
        row = self.k_cache.shape[2] * self.k_cache.shape[3] * self.k_cache.element_size()
        return 2 * sum(self.ctx_lens) * row

    def flops(self) -> int:
        """Causal attention FLOPs: the query at position ``p`` reads ``p + 1`` keys, 2 dot products of
        ``head_dim`` multiply-adds each (``q.k`` and ``p.v``), per q head.

        >>> # one sequence of 10 tokens, all new: 1 + 2 + ... + 10 = 55 (query, key) pairs
        >>> # n new of L: n * L - n * (n - 1) / 2 pairs; FLOPs = 4 * head_dim * q_heads * pairs
        """
        pairs = sum(n * ctx - n * (n - 1) // 2 for n, ctx in zip(self.q_lens, self.ctx_lens))
        return 4 * self.q.shape[2] * self.q.shape[1] * pairs


def make_case(q_lens, ctx_lens, q_heads: int, kv_heads: int, head_dim: int, block_size: int,
              dtype=torch.bfloat16, device="cuda", seed: int = 0) -> PagedCase:
    """A batch whose sequence ``i`` has ``ctx_lens[i]`` tokens, the last ``q_lens[i]`` of them new."""
    if any(n < 1 or n > ctx for n, ctx in zip(q_lens, ctx_lens)) or len(q_lens) != len(ctx_lens):
        raise ValueError(f"q_lens {q_lens} and ctx_lens {ctx_lens}: one each per sequence, 1 <= q_len <= ctx_len")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    need = [-(-ctx // block_size) for ctx in ctx_lens]
    num_blocks = sum(need)
    ids = torch.randperm(num_blocks, generator=gen).to(torch.int32)
    table = torch.zeros(len(need), max(need), dtype=torch.int32)
    at = 0
    for i, n in enumerate(need):
        table[i, :n] = ids[at:at + n]
        at += n
    torch.manual_seed(seed)
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache = torch.empty(shape, dtype=dtype, device=device).normal_()
    v_cache = torch.empty(shape, dtype=dtype, device=device).normal_()
    q = torch.empty(sum(q_lens), q_heads, head_dim, dtype=dtype, device=device).normal_()
    qsl = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
    qsl[1:] = torch.cumsum(torch.tensor(q_lens), 0)
    return PagedCase(q, k_cache, v_cache, table.to(device), qsl.to(device),
                     torch.tensor(ctx_lens, dtype=torch.int32, device=device), list(q_lens), list(ctx_lens),
                     head_dim ** -0.5)


def select(case: PagedCase, seqs, last_q: int | None = None) -> tuple[PagedCase, torch.Tensor]:
    """The sub-batch of sequences ``seqs`` (their last ``last_q`` queries at most), same pages.

    Returns the sub-case and the rows of ``case.q`` it holds (``[sub_num_new]`` int64), so a reference
    computed on the sub-case compares with those rows of a kernel's full output.
    """
    starts = case.query_start_loc.tolist()
    q_lens = [min(case.q_lens[s], last_q or case.q_lens[s]) for s in seqs]
    rows = torch.cat([torch.arange(starts[s + 1] - n, starts[s + 1]) for s, n in zip(seqs, q_lens)])
    rows = rows.to(case.q.device)
    index = torch.tensor(list(seqs), device=case.q.device)
    qsl = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
    qsl[1:] = torch.cumsum(torch.tensor(q_lens), 0)
    sub = PagedCase(case.q[rows], case.k_cache, case.v_cache, case.block_table[index], qsl.to(case.q.device),
                    case.seq_lens[index], q_lens, [case.ctx_lens[s] for s in seqs], case.scale)
    return sub, rows


def reference(case: PagedCase, sliding_window=None, logit_soft_cap=None) -> torch.Tensor:
    """float32 ``[num_new, q_heads, head_dim]``: kvpool's torch references (gather the pages, then causal
    attention over them), independent of every kernel timed. Memory grows with q_len x ctx_len per sequence:
    call it on a `select`-ed sub-batch for large cases."""
    from kvpool.kernels import reference as ref
    k, v, cu_k = ref.gather_kv_reference(case.k_cache, case.v_cache, case.block_table, case.seq_lens,
                                         out_dtype=torch.float32)
    return ref.prefill_attention_reference(case.q.float(), k, v, case.query_start_loc, cu_k, case.scale,
                                           sliding_window, logit_soft_cap)


def dense_copy(case: PagedCase):
    """The same tokens in a contiguous cache, for SDPA: ``q [batch, q_heads, q_len, head_dim]`` and
    ``k, v [batch, kv_heads, ctx_len, head_dim]`` (views over ``[batch, len, heads, head_dim]`` storage,
    the layout FlashAttention reads). Every sequence must have the same ``q_len`` and ``ctx_len``."""
    from kvpool.kernels import reference as ref
    if len(set(case.q_lens)) != 1 or len(set(case.ctx_lens)) != 1:
        raise ValueError("a dense copy needs one q_len and one ctx_len for every sequence")
    batch, n, ctx = len(case.q_lens), case.q_lens[0], case.ctx_lens[0]
    k, v, _ = ref.gather_kv_reference(case.k_cache, case.v_cache, case.block_table, case.seq_lens)
    heads, d = case.k_cache.shape[2], case.k_cache.shape[3]
    q = case.q.view(batch, n, case.q.shape[1], d).transpose(1, 2)
    return q, k.view(batch, ctx, heads, d).transpose(1, 2), v.view(batch, ctx, heads, d).transpose(1, 2)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64 (NaN anywhere gives NaN, which fails every ``<`` check)."""
    out, ref = out.double(), ref.double()
    return float(torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref))


def dense_bf16_peak(device_name: str) -> tuple[float | None, str | None]:
    """The card's dense bf16 tensor rate in TFLOP/s from ``kvpool.plan.hardware`` and the preset's key,
    or ``(None, None)`` for a card with no preset."""
    from kvpool.plan.hardware import GPUS
    key = next((k for sub, k in CUDA_NAME_PRESETS if sub.lower() in device_name.lower()), None)
    return (GPUS[key].bf16_tflops, key) if key else (None, None)
