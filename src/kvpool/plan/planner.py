"""`TPKVCachePlanner`: the seed's planner shape, with the KV heads counted right.

The seed computed KV bytes per token with ``num_attention_heads`` (64 for Llama-2-70B) where the cache
holds ``num_key_value_heads`` (8, grouped-query attention), so it planned 8x too few tokens. This class
keeps the seed's three questions (bytes per token per GPU, tokens for a memory amount, a plan for a
target batch and length) and answers them from `kv_shard_layout`, with the planner's one fit check
(`kvpool.plan.workload.fit`) and its one search for a larger TP degree.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from .checks import check_block_size, check_number, check_positive_int
from .kv import kv_shard_layout
from .model import load_model_spec
from .parallel import check_tp
from .units import GIB
from .workload import Fit, first_larger_tp, fit


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
        return self.max_tokens(kv_memory_gib) // check_positive_int("batch", batch, allow_none=False)

    def plan(self, batch: int, seq_len: int, kv_memory_gib: float) -> KVWorkloadPlan:
        """Does ``batch`` x ``seq_len`` fit in ``kv_memory_gib`` per GPU? If not, what would (with numbers)."""
        batch = check_positive_int("batch", batch, allow_none=False)
        seq_len = check_positive_int("seq_len", seq_len, allow_none=False)
        max_tokens = self.max_tokens(kv_memory_gib)
        f = fit(self.max_blocks(kv_memory_gib), self.block_size, batch, seq_len)
        need_bytes = f.blocks_needed * self.layout.bytes_per_block(self.block_size)
        if f.fits:
            rec = (f"fits: {batch} x {seq_len:,} tokens need {need_bytes / GIB:.2f} of {kv_memory_gib:g} GiB per GPU; "
                   f"up to {f.max_batch:,} such sequences fit")
        else:
            rec = self._recommend(f, kv_memory_gib, need_bytes)
        return KVWorkloadPlan(batch, seq_len, self.tp, float(kv_memory_gib), self.bytes_per_token_per_gpu,
                              round(need_bytes / GIB, 4), f.fits, max_tokens, max_tokens // batch, f.max_batch,
                              f.max_seq_len, rec)

    def _at(self, tp: int | None = None, kv_dtype: str | None = None) -> "TPKVCachePlanner":
        """This planner at another TP degree or KV dtype."""
        return TPKVCachePlanner(self.spec, tp or self.tp, kv_dtype or self.kv_dtype, self.block_size, self.fp8_scales)

    def _recommend(self, f: Fit, gib: float, need_bytes: int) -> str:
        parts = [f"does not fit: needs {need_bytes / GIB:.2f} GiB per GPU, {gib:g} GiB available"]
        # same KV memory per GPU at a higher TP degree (conservative: weights also shrink at higher TP)
        larger = first_larger_tp(self.spec, self.tp, lambda tp: self._at(tp).max_blocks(gib), f.blocks_per_seq,
                                 f.batch)
        if larger is not None and larger.fits:
            parts.append(f"tp={larger.tp} ({self._at(larger.tp).bytes_per_token_per_gpu:,} B/token/GPU) holds "
                         f"{larger.sequences:,} sequences")
        if self.layout.kv_dtype != "fp8":
            fp8 = self._at(kv_dtype="fp8")
            parts.append(f"fp8 KV holds {fp8.max_blocks(gib) // f.blocks_per_seq:,} sequences "
                         f"({fp8.bytes_per_token_per_gpu:,} B/token/GPU)")
        parts.append(f"batch <= {f.max_batch:,} at {f.seq_len:,} tokens")
        parts.append(f"seq_len <= {f.max_seq_len:,} at batch {f.batch}")
        return "; ".join(parts)


def _kv_bytes(kv_memory_gib) -> int:
    return int(check_number("kv_memory_gib", kv_memory_gib, unit="GiB", positive=True) * GIB)
