"""Does a target workload (batch B at length L) fit a KV pool, and what would when it does not.

One fit check (`fit`) and one search for a larger TP degree (`first_larger_tp`), used by `check_workload`
(``plan_memory(batch=, seq_len=)``) and by `TPKVCachePlanner.plan` alike.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

from ..errors import KVPoolError
from .kv import window_aware_bytes_per_seq
from .plan_result import JSONSection
from .window_capacity import per_request_blocks
from .parallel import larger_tps
from .units import gib


@dataclass(frozen=True)
class Fit:
    """``batch`` sequences of ``seq_len`` tokens against a pool of ``num_blocks`` blocks of ``block_size``.

    A sequence holds whole blocks, its last one partly filled:

    >>> # 45 = (3 - 1) * 16 + 13: 45 tokens take 3 blocks of 16, the third holding 13
    >>> fit(num_blocks=10, block_size=16, batch=3, seq_len=45).blocks_per_seq
    3
    >>> f = fit(num_blocks=22_937, block_size=16, batch=32, seq_len=4_096)  # the seed's Llama-2-70B pool
    >>> # 8,192 = 32 x ceil(4,096 / 16) blocks needed; 89 = 22,937 // 256; 11,456 = (22,937 // 32) x 16
    >>> f.blocks_needed, f.fits, f.max_batch, f.max_seq_len
    (8192, True, 89, 11456)
    """

    batch: int
    seq_len: int
    block_size: int
    num_blocks: int
    group_windows: tuple = (None,)  # each KV-cache group's window (None: full attention)

    @property
    def blocks_per_seq(self) -> int:
        """Blocks one sequence holds in all its KV-cache groups (windowed groups only their window)."""
        return per_request_blocks(self.group_windows, self.seq_len, self.block_size)

    @property
    def blocks_needed(self) -> int:
        return self.batch * self.blocks_per_seq

    @property
    def fits(self) -> bool:
        return self.blocks_needed <= self.num_blocks

    @property
    def max_batch(self) -> int:
        """Sequences of ``seq_len`` tokens the pool holds."""
        return self.num_blocks // self.blocks_per_seq

    @property
    def max_seq_len(self) -> int:
        """Tokens each of ``batch`` sequences can hold (whole blocks)."""
        per_seq = self.num_blocks // self.batch
        if self.group_windows == (None,):
            return per_seq * self.block_size
        # blocks per sequence grow with its length only through the full groups: search the longest
        lo, hi = 0, per_seq * self.block_size
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if per_request_blocks(self.group_windows, mid, self.block_size) <= per_seq:
                lo = mid
            else:
                hi = mid - 1
        return lo


def fit(num_blocks: int, block_size: int, batch: int, seq_len: int, group_windows: tuple = (None,)) -> Fit:
    return Fit(batch, seq_len, block_size, num_blocks, tuple(group_windows))


@dataclass(frozen=True)
class LargerTP:
    """The pool at a larger TP degree: its blocks, and the sequences of the workload's length it holds."""

    tp: int
    num_blocks: int
    sequences: int
    fits: bool


