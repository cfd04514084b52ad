"""Bandwidth of the memory-bound kernels against the copy ceiling and plain torch indexing.

Shape of the issue's target: batch 64 x 4096 tokens, 8 KV heads, head_dim 128, block size 16, bf16
(fp8 with per-token scales as a second row). GB/s count bytes read + written, like the ceiling.

    python -m pytest benchmarks/bench_memory.py --benchmark-json=out.json
"""
import pytest
import torch
from kernel_bench_util import HAS_CUDA, median_ms

from kvpool.kernels import copy_blocks, gather_kv, write_kv

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="GPU benchmark: needs a CUDA device")]

BATCH, CONTEXT, KV_HEADS, HEAD_DIM, BLOCK = 64, 4096, 8, 128, 16
FP8 = torch.float8_e4m3fn


def _pool(kv_dtype, num_blocks):
    gen = torch.Generator(device="cuda").manual_seed(0)
    shape = (num_blocks, BLOCK, KV_HEADS, HEAD_DIM)
    k = torch.randn(shape, device="cuda", generator=gen).to(kv_dtype)
    v = torch.randn(shape, device="cuda", generator=gen).to(kv_dtype)
    if kv_dtype != FP8:
        return k, v, None, None
    ks = torch.rand(shape[:3], device="cuda", generator=gen) * 0.01
    vs = torch.rand(shape[:3], device="cuda", generator=gen) * 0.01
    return k, v, ks, vs


def _row(kind, name, ms, nbytes, ceiling, baseline_ms=None, **extra):
    gbps = nbytes / (ms * 1e-3) / 1e9
    row = {"kind": kind, "name": name, "ms": ms, "gbps": gbps, "pct_ceiling": 100 * gbps / ceiling[0], **extra}
    if baseline_ms is not None:
        row.update(baseline="torch indexing", baseline_ms=baseline_ms, speedup=baseline_ms / ms)
    return row


def test_copy_ceiling(record, copy_ceiling_gbps):
    gbps, ms = copy_ceiling_gbps
    src = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    record({"kind": "ceiling", "name": "d2d copy_ 1 GiB (read+write)", "ms": ms, "gbps": gbps,
            "pct_ceiling": 100.0}, lambda: dst.copy_(src))


