"""``PoolSize``: the block count every rank agreed on, each rank's figures, and the plan beside them."""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

from ..plan.units import GIB


@dataclasses.dataclass(frozen=True)
class RankFigures:
    """One rank's own memory terms, in bytes.

    ``kv_budget_bytes = budget_bytes - torch_in_use_bytes - non_torch_bytes - activation_peak_bytes
    - headroom_bytes`` (may be negative), and ``num_blocks = max(0, kv_budget_bytes) // bytes_per_block``.
    ``measured`` is True on CUDA (terms read from the driver and torch's allocator), False on CPU
    (terms declared by the caller).
    """

    rank: int
    global_rank: int
    tp_rank: int
    device: str
    measured: bool
    total_bytes: int
    budget_bytes: int
    free_bytes: int
    torch_in_use_bytes: int
    torch_reserved_bytes: int
    non_torch_bytes: int
    nccl_bytes: int
    activation_peak_bytes: int
    headroom_bytes: int
    kv_budget_bytes: int
    num_blocks: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# The deciding rank's own figures a PoolSize carries at its top level (same names in both classes)
_DECIDING_TERMS = (
    "num_blocks", "measured", "total_bytes", "budget_bytes", "torch_in_use_bytes", "activation_peak_bytes",
    "non_torch_bytes", "nccl_bytes", "headroom_bytes", "kv_budget_bytes",
)

# term -> (PoolSize attribute, key of ``predicted``); the planner's non-torch is its comm + overhead
_TERMS = (
    ("weights (torch in use)", "torch_in_use_bytes", "weights_bytes"),
    ("activation peak", "activation_peak_bytes", "activation_bytes"),
    ("non-torch (context+NCCL)", "non_torch_bytes", "non_torch_bytes"),
    ("  of which NCCL", "nccl_bytes", "comm_bytes"),
    ("KV cache", "kv_budget_bytes", "kv_bytes"),
)