def first_larger_tp(spec, tp: int, blocks_at: Callable[[int], int], blocks_per_seq: int,
                    batch: int) -> LargerTP | None:
    """The smallest TP degree above ``tp`` whose pool holds ``batch`` sequences of ``blocks_per_seq`` blocks;
    when none does, the largest degree that could be planned (``fits`` False); None when none could.

    ``blocks_at(tp)`` is the pool's block count at that degree; a KVPoolError (it does not fit) skips it.
    """
    best = None
    for candidate in larger_tps(spec, tp):
        try:
            blocks = blocks_at(candidate)
        except KVPoolError:
            continue
        best = LargerTP(candidate, blocks, blocks // blocks_per_seq, blocks // blocks_per_seq >= batch)
        if best.fits:
            break
    return best


@dataclass(frozen=True, eq=False)
class WorkloadCheck(JSONSection):
    """A target workload against a plan's pool (per GPU, in bytes), and the alternatives searched when it
    does not fit: a larger TP degree, fp8 KV (``fp8``: bytes per token per GPU, sequences it holds)."""

    fit: Fit
    bytes_per_block: int
    kv_bytes: int
    tokens_unpaged: int
    max_model_len: int
    window_seq_bytes: int  # one sequence's KV if sliding-window layers kept only their window
    pp: int
    larger_tp: LargerTP | None = None
    fp8: tuple[int, int] | None = None

    @property
    def kv_needed_bytes(self) -> int:
        return self.fit.blocks_needed * self.bytes_per_block

    @property
    def fits_window_aware(self) -> bool:
        return self.fit.batch * self.window_seq_bytes <= self.kv_bytes

    def to_dict(self) -> dict:
        f = self.fit
        return {
            "batch": f.batch, "seq_len": f.seq_len, "blocks_per_seq": f.blocks_per_seq,
            "blocks_needed": f.blocks_needed, "fits": f.fits,
            "kv_needed_gib_per_gpu": gib(self.kv_needed_bytes), "kv_available_gib_per_gpu": gib(self.kv_bytes),
            "pool_use": round(f.blocks_needed / f.num_blocks, 4) if f.num_blocks else None,
            "max_batch_at_seq_len": f.max_batch, "max_seq_len_at_batch": f.max_seq_len,
            "tokens_per_request_unpaged": self.tokens_unpaged // f.batch,
            "max_batch_at_seq_len_unpaged": self.tokens_unpaged // f.seq_len,
            "fits_window_aware": self.fits_window_aware,
            "recommendations": self.recommendations(),
        }

    def recommendations(self) -> list[str]:
        """What to change, each with its numbers (the prose of the JSON's ``recommendations``)."""
        f, recs = self.fit, []
        if f.seq_len > self.max_model_len:
            recs.append(f"seq_len {f.seq_len:,} is above max_model_len {self.max_model_len:,}: raise --max-model-len "
                        "(the pool and the activation plan assume the smaller one)")
        if f.fits:
            recs.append(f"fits: uses {f.blocks_needed:,} of {f.num_blocks:,} blocks "
                        f"({100 * f.blocks_needed / f.num_blocks:.1f}%); room for "
                        f"{(f.num_blocks - f.blocks_needed) // f.blocks_per_seq:,} more sequences of {f.seq_len:,} tokens")
            return recs
        recs.append(f"does not fit: needs {f.blocks_needed:,} blocks ({gib(self.kv_needed_bytes):.2f} GiB per GPU), "
                    f"the pool has {f.num_blocks:,} ({gib(self.kv_bytes):.2f} GiB)")
        larger = self.larger_tp
        if larger is not None and larger.fits:
            recs.append(f"more TP: tp={larger.tp} ({larger.tp * self.pp} GPUs) holds {larger.sequences:,} sequences "
                        f"of {f.seq_len:,} tokens ({larger.num_blocks:,} blocks)")
        elif larger is not None:
            recs.append(f"more TP alone is not enough: even tp={larger.tp} holds only {larger.sequences:,} sequences "
                        f"of {f.seq_len:,} tokens")
        if self.fp8 is not None:
            verdict = "fits" if self.fp8[1] >= f.batch else "still short"
            recs.append(f"fp8 KV (--kv-dtype fp8): {self.fp8[0]:,} B/token/GPU, {self.fp8[1]:,} sequences of "
                        f"{f.seq_len:,} tokens ({verdict})")
        recs.append(f"smaller batch: at {f.seq_len:,} tokens at most {f.max_batch:,} sequences fit")
        recs.append(f"shorter length: at batch {f.batch:,} each sequence can hold {f.max_seq_len:,} tokens "
                    f"(--max-model-len {f.max_seq_len:,})")
        return recs


def check_workload(plan, replan: Callable) -> WorkloadCheck:
    """``plan.request.batch`` sequences of ``plan.request.seq_len`` tokens against ``plan``'s pool.

    When they do not fit and ``plan.request.recommend``, ``replan(request)`` plans the alternatives:
    each larger TP degree (an explicit weights reservation scaled by the degree) and fp8 KV.
    """
    req, kv, tight = plan.request, plan.kv_cache, plan.tight
    f = fit(kv.num_blocks, kv.block_size, req.batch, req.seq_len, kv.group_windows)
    per_layer_token = kv.bytes_per_token_per_gpu // len(tight.layers)
    larger = fp8 = None
    if req.recommend and not f.fits:
        variant = replace(req, batch=None, seq_len=None, recommend=False)

        def blocks_at(tp: int) -> int:  # an explicit weights shard scales with the TP degree
            weights = variant.reserved.weights
            reserved = variant.reserved if weights is None else replace(variant.reserved, weights=weights * req.tp // tp)
            return replan(replace(variant, tp=tp, reserved=reserved)).num_blocks

        larger = first_larger_tp(req.spec, req.tp, blocks_at, f.blocks_per_seq, f.batch)
        if kv.kv_dtype != "fp8":
            try:
                other = replan(replace(variant, kv_dtype="fp8"))
                fp8 = (other.kv_cache.bytes_per_token_per_gpu, other.kv_cache.requests_fit(req.seq_len))
            except KVPoolError:
                pass
    return WorkloadCheck(f, kv.bytes_per_block_per_gpu, kv.kv_bytes_per_gpu, kv.tokens_unpaged, kv.max_model_len,
                         window_aware_bytes_per_seq(req.spec, per_layer_token, tight.layers, req.seq_len), req.pp,
                         larger, fp8)


__all__ = ["Fit", "fit", "LargerTP", "first_larger_tp", "WorkloadCheck", "check_workload"]