@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, FP8], ids=["bf16", "fp8-token"])
def test_gather_kv(record, copy_ceiling_gbps, kv_dtype):
    blocks_per_seq = CONTEXT // BLOCK
    num_blocks = BATCH * blocks_per_seq
    k_cache, v_cache, ks, vs = _pool(kv_dtype, num_blocks)
    table = torch.randperm(num_blocks, device="cuda").to(torch.int32).view(BATCH, blocks_per_seq)
    lens = torch.full((BATCH,), CONTEXT, dtype=torch.int32, device="cuda")
    tokens = BATCH * CONTEXT
    out = (torch.empty(tokens, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda"),
           torch.empty(tokens, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda"))

    def ours():
        gather_kv(k_cache, v_cache, table, lens, ks, vs, out=out)

    if kv_dtype == FP8:
        def torch_indexing():
            long_table = table.long()
            for cache, scale in ((k_cache, ks), (v_cache, vs)):
                (cache[long_table].float() * scale[long_table][..., None]).to(torch.bfloat16)
    else:
        def torch_indexing():
            long_table = table.long()
            k_cache[long_table].view(tokens, KV_HEADS, HEAD_DIM)
            v_cache[long_table].view(tokens, KV_HEADS, HEAD_DIM)

    ours()
    k_ref = k_cache[table[3].long()].view(-1, KV_HEADS, HEAD_DIM)
    if kv_dtype == FP8:
        k_ref = (k_ref.float() * ks[table[3].long()].view(-1, KV_HEADS, 1)).to(torch.bfloat16)
    assert torch.equal(out[0][3 * CONTEXT:4 * CONTEXT], k_ref), "gather_kv result differs from torch indexing"
    elems = 2 * tokens * KV_HEADS * HEAD_DIM
    nbytes = elems * (k_cache.element_size() + 2) + (2 * tokens * KV_HEADS * 4 if ks is not None else 0)
    ms, base_ms = median_ms(ours), median_ms(torch_indexing)
    record(_row("gather_kv", f"gather_kv {BATCH}x{CONTEXT} {KV_HEADS}h d{HEAD_DIM} {kv_dtype}".replace("torch.", ""),
                ms, nbytes, copy_ceiling_gbps, base_ms, target_pct=85.0), ours)


@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, FP8], ids=["bf16", "fp8-token"])
def test_write_kv(record, copy_ceiling_gbps, kv_dtype):
    tokens = BATCH * CONTEXT
    num_blocks = tokens // BLOCK
    k_cache, v_cache, ks, vs = _pool(kv_dtype, num_blocks)
    key = torch.randn(tokens, KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    value = torch.randn_like(key)
    slots = torch.randperm(tokens, device="cuda").to(torch.int32)
    slots_long = slots.long()

    def ours():
        write_kv(key, value, k_cache, v_cache, slots, ks, vs)

    if kv_dtype == FP8:
        def torch_indexing():
            for new, cache, scale in ((key, k_cache, ks), (value, v_cache, vs)):
                s = new.float().abs().amax(-1) / 448.0
                q = (new.float() / s.clamp_min(1e-30)[..., None]).clamp(-448, 448).to(FP8)
                # index_copy_ has no fp8 kernel: move the bytes
                cache.view(torch.uint8).view(-1, KV_HEADS, HEAD_DIM).index_copy_(0, slots_long, q.view(torch.uint8))
                scale.view(-1, KV_HEADS).index_copy_(0, slots_long, s)
    else:
        def torch_indexing():
            k_cache.view(-1, KV_HEADS, HEAD_DIM).index_copy_(0, slots_long, key)
            v_cache.view(-1, KV_HEADS, HEAD_DIM).index_copy_(0, slots_long, value)

    ours()
    if kv_dtype != FP8:
        assert torch.equal(k_cache.view(-1, KV_HEADS, HEAD_DIM)[slots_long[:1000]], key[:1000])
    elems = 2 * tokens * KV_HEADS * HEAD_DIM
    # new K/V read, pages written, slots read (+ fp8 scales written)
    nbytes = elems * (2 + k_cache.element_size()) + tokens * 4 + (2 * tokens * KV_HEADS * 4 if ks is not None else 0)
    ms, base_ms = median_ms(ours), median_ms(torch_indexing)
    record(_row("write_kv", f"write_kv {tokens} tokens {KV_HEADS}h d{HEAD_DIM} {kv_dtype}".replace("torch.", ""),
                ms, nbytes, copy_ceiling_gbps, base_ms, target_pct=85.0), ours)


def test_copy_blocks(record, copy_ceiling_gbps):
    """Copy-on-write of 512 blocks in 32 layers (K and V: 64 tensors, views of one allocation), one launch."""
    layers, num_blocks, pairs = 32, 4096, 512
    page = num_blocks * BLOCK * KV_HEADS * HEAD_DIM
    buf = torch.randn(2 * layers * page, device="cuda").to(torch.bfloat16)
    caches = [buf[i * page:(i + 1) * page].view(num_blocks, BLOCK, KV_HEADS, HEAD_DIM) for i in range(2 * layers)]
    perm = torch.randperm(num_blocks, device="cuda").to(torch.int32)
    src, dst = perm[:pairs], perm[pairs:2 * pairs]
    src_long, dst_long = src.long(), dst.long()

    def ours():
        copy_blocks(caches, src, dst)

    def torch_indexing():
        for t in caches:
            t[dst_long] = t[src_long]

    ours()
    assert torch.equal(caches[5][dst_long], caches[5][src_long])
    nbytes = 2 * 2 * layers * pairs * BLOCK * KV_HEADS * HEAD_DIM * 2
    ms, base_ms = median_ms(ours), median_ms(torch_indexing)
    record(_row("copy_blocks", f"copy_blocks {pairs} blocks x {2 * layers} tensors bf16", ms, nbytes,
                copy_ceiling_gbps, base_ms), ours)
