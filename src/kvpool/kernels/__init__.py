"""Triton kernels over paged KV caches, each with a torch reference (:mod:`kvpool.kernels.reference`).

- :func:`write_kv`: new tokens into their slots (fp8: quantized, scales stored or used).
- :func:`gather_kv`: pages to packed varlen K and V plus ``cu_seqlens``.
- :func:`copy_blocks`: copy-on-write of whole blocks, every layer in one launch.
- :func:`paged_decode`: split-K flash-decoding over pages, GQA-grouped (sliding window, soft cap, sinks).
- :func:`stage_blocks` / :func:`unstage_blocks`: whole blocks of every block tensor to block-major staging
  rows and back (the host tier's copy path).
- :func:`paged_prefill`: FlashAttention-2-style attention of new tokens over their pages (prefix + themselves).
- :func:`paged_attention`: one call for a batch of prefill chunks and decode rows (tiled, or split-K decode).
- :func:`prefill_attention`: causal attention over gathered K/V (torch reference on every device).

Backend: Triton on CUDA tensors, the torch references otherwise; ``KVPOOL_KERNELS=triton|torch``
forces one, ``KVPOOL_DEBUG=1`` range-checks block ids and slots (see :mod:`kvpool.kernels.backend`).
"""
from .api import copy_blocks, gather_kv, paged_decode, write_kv
from .block_stage import stage_blocks, unstage_blocks
from .mixed_batch import paged_attention
from .prefill import prefill_attention
from .prefill_api import paged_prefill
from .workspace import DecodeWorkspace

__all__ = ["DecodeWorkspace", "copy_blocks", "gather_kv", "paged_attention", "paged_decode", "paged_prefill",
           "prefill_attention", "stage_blocks", "unstage_blocks", "write_kv"]
