"""Shared setup of the elastic-pool tests: each test runs on the host backend (CPU) and on CUDA when there is
a GPU (the CUDA variant skips with the reason here)."""
from __future__ import annotations

import pytest
import torch

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="no CUDA device: the CUDA VMM backend runs in gpu_check.sh")]),
]

FP32 = {"dtype": torch.float32, "kv_dtype": "fp32"}  # the pages of the sizes below

# Llama-shaped and small: 2 layers of 2 KV heads x 16 dims, fp32, 8-token blocks: 2 KiB per tensor and block,
# 1024 blocks per 2 MiB chunk
TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16, "num_hidden_layers": 2, "intermediate_size": 128,
    "vocab_size": 256, "torch_dtype": "float32", "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
}
# ... and one with 64 KiB rows (16 heads x 128 dims x 8 tokens x fp32 / 4): 32 blocks per chunk, so that
# growing and shrinking map and unmap chunks within a few hundred blocks
WIDE_LLAMA = dict(TINY_LLAMA, hidden_size=2048, num_attention_heads=16, num_key_value_heads=16, head_dim=128)


def make_pool(device="cpu", max_blocks: int = 256, num_blocks: int = 32, model=None, tables: bool = True, **kw):
    """An ElasticKVPool of WIDE_LLAMA fp32 pages (64 KiB rows: 32 blocks a chunk) with BlockTables."""
    from kvpool.elastic import ElasticKVPool

    return ElasticKVPool.for_shard(model or WIDE_LLAMA, max_blocks, 8, 0, 1, device, num_blocks=num_blocks,
                                   max_seqs=16 if tables else None, **FP32, **kw)


def token_kv(seq: int, positions: torch.Tensor, heads: int, dim: int, device) -> torch.Tensor:
    """``[n, heads, dim]`` float32: the KV of token ``p`` of sequence ``seq`` is ``seq * 10_000 + p`` everywhere
    (exact in fp32), so any block read from the wrong place shows."""
    values = (seq * 10_000 + positions).to(torch.float32)
    return values.view(-1, 1, 1).expand(-1, heads, dim).to(device)


def write_new_tokens(pool, seqs) -> dict:
    """Write every uncomputed token of ``seqs`` (int ids) into every layer's K and V (``seq * 10_000 + position``
    everywhere, V negated: exact in fp32), mark them computed; return ``{seq: [values written]}``."""
    from kvpool.kernels.reference import write_kv_reference

    batch = pool.tables.batch(list(seqs))
    cache = pool.cache
    new = {s: s * 10_000 + torch.arange(pool.tables.num_computed(s), pool.tables.num_tokens(s)) for s in seqs}
    values = torch.cat([new[s] for s in seqs]).to(torch.float32)
    kv = values.view(-1, 1, 1).expand(-1, cache.kv_heads, cache.head_dim).to(cache.device)
    for layer in range(cache.num_layers):
        write_kv_reference(kv, -kv, cache.k_caches[layer], cache.v_caches[layer], batch.slot_mapping)
    pool.tables.mark_computed(batch)
    return {s: v.tolist() for s, v in new.items()}


def assert_seq_reads_back(pool, seq: int, expected=None) -> None:
    """The computed tokens of ``seq``, read through its block table, hold ``expected`` (one value per token;
    default what `write_new_tokens` wrote for ``seq`` alone), V negated; every block id below ``num_blocks``."""
    cache, n = pool.cache, pool.tables.num_computed(seq)
    blocks = pool.tables.blocks(seq)
    assert blocks.max() < pool.num_blocks, (blocks, pool.num_blocks)
    index = torch.as_tensor(blocks, dtype=torch.int64, device=cache.device)
    values = torch.as_tensor(expected if expected is not None else seq * 10_000 + torch.arange(n), dtype=torch.float32)
    want = values.to(cache.device).view(-1, 1)
    for layer in range(cache.num_layers):  # NHD pages: a sequence's tokens are its blocks' rows, in order
        k = cache.k_caches[layer][index].flatten(0, 1)[:n]
        v = cache.v_caches[layer][index].flatten(0, 1)[:n]
        assert torch.equal(k[:, :, 0], want.expand(n, cache.kv_heads)) and torch.equal(k.amin((1, 2)), k.amax((1, 2))) \
            and torch.equal(v, -k), f"sequence {seq}, layer {layer}"


class FailingMaps:
    """Stands in for a cache's ``_range``: its ``fail_at``-th ``map`` raises ``VirtualMemoryError`` (a device out of
    memory mid-grow); everything else goes to the real range."""

    def __init__(self, vrange, fail_at: int):
        self._range, self.fail_at, self.calls = vrange, fail_at, 0

    def map(self, offset, nbytes):
        from kvpool.errors import VirtualMemoryError

        self.calls += 1
        if self.calls == self.fail_at:
            raise VirtualMemoryError(f"map({offset}, {nbytes}): out of device memory (injected by the test)")
        return self._range.map(offset, nbytes)

    def __getattr__(self, name):
        return getattr(self._range, name)
