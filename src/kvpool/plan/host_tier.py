"""The host-memory tier's capacity: how many blocks ``--host-kv-gib N`` of pinned host memory per GPU holds.

Each TP rank keeps its own host pool (``kvpool.HostKVTier``): host pages of the same geometry as its GPU
shard, so a host block is exactly as large as a GPU block (``bytes_per_block_per_gpu``, scales included),
and host block ids are the same on every rank. ``N`` GiB per GPU gives
``num_blocks = N GiB // bytes_per_block`` host blocks; a node with ``G`` GPUs pins ``G x N`` GiB.

>>> # Llama-3.1-8B, bf16, blocks of 16: 2 MiB per block (32 layers x 2 x 16 tokens x 8 heads x 128 x 2 B)
>>> t = host_tier_capacity(64 << 30, bytes_per_block=2 << 20, block_size=16, num_groups=1, gpus=1)
>>> t.num_blocks, t.tokens       # 64 GiB // 2 MiB = 32,768 blocks of 16 tokens
(32768, 524288)
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import PlanError


@dataclass(frozen=True)
class HostTierCapacity:
    """The host tier of one GPU (one TP rank), in bytes.

    Attributes
    ----------
    budget_bytes : int
        Host memory given to the tier per GPU (``--host-kv-gib``).
    bytes_per_block : int
        One block's bytes, the same as on the GPU (largest pipeline stage's block, so every rank's fits).
    num_blocks : int
        Host blocks: ``budget_bytes // bytes_per_block``.
    block_size, num_groups, gpus : int
        Tokens per block, KV-cache groups (a hybrid model's block serves one group), GPUs of the replica.
    """

    budget_bytes: int
    bytes_per_block: int
    num_blocks: int
    block_size: int
    num_groups: int
    gpus: int

    @property
    def bytes(self) -> int:
        """Pinned host bytes per GPU the blocks take: ``num_blocks * bytes_per_block``."""
        return self.num_blocks * self.bytes_per_block

    @property
    def tokens(self) -> int:
        """Tokens the host blocks hold, counted like the GPU pool's (``num_blocks // num_groups * block_size``)."""
        return self.num_blocks // self.num_groups * self.block_size

    def to_dict(self, gpu_tokens: int) -> dict:
        return {
            "host_kv_bytes_per_gpu": self.budget_bytes,
            "bytes_per_block_per_gpu": self.bytes_per_block,
            "num_blocks": self.num_blocks,
            "tokens": self.tokens,
            "bytes_per_gpu": self.bytes,
            "bytes_all_gpus": self.bytes * self.gpus,
            "tokens_vs_gpu_pool": round(self.tokens / gpu_tokens, 2) if gpu_tokens else None,
        }


def host_tier_capacity(budget_bytes: int, bytes_per_block: int, block_size: int, num_groups: int,
                       gpus: int) -> HostTierCapacity:
    """The host tier ``budget_bytes`` per GPU holds; PlanError when it holds no block."""
    num_blocks = budget_bytes // bytes_per_block
    if num_blocks < 1:
        raise PlanError(f"--host-kv-gib {budget_bytes / 2**30:.4g} holds no block of {bytes_per_block:,} bytes "
                        f"({bytes_per_block / 2**20:.2f} MiB): give at least that much host memory per GPU, or leave the "
                        "flag out (no host tier)")
    return HostTierCapacity(budget_bytes, bytes_per_block, num_blocks, block_size, num_groups, gpus)


__all__ = ["HostTierCapacity", "host_tier_capacity"]
