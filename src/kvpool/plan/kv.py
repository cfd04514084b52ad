"""What one tensor-parallel shard's KV pages hold: `KVShardLayout` and `shard_kv_heads`.

This is the contract between the planner (bytes per block) and `kvpool.cache.PagedKVCache` (the page
tensors): ``PagedKVCache.memory_bytes() == plan.kv_cache.bytes_per_block_per_gpu * num_blocks``.

A model with one attention kind keeps one block table for all its layers: a block holds one page of
every layer, ``bytes_per_block = bytes_per_token * block_size``. A hybrid model (sliding-window and full
layers) splits its layers into KV-cache groups (`kvpool.plan.kv_groups`) of ``group_size`` layers; its
pool has ``slots = group_size`` page tensors per K/V, and a block holds one page of each slot (the pages of
ONE group's layers, whichever group owns the block): ``pool_bytes_per_block = slots x
bytes_per_layer_token x block_size``, and a sequence needs a block per group. `bytes_per_token` and
`bytes_per_block` count every layer at full length (one table of every layer); for a single-group model
``pool_bytes_per_block == bytes_per_block``.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import InvalidArgumentError
from .checks import check_block_size, check_choice, check_int
from .dtypes import DTYPES, resolve_kv_dtype, serving_dtype
from .kv_groups import KVGroups, kv_groups
from .parallel import check_kv_head_split, check_tp

FP8_SCALE_MODES = ("per_token_head", "per_head", "per_tensor", "none")
SCALE_BYTES = 4  # every fp8 scale is one float32


@dataclass(frozen=True)
class KVShardLayout:
    """KV page geometry of one TP shard.

    Attributes
    ----------
    num_layers : int
        Layers whose pages this shard holds (all layers for pp=1).
    kv_heads : int
        KV heads per shard: ``max(1, num_kv_heads // tp)``; 1 for MLA (the latent is not split by TP).
    head_dim : int
        K head size; for MLA ``kv_lora_rank + qk_rope_head_dim`` (the compressed latent + rope key).
    v_head_dim : int
        V head size; 0 for MLA (the latent lives in the K pages only).
    kv_dtype : str
        "fp32" | "fp16" | "bf16" | "fp8".
    dtype_bytes : int
        Bytes per element of ``kv_dtype``.
    scale_bytes : int
        Scale bytes per token, per head, per stored tensor (4: one float32, for fp8 with per-token-head
        scales; else 0).
    fp8_scales : str or None
        Where fp8 scales live (None unless ``kv_dtype`` is fp8): "per_token_head" (in the pool, written
        with each token: no calibration needed, 4 B per 128-element head row, 3%), "per_head" or
        "per_tensor" (vLLM's layout: one float32 per layer and K/V tensor, set from calibration or 1.0),
        both outside the pool, or "none".
    kv_groups : KVGroups or None
        The shard's KV-cache groups (`kvpool.plan.kv_groups`); None means one group of every layer.
        A hybrid model's pool has ``slots = kv_groups.group_size`` page tensors per K/V, not one per layer.
    """

    num_layers: int
    kv_heads: int
    head_dim: int
    v_head_dim: int
    kv_dtype: str
    dtype_bytes: int
    scale_bytes: int
    fp8_scales: str | None = None
    kv_groups: KVGroups | None = None

    @property
    def num_groups(self) -> int:
        """KV-cache groups: 1 for a model with one attention kind."""
        return len(self.kv_groups.groups) if self.kv_groups is not None else 1

    @property
    def slots(self) -> int:
        """Page tensors per K/V in the pool: ``num_layers`` for one group, ``group_size`` for a hybrid model.

        >>> # Gemma-3-27B (62 layers, 5 local : 1 global): 7 groups of 10 layers, so 10 slots, not 62
        """
        return self.kv_groups.group_size if self.kv_groups is not None else self.num_layers

    @property
    def bytes_per_layer_token(self) -> int:
        """One layer's KV bytes per token on this shard (pages + per-token fp8 scales)."""
        per_head = (self.head_dim + self.v_head_dim) * self.dtype_bytes + self.tensors_per_layer * self.scale_bytes
        return self.kv_heads * per_head

    @property
    def tensors_per_layer(self) -> int:
        """Page tensors per layer: 2 (K and V) or 1 (MLA latent)."""
        return 2 if self.v_head_dim else 1

    @property
    def bytes_per_token(self) -> int:
        """KV bytes one token occupies on this shard, all layers and scales included."""
        data = self.num_layers * self.kv_heads * (self.head_dim + self.v_head_dim) * self.dtype_bytes
        return data + self.scale_bytes_per_token

    @property
    def scale_bytes_per_token(self) -> int:
        """fp8 scale bytes in the pool per token (per_token_head only), all layers."""
        return self.num_layers * self.kv_heads * self.tensors_per_layer * self.scale_bytes

    @property
    def scale_bytes_outside_pool(self) -> int:
        """fp8 scale bytes this shard keeps outside the pool, whatever its size (per_head, per_tensor)."""
        per_tensor = {"per_head": self.kv_heads, "per_tensor": 1}.get(self.fp8_scales, 0)
        return self.num_layers * self.tensors_per_layer * per_tensor * SCALE_BYTES

    def scale_layout(self) -> str:
        """One line on where the fp8 scales live and what they cost ("" unless fp8).

        >>> # Llama-3.1-70B at tp=4, per_token_head: 1,280 B/token = 80 layers x 2 heads x 2 tensors x 4 B
        """
        n, h, t = self.num_layers, self.kv_heads, self.tensors_per_layer
        if self.fp8_scales == "per_token_head":
            return (f"float32 per token and head, in the pool ({n} × {h} × {t} × {SCALE_BYTES} B); "
                    "vLLM's per-tensor layout: --fp8-scales per_tensor")
        if self.fp8_scales == "per_head":
            return (f"float32 per head, outside the pool: {n} × {h} × {t} × {SCALE_BYTES} B = "
                    f"{self.scale_bytes_outside_pool:,} B in all")
        if self.fp8_scales == "per_tensor":
            return (f"float32 per tensor (vLLM's layout), outside the pool: {n} × {t} × {SCALE_BYTES} B = "
                    f"{self.scale_bytes_outside_pool:,} B in all")
        return "none (every scale 1.0)" if self.fp8_scales == "none" else ""

    def bytes_per_block(self, block_size: int) -> int:
        """Bytes of one block of ``block_size`` tokens of every layer on this shard (one table of every layer)."""
        return self.bytes_per_token * check_block_size(block_size)

    def pool_bytes_per_block(self, block_size: int) -> int:
        """Bytes of one block of `kvpool.PagedKVCache`'s pool: one page of each slot (``slots *
        bytes_per_layer_token * block_size``); ``bytes_per_block`` for a single-group model.

        >>> # Gemma-3-27B at tp=1, bf16, block 16: 16 KV heads x (128 + 128) x 2 B = 8,192 B per layer-token
        >>> # 10 slots x 8,192 x 16 = 1,310,720 B per block (a block of all 62 layers: 8,126,464)
        """
        return self.slots * self.bytes_per_layer_token * check_block_size(block_size)

    def to_dict(self) -> dict:
        return {
            "num_layers": self.num_layers, "kv_heads": self.kv_heads, "head_dim": self.head_dim,
            "v_head_dim": self.v_head_dim, "kv_dtype": self.kv_dtype, "dtype_bytes": self.dtype_bytes,
            "scale_bytes": self.scale_bytes, "bytes_per_token": self.bytes_per_token,
            "fp8_scales": self.fp8_scales, "scale_bytes_per_token": self.scale_bytes_per_token,
            "scale_bytes_outside_pool": self.scale_bytes_outside_pool, "scale_layout": self.scale_layout(),
        }


def kv_shard_layout(spec, tp: int = 1, kv_dtype: str = "auto", fp8_scales: str = "per_token_head",
                    num_layers: int | None = None, layers: range | None = None) -> KVShardLayout:
    """KV page geometry of one TP rank of ``spec``.

    Parameters
    ----------
    spec : ModelSpec
    tp : int
        Tensor-parallel degree.
    kv_dtype : str
        "auto" (the model's ``dtype``), "fp32", "fp16", "bf16" or "fp8".
    fp8_scales : str
        "per_token_head" (one float32 per token, head and tensor, stored in the pool), "per_head"
        (one float32 per head and tensor, outside the pool), "per_tensor" (one per layer and tensor, outside
        the pool: vLLM's layout and figure) or "none". Only used for fp8.
    num_layers : int, optional
        Layers held by this shard (a pipeline stage): the first ``num_layers``; default all of the model's.
    layers : range, optional
        The model's layers this shard holds (a pipeline stage's `stage_layers` range): their sliding windows
        decide the KV-cache groups. Overrides ``num_layers`` (which must then equal ``len(layers)``).
    """
    tp = check_tp(spec, tp)
    check_choice("fp8_scales", fp8_scales, FP8_SCALE_MODES)
    dtype = resolve_kv_dtype(kv_dtype, serving_dtype(spec))
    held = _held_layers(spec, num_layers, layers)
    if spec.is_mla:
        heads, k_dim, v_dim = 1, spec.kv_lora_rank + spec.qk_rope_head_dim, 0
    else:
        heads, k_dim, v_dim = max(1, spec.num_kv_heads // tp), spec.head_dim, spec.v_head_dim
    scale = SCALE_BYTES if dtype == "fp8" and fp8_scales == "per_token_head" else 0
    windows = spec.layer_sliding_windows or (None,) * spec.num_layers
    return KVShardLayout(len(held), heads, k_dim, v_dim, dtype, DTYPES[dtype].bytes, scale,
                         fp8_scales if dtype == "fp8" else None, kv_groups([windows[i] for i in held]))


def _held_layers(spec, num_layers, layers) -> range:
    """The layers a shard holds: ``layers`` if given, else the first ``num_layers`` (default all)."""
    if layers is None:
        n = spec.num_layers if num_layers is None else check_int("num_layers", num_layers, maximum=spec.num_layers)
        return range(n)
    if not isinstance(layers, range) or not layers or layers.step != 1 or layers.start < 0 \
            or layers.stop > spec.num_layers:
        raise InvalidArgumentError(f"layers={layers!r} must be a non-empty range of consecutive layers within "
                                   f"the model's {spec.num_layers}; pass a stage_layers() range")
    if num_layers is not None and num_layers != len(layers):
        raise InvalidArgumentError(f"num_layers={num_layers!r} disagrees with layers={layers!r} ({len(layers)} "
                                   "layers); pass one of them")
    return layers


def shard_kv_heads(num_kv_heads: int, tp: int, tp_rank: int) -> list[int]:
    """Global KV head indices rank ``tp_rank`` of ``tp`` holds.

    Contiguous split when ``tp <= num_kv_heads``; when ``tp > num_kv_heads`` rank r holds the single head
    ``r * num_kv_heads // tp`` (each head replicated on ``tp // num_kv_heads`` consecutive ranks).

    >>> shard_kv_heads(8, 4, 1), shard_kv_heads(2, 8, 5)
    ([2, 3], [1])
    """
    num_kv_heads = check_int("num_kv_heads", num_kv_heads)
    tp = check_int("tp", tp)
    tp_rank = check_int("tp_rank", tp_rank, minimum=0, maximum=tp - 1)
    check_kv_head_split(num_kv_heads, tp, error=InvalidArgumentError)
    if tp >= num_kv_heads:
        return [tp_rank * num_kv_heads // tp]
    per = num_kv_heads // tp
    return list(range(tp_rank * per, (tp_rank + 1) * per))


def window_aware_bytes_per_seq(spec, per_layer_token: int, layers: range, seq_len: int) -> int:
    """KV bytes of one sequence of ``seq_len`` tokens when sliding-window layers keep only their window
    (what an engine with a per-layer-type pool holds; kvpool's single pool holds every layer in full).

    ``per_layer_token`` is one layer's KV bytes per token on this shard.

    >>> # Gemma-2-9B, 8,192 tokens: 21 global layers hold all 8,192, 21 sliding ones their 4,096-token window
    >>> # per_layer_token x (21 x 8,192 + 21 x 4,096) = per_layer_token x 258,048
    """
    windows = spec.layer_sliding_windows
    total = 0
    for i in layers:
        window = windows[i] if windows else None
        total += per_layer_token * (seq_len if window is None else min(seq_len, window))
    return total


__all__ = ["KVShardLayout", "kv_shard_layout", "shard_kv_heads", "window_aware_bytes_per_seq", "FP8_SCALE_MODES",
           "SCALE_BYTES", "check_tp", "serving_dtype", "resolve_kv_dtype"]
