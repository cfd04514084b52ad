"""`TPKVCachePlanner`: the seed's planner shape, with the KV heads counted right.

The seed computed KV bytes per token with ``num_attention_heads`` (64 for Llama-2-70B) where the cache
holds ``num_key_value_heads`` (8, grouped-query attention), so it planned 8x too few tokens. This class
keeps the seed's three questions (bytes per token per GPU, tokens for a memory amount, a plan for a
target batch and length) and answers them from `kv_shard_layout`.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from ..errors import InvalidArgumentError, PlanError
from .checks import check_block_size
from .hardware import GIB
from .kv import check_tp, kv_shard_layout
from .model import load_model_spec


@dataclass(frozen=True)
class KVWorkloadPlan:
    """Answer of `TPKVCachePlanner.plan` (all memory figures per GPU)."""

    batch: int
    seq_len: int
    tp: int
    kv_memory_gib: float
    bytes_per_token_per_gpu: int
    required_gib: float
    fits: bool
    max_tokens: int
    tokens_per_request: int
    max_batch: int
    max_seq_len: int
    recommendation: str

    def to_dict(self) -> dict:
        return asdict(self)


class TPKVCachePlanner:
    """KV capacity of a model under TP for a given amount of KV memory per GPU.

    Parameters
    ----------
    model : str | path | dict | ModelSpec
    tp : int
        Tensor-parallel degree.
    kv_dtype : str
        "auto" (model dtype), "fp16", "bf16", "fp8".
    block_size : int
        Tokens per block (for the block counts).

    Examples
    --------
    >>> p = TPKVCachePlanner("llama-2-70b", tp=4)
    >>> p.bytes_per_token_per_gpu, p.max_tokens(28)
    (81920, 367001)
    """

    def __init__(self, model, tp: int = 1, kv_dtype: str = "auto", block_size: int = 16,
                 fp8_scales: str = "per_token_head"):
        self.spec = load_model_spec(model)
        self.tp = check_tp(self.spec, tp)
        self.kv_dtype = kv_dtype
        self.fp8_scales = fp8_scales
        self.block_size = check_block_size(block_size)
        self.layout = kv_shard_layout(self.spec, self.tp, kv_dtype, fp8_scales)

    @property
    def bytes_per_token_per_gpu(self) -> int:
        return self.layout.bytes_per_token

    @property
    def bytes_per_token(self) -> int:
        """All TP ranks together (replicated heads counted on every rank that holds them)."""
        return self.layout.bytes_per_token * self.tp

    def max_tokens(self, kv_memory_gib: float) -> int:
        """Tokens that ``kv_memory_gib`` GiB of KV memory per GPU hold (bytes / bytes-per-token, no blocks)."""
        return _kv_bytes(kv_memory_gib) // self.bytes_per_token_per_gpu

    def max_blocks(self, kv_memory_gib: float) -> int:
        return _kv_bytes(kv_memory_gib) // self.layout.bytes_per_block(self.block_size)

    def tokens_per_request(self, kv_memory_gib: float, batch: int) -> int:
        _positive("batch", batch)
        return self.max_tokens(kv_memory_gib) // batch

    def plan(self, batch: int, seq_len: int, kv_memory_gib: float) -> KVWorkloadPlan:
        """Does ``batch`` x ``seq_len`` fit in ``kv_memory_gib`` per GPU? If not, what would (with numbers)."""
        _positive("batch", batch)
        _positive("seq_len", seq_len)
        bpt = self.bytes_per_token_per_gpu
        max_tokens = self.max_tokens(kv_memory_gib)
        blocks = self.max_blocks(kv_memory_gib)
        per_seq_blocks = math.ceil(seq_len / self.block_size)
        need_bytes = batch * per_seq_blocks * self.layout.bytes_per_block(self.block_size)
        fits = batch * per_seq_blocks <= blocks
        max_batch = blocks // per_seq_blocks
        max_len = (blocks // batch) * self.block_size
        if fits:
            rec = (f"fits: {batch} x {seq_len:,} tokens need {need_bytes / GIB:.2f} of {kv_memory_gib:g} GiB per GPU; "
                   f"up to {max_batch:,} such sequences fit")
        else:
            rec = self._recommend(batch, seq_len, kv_memory_gib, need_bytes, max_batch, max_len)
        return KVWorkloadPlan(batch, seq_len, self.tp, float(kv_memory_gib), bpt, round(need_bytes / GIB, 4), fits,
                              max_tokens, max_tokens // batch, max_batch, max_len, rec)

    def _recommend(self, batch, seq_len, gib, need_bytes, max_batch, max_len) -> str:
        parts = [f"does not fit: needs {need_bytes / GIB:.2f} GiB per GPU, {gib:g} GiB available"]
        # same KV memory per GPU at a higher TP degree (conservative: weights also shrink at higher TP)
        for tp in (2, 4, 8, 16, 32, 64):
            if tp <= self.tp:
                continue
            try:
                other = TPKVCachePlanner(self.spec, tp, self.kv_dtype, self.block_size, self.fp8_scales)
            except PlanError:
                continue
            cap = other.max_blocks(gib) // math.ceil(seq_len / self.block_size)
            if cap >= batch:
                parts.append(f"tp={tp} ({other.bytes_per_token_per_gpu:,} B/token/GPU) holds {cap:,} sequences")
                break
        if self.layout.kv_dtype != "fp8":
            fp8 = TPKVCachePlanner(self.spec, self.tp, "fp8", self.block_size, self.fp8_scales)
            cap = fp8.max_blocks(gib) // math.ceil(seq_len / self.block_size)
            parts.append(f"fp8 KV holds {cap:,} sequences ({fp8.bytes_per_token_per_gpu:,} B/token/GPU)")
        parts.append(f"batch <= {max_batch:,} at {seq_len:,} tokens")
        parts.append(f"seq_len <= {max_len:,} at batch {batch}")
        return "; ".join(parts)


def _positive(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InvalidArgumentError(f"{name} must be a positive integer, got {value!r}")


def _kv_bytes(gib) -> int:
    if isinstance(gib, bool) or not isinstance(gib, (int, float)) or not gib > 0 or gib != gib:
        raise InvalidArgumentError(f"kv memory must be a positive number of GiB, got {gib!r}")
    return int(gib * GIB)
