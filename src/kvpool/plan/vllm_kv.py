"""The KV figures vLLM's start-up log prints for the same KV bytes: its KV-cache groups, blocks, tokens and
concurrency, so an operator comparing a plan with vLLM's log sees the same numbers.

vLLM 0.19 (``vllm/v1/core/kv_cache_utils.py``) sizes the pool per *KV-cache group*:

- the layers are cut into KV-cache groups as `kvpool.plan.kv_groups` does (vLLM's rule: one group of all
  layers for a model with one attention kind; else groups of ``group_size`` layers, short groups padded:
  "Add N padding layers");
- ``group_size`` page tensors are each shared by one layer of every group, so
  ``num_blocks = kv_bytes // page_bytes // group_size`` (``get_num_blocks``), one page = one layer's
  ``block_size`` tokens;
- the log's "GPU KV cache size" is ``num_blocks // num_groups * block_size`` tokens
  (``_report_kv_cache_config``), and "Maximum concurrency" is ``num_blocks`` over the blocks one request of
  ``max_model_len`` tokens takes in all groups: ``cdiv(max_model_len, block_size)`` per full group and
  ``cdiv(min(W - 1 + max_num_batched_tokens, max_model_len), block_size) + 1`` per sliding group
  (``get_max_concurrency_for_kv_cache_config``, ``SlidingWindowSpec.max_memory_usage_bytes``).

>>> # Gemma-3-27B: 10 global + 52 sliding layers -> 7 groups of 10 layers, 8 of them padding
>>> f = vllm_kv_figures((None if (i + 1) % 6 == 0 else 1024 for i in range(62)), page_bytes=65_536,
...                     kv_bytes=40 * 2**30, block_size=16, max_model_len=131_072, max_batched_tokens=8192)
>>> f.group_size, f.num_groups, f.padding_layers, f.num_blocks, f.tokens
(10, 7, 8, 65536, 149792)
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from .kv_groups import kv_groups


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class VLLMKVFigures:
    """What vLLM 0.19 logs for a pool of ``kv_bytes`` per GPU (see the module docstring).

    Attributes
    ----------
    groups : tuple of (window or None, number of groups of that type)
        KV-cache groups per attention type (None: full attention), in layer order of first appearance.
    group_size : int
        Layers per group (= page tensors, each shared by one layer of every group).
    padding_layers : int
        Empty layer slots vLLM adds so every group has ``group_size`` layers (its pages are wasted).
    num_blocks : int
        Blocks of each page tensor: ``kv_bytes // page_bytes // group_size``.
    tokens : int
        "GPU KV cache size: N tokens" = ``num_blocks // num_groups * block_size``.
    blocks_per_request : int
        Blocks one request of ``max_model_len`` tokens takes across all groups.
    max_concurrency : float
        "Maximum concurrency for max_model_len tokens per request" = ``num_blocks / blocks_per_request``.
    """

    groups: tuple
    group_size: int
    padding_layers: int
    num_blocks: int
    tokens: int
    blocks_per_request: int
    max_concurrency: float

    @property
    def num_groups(self) -> int:
        return sum(n for _, n in self.groups)

    @property
    def hybrid(self) -> bool:
        return len(self.groups) > 1 or self.num_groups > 1

    def to_dict(self) -> dict:
        return {"groups": [{"sliding_window": w, "groups": n} for w, n in self.groups],
                "group_size": self.group_size, "padding_layers": self.padding_layers,
                "num_blocks": self.num_blocks, "tokens": self.tokens,
                "blocks_per_request": self.blocks_per_request, "max_concurrency": round(self.max_concurrency, 2)}


def vllm_kv_figures(layer_windows, page_bytes: int, kv_bytes: int, block_size: int, max_model_len: int,
                    max_batched_tokens: int) -> VLLMKVFigures:
    """vLLM's groups, blocks, tokens and concurrency for one GPU's ``kv_bytes``.

    Parameters
    ----------
    layer_windows : iterable of int or None
        Each attention layer's sliding window (None: full attention), in layer order.
    page_bytes : int
        One layer's KV bytes for ``block_size`` tokens on one GPU, as vLLM lays them out (no per-token
        scales: vLLM keeps fp8 scales per tensor, outside the pool).
    kv_bytes, block_size, max_model_len, max_batched_tokens : int
        The pool's bytes per GPU and the serving limits vLLM reads them with.
    """
    layout = kv_groups(layer_windows)
    group_size, num_groups = layout.group_size, len(layout.groups)
    groups = tuple(Counter(layout.windows).items())  # (window, groups of that kind), kinds in layer order
    num_blocks = max(0, kv_bytes // page_bytes // group_size)

    def blocks_of(window) -> int:
        if window is None:
            return _cdiv(max_model_len, block_size)
        return _cdiv(min(window - 1 + max_batched_tokens, max_model_len), block_size) + 1

    per_request = sum(n * blocks_of(w) for w, n in groups)
    return VLLMKVFigures(groups, group_size, layout.padding_layers, num_blocks,
                         num_blocks // num_groups * block_size, per_request, num_blocks / per_request)


__all__ = ["VLLMKVFigures", "vllm_kv_figures"]
