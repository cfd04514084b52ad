"""The kernels as ``torch.library`` custom ops (``torch.ops.kvpool.*``), so ``torch.compile(fullgraph=True)``
keeps them in one graph.

Each op declares the arguments it writes (``mutates_args``) and has a fake implementation that gives the
output's shape and dtype from metadata alone. Its real implementation is the public eager function (checks
included), so a compiled model gets the same checks, at run time. The public functions call these ops only
while ``torch.compile`` traces them; eager calls go straight to the implementation (the dispatcher would
add several microseconds of host time to every call).

``gather_kv``'s row count is ``sum(seq_lens)``: pass ``total_tokens`` (or ``out``) for a static size; else
the fake output has a data-dependent row count.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.library import custom_op


@custom_op("kvpool::write_kv", mutates_args=("k_cache", "v_cache", "k_scale"))
def write_kv_op(key: Tensor, value: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor,
                k_scale: Tensor | None, v_scale: Tensor | None) -> None:
    """``kvpool.write_kv``; ``k_scale`` is written only when it holds per-token scales."""
    from .api import write_kv
    write_kv(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale)


@write_kv_op.register_fake
def _write_kv_fake(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale) -> None:
    return None


@custom_op("kvpool::gather_kv", mutates_args=())
def gather_kv_op(k_cache: Tensor, v_cache: Tensor, block_table: Tensor, seq_lens: Tensor, k_scale: Tensor | None,
                 v_scale: Tensor | None, out_dtype: torch.dtype, total_tokens: int) -> tuple[Tensor, Tensor, Tensor]:
    """``kvpool.gather_kv`` into new tensors; ``total_tokens`` -1 means unknown (data-dependent rows)."""
    from .api import gather_kv
    k, v, cu = gather_kv(k_cache, v_cache, block_table, seq_lens, k_scale, v_scale, out_dtype=out_dtype,
                         total_tokens=None if total_tokens < 0 else total_tokens)
    return k.clone() if k._base is not None else k, v.clone() if v._base is not None else v, cu


@gather_kv_op.register_fake
def _gather_kv_fake(k_cache, v_cache, block_table, seq_lens, k_scale, v_scale, out_dtype, total_tokens):
    rows = total_tokens if total_tokens >= 0 else torch.library.get_ctx().new_dynamic_size()
    k = k_cache.new_empty((rows, k_cache.shape[2], k_cache.shape[3]), dtype=out_dtype)
    cu = seq_lens.new_empty((seq_lens.shape[0] + 1,), dtype=torch.int32)
    return k, torch.empty_like(k), cu


@custom_op("kvpool::gather_kv_out", mutates_args=("k_out", "v_out"))
def gather_kv_out_op(k_cache: Tensor, v_cache: Tensor, block_table: Tensor, seq_lens: Tensor,
                     k_scale: Tensor | None, v_scale: Tensor | None, k_out: Tensor, v_out: Tensor) -> Tensor:
    """``kvpool.gather_kv(..., out=(k_out, v_out))``; returns ``cu_seqlens``."""
    from .api import gather_kv
    return gather_kv(k_cache, v_cache, block_table, seq_lens, k_scale, v_scale, out=(k_out, v_out))[2]


@gather_kv_out_op.register_fake
def _gather_kv_out_fake(k_cache, v_cache, block_table, seq_lens, k_scale, v_scale, k_out, v_out):
    return seq_lens.new_empty((seq_lens.shape[0] + 1,), dtype=torch.int32)


@custom_op("kvpool::copy_blocks", mutates_args=("caches",))
def copy_blocks_op(caches: list[Tensor], src: Tensor, dst: Tensor) -> None:
    """``kvpool.copy_blocks`` with ``src``/``dst`` as int tensors."""
    from .api import copy_blocks
    copy_blocks(caches, src, dst)


@copy_blocks_op.register_fake
def _copy_blocks_fake(caches, src, dst) -> None:
    return None


@custom_op("kvpool::stage_blocks", mutates_args=("staging",))
def stage_blocks_op(tensors: list[Tensor], block_ids: Tensor, staging: Tensor) -> None:
    """``kvpool.kernels.stage_blocks``: blocks of every block tensor into block-major staging rows."""
    from .block_stage import stage_blocks
    stage_blocks(tensors, block_ids, staging)


@stage_blocks_op.register_fake
def _stage_blocks_fake(tensors, block_ids, staging) -> None:
    return None


@custom_op("kvpool::unstage_blocks", mutates_args=("tensors",))
def unstage_blocks_op(staging: Tensor, tensors: list[Tensor], block_ids: Tensor) -> None:
    """``kvpool.kernels.unstage_blocks``: staged blocks back into every block tensor."""
    from .block_stage import unstage_blocks
    unstage_blocks(staging, tensors, block_ids)


@unstage_blocks_op.register_fake
def _unstage_blocks_fake(staging, tensors, block_ids) -> None:
    return None


@custom_op("kvpool::paged_decode", mutates_args=())
def paged_decode_op(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, seq_lens: Tensor,
                    scale: float, sliding_window: int | None, logit_soft_cap: float | None, k_scale: Tensor | None,
                    v_scale: Tensor | None, sinks: Tensor | None) -> Tensor:
    """``kvpool.paged_decode`` into a new ``[batch, q_heads, head_dim]`` tensor."""
    from .api import paged_decode
    return paged_decode(q, k_cache, v_cache, block_table, seq_lens, scale, sliding_window, logit_soft_cap,
                        k_scale, v_scale, sinks=sinks)


@paged_decode_op.register_fake
def _paged_decode_fake(q, k_cache, v_cache, block_table, seq_lens, scale, sliding_window, logit_soft_cap,
                       k_scale, v_scale, sinks):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@custom_op("kvpool::paged_decode_out", mutates_args=("out",))
def paged_decode_out_op(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, seq_lens: Tensor,
                        scale: float, sliding_window: int | None, logit_soft_cap: float | None,
                        k_scale: Tensor | None, v_scale: Tensor | None, sinks: Tensor | None, out: Tensor) -> None:
    """``kvpool.paged_decode(..., out=out)``."""
    from .api import paged_decode
    paged_decode(q, k_cache, v_cache, block_table, seq_lens, scale, sliding_window, logit_soft_cap, k_scale,
                 v_scale, sinks=sinks, out=out)


@paged_decode_out_op.register_fake
def _paged_decode_out_fake(q, k_cache, v_cache, block_table, seq_lens, scale, sliding_window, logit_soft_cap,
                           k_scale, v_scale, sinks, out) -> None:
    return None


@custom_op("kvpool::prefill_attention", mutates_args=())
def prefill_attention_op(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, scale: float,
                         sliding_window: int | None, logit_soft_cap: float | None, sinks: Tensor | None) -> Tensor:
    """``kvpool.prefill_attention`` (causal attention over gathered K/V)."""
    from .prefill import prefill_attention
    out = prefill_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, sliding_window, logit_soft_cap,
                            sinks=sinks)
    return out.clone() if out._base is not None else out


@prefill_attention_op.register_fake
def _prefill_attention_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, sliding_window, logit_soft_cap, sinks):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@custom_op("kvpool::paged_prefill", mutates_args=())
def paged_prefill_op(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, query_start_loc: Tensor,
                     seq_lens: Tensor, scale: float, causal: bool, sliding_window: int | None,
                     logit_soft_cap: float | None, k_scale: Tensor | None, v_scale: Tensor | None,
                     sinks: Tensor | None) -> Tensor:
    """``kvpool.paged_prefill`` into a new ``[num_new_tokens, q_heads, head_dim]`` tensor."""
    from .prefill_api import paged_prefill
    out = paged_prefill(q, k_cache, v_cache, block_table, query_start_loc, seq_lens, scale, causal=causal,
                        sliding_window=sliding_window, logit_soft_cap=logit_soft_cap, k_scale=k_scale,
                        v_scale=v_scale, sinks=sinks)
    return out.clone() if out._base is not None else out


@paged_prefill_op.register_fake
def _paged_prefill_fake(q, k_cache, v_cache, block_table, query_start_loc, seq_lens, scale, causal, sliding_window,
                        logit_soft_cap, k_scale, v_scale, sinks):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@custom_op("kvpool::paged_prefill_out", mutates_args=("out",))
def paged_prefill_out_op(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, query_start_loc: Tensor,
                         seq_lens: Tensor, scale: float, causal: bool, sliding_window: int | None,
                         logit_soft_cap: float | None, k_scale: Tensor | None, v_scale: Tensor | None,
                         sinks: Tensor | None, out: Tensor) -> None:
    """``kvpool.paged_prefill(..., out=out)``."""
    from .prefill_api import paged_prefill
    paged_prefill(q, k_cache, v_cache, block_table, query_start_loc, seq_lens, scale, causal=causal,
                  sliding_window=sliding_window, logit_soft_cap=logit_soft_cap, k_scale=k_scale, v_scale=v_scale,
                  sinks=sinks, out=out)


@paged_prefill_out_op.register_fake
def _paged_prefill_out_fake(q, k_cache, v_cache, block_table, query_start_loc, seq_lens, scale, causal,
                            sliding_window, logit_soft_cap, k_scale, v_scale, sinks, out) -> None:
    return None


@custom_op("kvpool::paged_attention", mutates_args=())
def paged_attention_op(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, query_start_loc: Tensor,
                       seq_lens: Tensor, scale: float, causal: bool, sliding_window: int | None,
                       logit_soft_cap: float | None, k_scale: Tensor | None, v_scale: Tensor | None,
                       sinks: Tensor | None) -> Tensor:
    """``kvpool.paged_attention`` (mixed prefill chunks and decode rows) into a new tensor."""
    from .mixed_batch import paged_attention
    out = paged_attention(q, k_cache, v_cache, block_table, query_start_loc, seq_lens, scale, causal=causal,
                          sliding_window=sliding_window, logit_soft_cap=logit_soft_cap, k_scale=k_scale,
                          v_scale=v_scale, sinks=sinks)
    return out.clone() if out._base is not None else out


@paged_attention_op.register_fake
def _paged_attention_fake(q, k_cache, v_cache, block_table, query_start_loc, seq_lens, scale, causal,
                          sliding_window, logit_soft_cap, k_scale, v_scale, sinks):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@custom_op("kvpool::paged_attention_out", mutates_args=("out",))
def paged_attention_out_op(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor,
                           query_start_loc: Tensor, seq_lens: Tensor, scale: float, causal: bool,
                           sliding_window: int | None, logit_soft_cap: float | None, k_scale: Tensor | None,
                           v_scale: Tensor | None, sinks: Tensor | None, out: Tensor) -> None:
    """``kvpool.paged_attention(..., out=out)``."""
    from .mixed_batch import paged_attention
    paged_attention(q, k_cache, v_cache, block_table, query_start_loc, seq_lens, scale, causal=causal,
                    sliding_window=sliding_window, logit_soft_cap=logit_soft_cap, k_scale=k_scale, v_scale=v_scale,
                    sinks=sinks, out=out)


@paged_attention_out_op.register_fake
def _paged_attention_out_fake(q, k_cache, v_cache, block_table, query_start_loc, seq_lens, scale, causal,
                              sliding_window, logit_soft_cap, k_scale, v_scale, sinks, out) -> None:
    return None


__all__ = [
    "copy_blocks_op",
    "gather_kv_op",
    "gather_kv_out_op",
    "paged_attention_op",
    "paged_attention_out_op",
    "paged_decode_op",
    "paged_decode_out_op",
    "paged_prefill_op",
    "paged_prefill_out_op",
    "prefill_attention_op",
    "stage_blocks_op",
    "unstage_blocks_op",
    "write_kv_op",
]
