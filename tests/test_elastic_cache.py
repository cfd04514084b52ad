"""ElasticKVCache (#16): PagedKVCache's views, each block tensor in its own region of one virtual range.

Host backend (mmap) here; the same tests run on the CUDA backend when a GPU is present.
"""
import pytest
import torch
from elastic_util import DEVICES, FP32, TINY_LLAMA, WIDE_LLAMA

from kvpool.cache import PagedKVCache
from kvpool.elastic import ElasticKVCache
from kvpool.elastic.regions import RegionLayout, round_up
from kvpool.errors import InvalidArgumentError, KVPoolError
from kvpool.kernels.reference import gather_kv_reference, write_kv_reference

MiB = 2**20
CASES = [  # (model, tp, kv_dtype, fp8_scales): one per kind of view the static cache has
    ("llama-3.1-8b", 8, "auto", "per_token_head"),
    ("llama-3.1-8b", 2, "fp8", "per_token_head"),    # per-token scales inside the pool
    ("llama-3.1-8b", 2, "fp8", "per_head"),          # scales outside it
    ("deepseek-v2-lite", 1, "auto", "per_token_head"),  # MLA: one latent, no V
    ("gemma-2-9b", 2, "fp8", "per_token_head"),      # hybrid: slots shared by two groups
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("model,tp,kv_dtype,fp8_scales", CASES, ids=lambda v: str(v))
def test_views_are_the_static_caches_over_regions(device, model, tp, kv_dtype, fp8_scales):
    static = PagedKVCache.for_shard(model, 40, 16, 0, tp, device, kv_dtype=kv_dtype, fp8_scales=fp8_scales)
    cache = ElasticKVCache.for_shard(model, 40, 16, 0, tp, device, kv_dtype=kv_dtype, fp8_scales=fp8_scales,
                                     num_blocks=3)
    for a, b in zip(static.block_tensors(), cache.block_tensors(), strict=True):
        assert (a.shape, a.stride(), a.dtype) == (b.shape, b.stride(), b.dtype)  # max_num_blocks rows
    for name in ("k_caches", "v_caches", "k_scales", "v_scales"):
        ours, theirs = getattr(cache, name), getattr(static, name)
        assert (ours is None) == (theirs is None)
        for a, b in zip(ours or [], theirs or [], strict=True):
            assert (a is None and b is None) or (a.shape, a.dtype) == (b.shape, b.dtype)
    assert (cache.kv_head_ids, cache.kv_groups, cache.num_layers) == (static.kv_head_ids, static.kv_groups,
                                                                     static.num_layers)
    assert [cache.group_of(i) for i in range(cache.num_layers)] == [static.group_of(i) for i in
                                                                    range(static.num_layers)]
    # each block tensor starts its own region, in carving order (K_0, V_0, K_1, ..., then the scales)
    tensors = sorted(cache.block_tensors(), key=lambda t: t.data_ptr())
    base = tensors[0].data_ptr()
    for t, region in zip(tensors, cache.regions.regions, strict=True):
        assert t.data_ptr() - base == region.offset and region.offset % cache.regions.granularity == 0
        assert region.row_bytes * 40 == t.numel() * t.element_size()
    assert cache.regions.bytes_per_block * 40 == static.memory_bytes()
    assert cache.memory_bytes() == static.memory_bytes() // 40 * 3
    assert cache.mapped_bytes == cache.regions.mapped_bytes(3) == len(cache.regions.regions) * cache.regions.granularity
    # new rows read as a new static cache: zero pages, per-token scales 1.0
    for a, b in zip(static.block_tensors(), cache.block_tensors()):
        assert torch.equal(a[:3], b[:3])


@pytest.mark.parametrize("device", DEVICES)
def test_addresses_never_move_and_contents_survive_growth(device):
    cache = ElasticKVCache.for_shard(WIDE_LLAMA, 256, 8, 0, 1, device, num_blocks=10, **FP32)
    ptrs = [t.data_ptr() for t in cache.block_tensors()]
    assert cache.regions.blocks_per_chunk(0) == 32
    for i, t in enumerate(cache.block_tensors()):
        t[:10] = torch.arange(10, device=device).view(10, 1, 1, 1) + 100 * i
    cache.resize(200)
    assert cache.mapped_bytes == 4 * round_up(200 * 65536, 2 * MiB) == cache.regions.mapped_bytes(200)
    for i, t in enumerate(cache.block_tensors()):
        assert torch.equal(t[:10, 0, 0, 0].cpu(), torch.arange(10) + 100 * i)  # kept
        assert not t[10:200].any()  # new rows are zero
        t[150:200] = 7
    cache.resize(40)  # chunks above row 40 go; rows below stay
    assert cache.mapped_bytes == cache.regions.mapped_bytes(40) == 4 * 2 * 2 * MiB
    cache.resize(200)  # mapped again: the rows read as new, not as they were
    for i, t in enumerate(cache.block_tensors()):
        assert torch.equal(t[:10, 0, 0, 0].cpu(), torch.arange(10) + 100 * i) and not t[40:200].any()
    assert [t.data_ptr() for t in cache.block_tensors()] == ptrs


@pytest.mark.parametrize("device", DEVICES)
def test_release_and_remap_keep_addresses_and_drop_contents(device):
    cache = ElasticKVCache.for_shard("llama-3.1-8b", 64, 16, 0, 2, device, kv_dtype="fp8", num_blocks=5)
    ptrs = [t.data_ptr() for t in cache.block_tensors()]
    mapped = cache.mapped_bytes
    for t in cache.block_tensors():
        t[:5].view(torch.uint8).fill_(3)
    cache.release()
    assert (cache.mapped_bytes, cache.asleep, cache.num_blocks) == (0, True, 5)
    with pytest.raises(InvalidArgumentError, match="asleep"):
        cache.resize(6)
    with pytest.raises(InvalidArgumentError, match="asleep"):
        cache.release()
    cache.remap()
    assert (cache.mapped_bytes, cache.asleep) == (mapped, False)
    assert [t.data_ptr() for t in cache.block_tensors()] == ptrs
    fresh = PagedKVCache.for_shard("llama-3.1-8b", 64, 16, 0, 2, device, kv_dtype="fp8")
    for a, b in zip(fresh.block_tensors(), cache.block_tensors()):
        assert torch.equal(a[:5].view(torch.uint8), b[:5].view(torch.uint8))  # as new: zeros, scales 1.0
    with pytest.raises(InvalidArgumentError, match="not asleep"):
        cache.remap()


@pytest.mark.parametrize("device", DEVICES)
def test_kernels_read_and_write_elastic_pages_like_static_ones(device):
    torch.manual_seed(0)
    cache = ElasticKVCache.for_shard(TINY_LLAMA, 32, 8, 0, 1, device, num_blocks=6, **FP32)
    static = PagedKVCache.for_shard(TINY_LLAMA, 32, 8, 0, 1, device, **FP32)
    key, value = torch.randn(2, 40, 2, 16, device=device).unbind(0)
    slots = torch.randperm(48, device=device)[:40]
    table = torch.tensor([[5, 0, 3], [1, 2, 4]], dtype=torch.int32, device=device)
    lens = torch.tensor([20, 24], dtype=torch.int32, device=device)
    for c in (cache, static):
        write_kv_reference(key, value, c.k_caches[1], c.v_caches[1], slots)
    got = gather_kv_reference(cache.k_caches[1], cache.v_caches[1], table, lens)
    want = gather_kv_reference(static.k_caches[1], static.v_caches[1], table, lens)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [-1, 33, 2.0, True, "4"])
