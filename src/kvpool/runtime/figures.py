"""One rank's memory terms and the block count they leave (step 5 of ``size_kv_pool``, local).

>>> # Llama-3.1-8B, bf16, block_size 16: 2 MiB a block = 32 layers x 8 KV heads x (K + V) x 128 x 2 B x 16
>>> # 80 GiB device, mem_fraction 0.9, 15 GiB weights, no non-torch, 1 GiB activation peak, no headroom:
>>> # 56 GiB for KV = 0.9 x 80 - 15 - 0 - 1 - 0, so 28,672 blocks = 56 GiB // 2 MiB
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from . import measure as _measure
from .group import Group
from ..plan.units import gib_text
from .pool_size import RankFigures
from .prepare import Prepared


@dataclasses.dataclass(frozen=True)
class Warmed:
    """What steps 3-4 leave for the last measurement: the CUDA snapshot after the NCCL warm-up (``None`` on
    the CPU) and the activation peak in bytes (measured or declared)."""

    after_comm: Optional[_measure.Snapshot]
    activation_bytes: int


def rank_figures(prep: Prepared, grp: Group, global_rank: int, warmed: Warmed) -> RankFigures:
    """This rank's terms; on CUDA read after the profile with torch's cached blocks released."""
    args, dev = prep.args, prep.device
    if dev.type == "cuda":
        last = _measure.cuda_snapshot(dev, release_cache=True)
        total = args.device_memory_bytes or last.total
        # device_memory_bytes (if given) lowers the total; everything measured still counts in full
        in_use, reserved, non_torch, free = last.allocated, last.reserved, last.non_torch, last.free
        nccl = max(0, warmed.after_comm.non_torch - prep.first.non_torch)
    else:
        total = args.device_memory_bytes
        in_use = reserved = args.in_use_bytes or 0
        non_torch = nccl = 0
        free = total - in_use
    headroom_bytes = args.headroom if isinstance(args.headroom, int) else int(args.headroom * total)
    budget = int(args.mem_fraction * total)
    activation = warmed.activation_bytes
    kv_budget = budget - in_use - non_torch - activation - headroom_bytes
    return RankFigures(
        rank=grp.rank, global_rank=global_rank, tp_rank=args.tp_rank, device=str(dev), measured=dev.type == "cuda",
        total_bytes=int(total), budget_bytes=budget, free_bytes=int(free),
        torch_in_use_bytes=int(in_use), torch_reserved_bytes=int(reserved),
        non_torch_bytes=int(non_torch), nccl_bytes=int(nccl), activation_peak_bytes=int(activation),
        headroom_bytes=headroom_bytes, kv_budget_bytes=int(kv_budget),
        num_blocks=max(0, kv_budget) // prep.bytes_per_block,
    )


def no_block_message(d: RankFigures, prep: Prepared, world: int) -> str:
    """Why rank ``d`` has no block, with its arithmetic and what to change."""
    g = gib_text  # "37.70 GiB"
    short = prep.bytes_per_block - d.kv_budget_bytes
    where = f"rank {d.rank} of {world}" if world > 1 else "this device"
    return (
        f"the memory budget leaves no KV block on {where}: {prep.args.mem_fraction} x {g(d.total_bytes)} total "
        f"= {g(d.budget_bytes)} budget - {g(d.torch_in_use_bytes)} torch in use (weights) - "
        f"{g(d.non_torch_bytes)} non-torch - {g(d.activation_peak_bytes)} activation peak - "
        f"{g(d.headroom_bytes)} headroom = {g(d.kv_budget_bytes)} for KV, and one block takes "
        f"{prep.bytes_per_block} bytes (short by {short} bytes). Raise mem_fraction, lower headroom or "
        "max_batched_tokens, use more tensor-parallel ranks, kv_dtype='fp8' or a smaller block_size"
    )
