"""What one tensor-parallel shard's KV pages hold: `KVShardLayout` and `shard_kv_heads`.

This is the contract between the planner (bytes per block) and `kvpool.cache.PagedKVCache` (the page
tensors): ``PagedKVCache.memory_bytes() == plan.kv_cache.bytes_per_block_per_gpu * num_blocks``.

The pool keeps one block table for all layers, so every layer's pages span the whole pool whatever its
sliding window; `bytes_per_token` therefore counts every layer at full length. Window-aware figures are
in `kvpool.plan.memory` (``max_concurrency_window_aware``).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import InvalidArgumentError, PlanError
from .checks import check_block_size, check_positive_int

KV_DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "fp8": 1}
KV_DTYPE_ALIASES = {
    "auto": "auto", "fp32": "fp32", "float32": "fp32", "fp16": "fp16", "float16": "fp16", "half": "fp16",
    "bf16": "bf16", "bfloat16": "bf16", "fp8": "fp8", "fp8_e4m3": "fp8", "fp8_e5m2": "fp8",
}
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
    """

    num_layers: int
    kv_heads: int
    head_dim: int
    v_head_dim: int
    kv_dtype: str
    dtype_bytes: int
    scale_bytes: int
    fp8_scales: str | None = None

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
        """Bytes of one block of ``block_size`` tokens on this shard."""
        return self.bytes_per_token * check_block_size(block_size)

    def to_dict(self) -> dict:
        return {
            "num_layers": self.num_layers, "kv_heads": self.kv_heads, "head_dim": self.head_dim,
            "v_head_dim": self.v_head_dim, "kv_dtype": self.kv_dtype, "dtype_bytes": self.dtype_bytes,
            "scale_bytes": self.scale_bytes, "bytes_per_token": self.bytes_per_token,
            "fp8_scales": self.fp8_scales, "scale_bytes_per_token": self.scale_bytes_per_token,
            "scale_bytes_outside_pool": self.scale_bytes_outside_pool, "scale_layout": self.scale_layout(),
        }


def resolve_kv_dtype(kv_dtype: str, model_dtype: str) -> str:
    """Canonical KV dtype name; "auto" means `model_dtype` (the serving dtype)."""
    key = KV_DTYPE_ALIASES.get(str(kv_dtype).lower())
    if key is None:
        raise InvalidArgumentError(
            f"kv_dtype must be one of auto, fp32, fp16, bf16, fp8, got {kv_dtype!r}"
        )
    return model_dtype if key == "auto" else key


def serving_dtype(spec, dtype: str | None) -> str:
    """The dtype activations and unquantized weights run in: ``dtype`` or the checkpoint's; fp32
    checkpoints are served in bf16 as vLLM does by default (``--dtype auto``)."""
    if dtype is None or str(dtype).lower() == "auto":
        return "bf16" if spec.dtype == "fp32" else spec.dtype
    key = {"float16": "fp16", "half": "fp16", "bfloat16": "bf16", "float32": "fp32", "float": "fp32"}.get(
        str(dtype).lower(), str(dtype).lower())
    if key not in ("fp16", "bf16", "fp32"):
        raise InvalidArgumentError(f"dtype must be auto, fp16, bf16 or fp32, got {dtype!r}")
    return key


def check_tp(spec, tp) -> int:
    """Validate the TP degree against the model's heads (the rule vLLM applies)."""
    tp = check_positive_int("tp", tp, allow_none=False)
    heads = spec.num_attention_heads
    if heads % tp:
        divisors = [d for d in range(1, heads + 1) if heads % d == 0 and d <= 64]
        raise PlanError(
            f"tp={tp} does not divide the {heads} attention heads of {spec.name}; use one of {divisors}"
        )
    kv = 1 if spec.is_mla else spec.num_kv_heads
    if not spec.is_mla:
        if tp <= kv and kv % tp:
            raise PlanError(f"tp={tp} does not divide the {kv} KV heads of {spec.name}; use a divisor of {kv}")
        if tp > kv and tp % kv:
            raise PlanError(
                f"tp={tp} is above the {kv} KV heads of {spec.name} but not a multiple of them, so the heads "
                f"cannot be replicated evenly; use a multiple of {kv}"
            )
    return tp


def kv_shard_layout(spec, tp: int = 1, kv_dtype: str = "auto", fp8_scales: str = "per_token_head",
                    num_layers: int | None = None) -> KVShardLayout:
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
        Layers held by this shard (a pipeline stage); default all of the model's layers.
    """
    tp = check_tp(spec, tp)
    if fp8_scales not in FP8_SCALE_MODES:
        raise InvalidArgumentError(f"fp8_scales must be one of {', '.join(FP8_SCALE_MODES)}, got {fp8_scales!r}")
    dtype = resolve_kv_dtype(kv_dtype, serving_dtype(spec, None))
    layers = spec.num_layers if num_layers is None else num_layers
    if isinstance(layers, bool) or not isinstance(layers, int) or not 0 < layers <= spec.num_layers:
        raise InvalidArgumentError(f"num_layers must be in 1..{spec.num_layers}, got {num_layers!r}")
    if spec.is_mla:
        heads, k_dim, v_dim = 1, spec.kv_lora_rank + spec.qk_rope_head_dim, 0
    else:
        heads, k_dim, v_dim = max(1, spec.num_kv_heads // tp), spec.head_dim, spec.v_head_dim
    scale = SCALE_BYTES if dtype == "fp8" and fp8_scales == "per_token_head" else 0
    return KVShardLayout(layers, heads, k_dim, v_dim, dtype, KV_DTYPE_BYTES[dtype], scale,
                         fp8_scales if dtype == "fp8" else None)


def shard_kv_heads(num_kv_heads: int, tp: int, tp_rank: int) -> list[int]:
    """Global KV head indices rank ``tp_rank`` of ``tp`` holds.

    Contiguous split when ``tp <= num_kv_heads``; when ``tp > num_kv_heads`` rank r holds the single head
    ``r * num_kv_heads // tp`` (each head replicated on ``tp // num_kv_heads`` consecutive ranks).
    """
    for label, value in (("num_kv_heads", num_kv_heads), ("tp", tp)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidArgumentError(f"{label} must be a positive integer, got {value!r}")
    if isinstance(tp_rank, bool) or not isinstance(tp_rank, int) or not 0 <= tp_rank < tp:
        raise InvalidArgumentError(f"tp_rank must be in 0..{tp - 1}, got {tp_rank!r}")
    if tp >= num_kv_heads:
        return [tp_rank * num_kv_heads // tp]
    if num_kv_heads % tp:
        raise InvalidArgumentError(f"tp={tp} does not divide num_kv_heads={num_kv_heads}; use a divisor of it")
    per = num_kv_heads // tp
    return list(range(tp_rank * per, (tp_rank + 1) * per))