@dataclasses.dataclass(frozen=True)
class PoolSize:
    """The pool every rank of the group builds, and where its memory went.

    The same object (equal fields) on every rank. Per-term figures at the top level are those of the
    deciding rank (the one with the fewest blocks); ``ranks`` holds every rank's own.

    Attributes
    ----------
    num_blocks : int
        Blocks of the pool on every rank: the MIN over the group.
    block_size : int
        Tokens per block.
    bytes_per_block : int
        Bytes of one block on one shard, all layers, K and V (and fp8 scales).
    num_tokens : int
        ``num_blocks * block_size``.
    kv_bytes : int
        Bytes the pool will take on each rank: ``num_blocks * bytes_per_block``.
    total_bytes, budget_bytes, torch_in_use_bytes, activation_peak_bytes, non_torch_bytes, nccl_bytes, headroom_bytes, kv_budget_bytes : int
        The deciding rank's terms (see ``RankFigures``).
    deciding_rank : int
        Group rank whose budget gave the fewest blocks (the lowest such rank on a tie).
    ranks : tuple of RankFigures
        Every rank's own figures, in group-rank order.
    digest : str
        sha256 of the settings every rank agreed on.
    hash_key : int
        128 random bits in ``[0, 2**128)``, drawn on TP rank 0 by this call and the same on every rank:
        pass it to ``BlockAllocator(..., hash_key=pool.hash_key)`` on every rank so their prefix-cache
        block hashes agree. A fresh key per call; left out of ``repr()`` and ``to_dict()`` so logs and
        reports do not reveal it.
    predicted : dict or None
        The planner's figures for the same model and settings (``kvpool.plan.plan_memory``), in
        bytes: ``weights_bytes, activation_bytes, comm_bytes, overhead_bytes, non_torch_bytes,
        kv_bytes, bytes_per_block, num_blocks`` and the plan's ``to_dict()`` under ``plan``;
        ``None`` when the planner could not plan it (``prediction_error`` says why).
    """

    num_blocks: int
    block_size: int
    bytes_per_block: int
    num_tokens: int
    kv_bytes: int
    tp_size: int
    kv_dtype: str
    fp8_scales: str
    mem_fraction: float
    device: str
    measured: bool
    total_bytes: int
    budget_bytes: int
    torch_in_use_bytes: int
    activation_peak_bytes: int
    non_torch_bytes: int
    nccl_bytes: int
    headroom_bytes: int
    kv_budget_bytes: int
    deciding_rank: int
    ranks: tuple
    digest: str
    hash_key: int = dataclasses.field(repr=False)
    predicted: Optional[dict] = None
    prediction_error: Optional[str] = None

    @classmethod
    def from_ranks(cls, ranks: Sequence[RankFigures], deciding: int, *, block_size: int, bytes_per_block: int,
                   tp_size: int, kv_dtype: str, fp8_scales: str, mem_fraction: float, device: str, digest: str,
                   hash_key: int, predicted: Optional[dict] = None,
                   prediction_error: Optional[str] = None) -> "PoolSize":
        """The pool of group rank ``deciding`` (the fewest blocks): its terms, with the settings the ranks agreed on."""
        d = ranks[deciding]
        return cls(
            **{name: getattr(d, name) for name in _DECIDING_TERMS},
            block_size=block_size, bytes_per_block=bytes_per_block, num_tokens=d.num_blocks * block_size,
            kv_bytes=d.num_blocks * bytes_per_block, tp_size=tp_size, kv_dtype=kv_dtype, fp8_scales=fp8_scales,
            mem_fraction=mem_fraction, device=device, deciding_rank=deciding, ranks=tuple(ranks), digest=digest,
            hash_key=hash_key, predicted=predicted, prediction_error=prediction_error,
        )

    def comparison(self) -> list[dict]:
        """Measured (deciding rank) vs predicted, per term.

        Returns
        -------
        list of dict
            One row per term: ``term``, ``measured_bytes``, ``predicted_bytes`` (None without a plan),
            ``diff_bytes`` (predicted - measured) and ``diff_pct`` (100 * diff / measured; None when
            measured is 0 or there is no plan). The last rows compare blocks and bytes per block
            (counts, not bytes, in the ``*_bytes`` columns).
        """
        rows = []
        pred = self.predicted or {}
        for term, attr, key in _TERMS:
            rows.append(_row(term, getattr(self, attr), pred.get(key)))
        rows.append(_row("blocks", self.num_blocks, pred.get("num_blocks")))
        rows.append(_row("bytes per block", self.bytes_per_block, pred.get("bytes_per_block")))
        return rows

    def format_comparison(self) -> str:
        """``comparison()`` as a text table (GiB for memory terms)."""
        head = (
            f"kvpool pool size: {self.num_blocks} blocks x {self.block_size} tokens "
            f"({self.num_tokens} tokens, {self.kv_bytes / GIB:.3f} GiB per rank) on {self.device}, "
            f"tp={self.tp_size}, decided by rank {self.deciding_rank}"
            + ("" if self.measured else " (declared terms, CPU)")
        )
        lines = [head, f"{'term':<26}{'measured':>14}{'planned':>14}{'plan-meas':>14}{'diff %':>9}"]
        for row in self.comparison():
            is_count = row["term"] in ("blocks", "bytes per block")
            fmt = (lambda v: f"{v:,}") if is_count else (lambda v: f"{v / GIB:.3f} GiB")
            meas = fmt(row["measured_bytes"])
            pred = "-" if row["predicted_bytes"] is None else fmt(row["predicted_bytes"])
            diff = "-" if row["diff_bytes"] is None else fmt(row["diff_bytes"])
            pct = "-" if row["diff_pct"] is None else f"{row['diff_pct']:+.2f}"
            lines.append(f"{row['term']:<26}{meas:>14}{pred:>14}{diff:>14}{pct:>9}")
        if self.predicted is None and self.prediction_error:
            lines.append(f"(no plan to compare with: {self.prediction_error})")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """JSON-able dict of every field but ``hash_key``, with ``ranks`` as a list of dicts and the comparison rows."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("ranks", "hash_key")}
        d["ranks"] = [r.to_dict() for r in self.ranks]
        d["comparison"] = self.comparison()
        return d


def _row(term: str, measured: int, predicted: Optional[int]) -> dict:
    if predicted is None:
        return {"term": term, "measured_bytes": int(measured), "predicted_bytes": None,
                "diff_bytes": None, "diff_pct": None}
    diff = int(predicted) - int(measured)
    pct = None if measured == 0 else 100.0 * diff / measured
    return {"term": term, "measured_bytes": int(measured), "predicted_bytes": int(predicted),
            "diff_bytes": diff, "diff_pct": pct}