def test_bad_sizes_are_refused_and_change_nothing(device, bad):
    cache = ElasticKVCache.for_shard(TINY_LLAMA, 32, 8, 0, 1, device, num_blocks=4)
    with pytest.raises(InvalidArgumentError, match=r"num_blocks=.* must be an int in \[0, 32\]"):
        cache.resize(bad)
    assert (cache.num_blocks, cache.mapped_bytes) == (4, cache.regions.mapped_bytes(4))
    with pytest.raises(InvalidArgumentError, match=r"num_blocks=.* must be an int in \[0, 32\]"):
        ElasticKVCache.for_shard(TINY_LLAMA, 32, 8, 0, 1, device, num_blocks=bad)


def test_an_elastic_cache_has_no_single_buffer():
    cache = ElasticKVCache.for_shard(TINY_LLAMA, 8, 8, 0, 1, "cpu")
    with pytest.raises(KVPoolError, match="no single buffer"):
        cache.buffer
    assert cache.num_blocks == 0 and cache.mapped_bytes == 0 and "of max 8 blocks" in repr(cache)


def test_region_arithmetic_of_the_docs():
    # Llama-3.1-8B bf16, 16-token blocks: a tensor's row is 16 x kv_heads x 128 x 2 B
    for tp, row, per_chunk in ((1, 32768, 64), (8, 4096, 512)):
        layout = RegionLayout.of([row] * 64, max_num_blocks=50_000, granularity=2 * MiB)
        assert layout.blocks_per_chunk(0) == per_chunk
        assert layout.mapped_bytes(1) == 64 * 2 * MiB  # the smallest pool maps one chunk per tensor
        assert layout.mapped_bytes(per_chunk) == 64 * 2 * MiB and layout.mapped_bytes(per_chunk + 1) == 128 * 2 * MiB
        assert layout.changes(per_chunk, 3 * per_chunk) == [(r.offset + 2 * MiB, 4 * MiB) for r in layout.regions]
        assert layout.max_blocks_within(per_chunk, 64 * 2 * MiB - 1, 50_000) == per_chunk
        assert layout.max_blocks_within(per_chunk, 64 * 2 * MiB, 50_000) == 2 * per_chunk
