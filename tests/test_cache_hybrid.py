"""PagedKVCache of hybrid models (#13 item 4): one page tensor per slot, shared by one layer of each group.

A block id is owned by one KV-cache group at a time (the one allocator hands it out), so layers of
different groups that share a slot never touch the same block; the same block id means the same bytes
in every group. Single-group models keep today's layout (one slot per layer) byte for byte.
"""
import pytest
import torch

from kvpool.cache import PagedKVCache
from kvpool.errors import InvalidArgumentError
from kvpool.kernels.reference import write_kv_reference
from kvpool.plan import kv_shard_layout, load_model_spec, plan_memory
from kvpool.plan.kv_groups import kv_groups

# A tiny Qwen3 whose layer_types alternate sliding (window 32) and full attention: 4 sliding : 3 full, so
# 2 groups of 4 slots (sliding 0, 2, 4, 6; full 1, 3, 5 and a padding slot).
HYBRID_CONFIG = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 64, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16, "num_hidden_layers": 7, "intermediate_size": 128,
    "vocab_size": 256, "torch_dtype": "float32", "max_position_embeddings": 1024, "rms_norm_eps": 1e-6,
    "sliding_window": 32, "use_sliding_window": True,
    "layer_types": ["sliding_attention", "full_attention"] * 3 + ["sliding_attention"],
}

CASES = [  # (model, tp, kv_dtype, fp8_scales, block_size, slots, groups)
    ("gemma-3-27b", 1, "auto", "per_token_head", 16, 10, 7),   # 62 layers: 6 local groups + 1 global, 8 padding
    ("gemma-3-27b", 2, "fp8", "per_token_head", 16, 10, 7),
    ("gemma-2-9b", 2, "fp8", "per_head", 32, 21, 2),           # alternating 21 : 21
    ("gpt-oss-20b", 1, "auto", "per_token_head", 16, 12, 2),   # alternating, window 128
    (HYBRID_CONFIG, 1, "fp8", "per_token_head", 8, 4, 2),      # 4 sliding : 3 full, one padding slot
]


def _ids(v):
    return v["model_type"] if isinstance(v, dict) else str(v)


@pytest.mark.parametrize("model,tp,kv_dtype,fp8_scales,block_size,slots,groups", CASES, ids=_ids)
def test_hybrid_pool_is_slots_pages_and_equals_the_plan(model, tp, kv_dtype, fp8_scales, block_size, slots, groups):
    num_blocks = 3
    spec = load_model_spec(model)
    layout = kv_shard_layout(spec, tp, kv_dtype, fp8_scales)
    plan = plan_memory(model, tp=tp, gpu_mem_gib=16384, kv_dtype=kv_dtype, fp8_scales=fp8_scales,
                       block_size=block_size).kv_cache
    cache = PagedKVCache.for_shard(model, num_blocks, block_size, 0, tp, "cpu", kv_dtype=kv_dtype,
                                   fp8_scales=fp8_scales)
    assert (layout.slots, layout.num_groups, cache.num_slots, len(cache.kv_groups.groups)) == (slots, groups) * 2
    assert cache.kv_groups == kv_groups(spec.layer_sliding_windows)
    per_block = slots * layout.bytes_per_layer_token * block_size  # one page of each slot, scales included
    assert cache.memory_bytes() == per_block * num_blocks == layout.pool_bytes_per_block(block_size) * num_blocks
    assert per_block < layout.bytes_per_block(block_size)  # not a page of every layer
    # the plan's hybrid pool (window freeing) is made of these blocks
    assert plan.window.num_blocks == plan.kv_bytes_per_gpu // per_block and plan.window.group_size == slots
    scaled = 2 if kv_dtype == "fp8" and fp8_scales == "per_token_head" else 0
    tensors = cache.block_tensors()
    assert len(tensors) == (2 + scaled) * slots and len({t.data_ptr() for t in tensors}) == len(tensors)
    spans = sorted((t.data_ptr() - cache.buffer.data_ptr(), t.numel() * t.element_size()) for t in tensors)
    assert spans[0][0] == 0 and sum(n for _, n in spans) == cache.memory_bytes()  # the slots tile the buffer
    assert all(a + n == b for (a, n), (b, _) in zip(spans, spans[1:]))
    assert cache.num_layers == spec.num_layers == len(cache.k_caches)
    assert cache.k_caches[0].shape == (num_blocks, block_size, layout.kv_heads, layout.head_dim)  # today's shapes


def test_gemma3_27b_bytes_per_block_worked_example():
    # docs/page_table.md's example: 16 KV heads x (128 + 128) x 2 B = 8,192 B per layer and token
    layout = kv_shard_layout(load_model_spec("gemma-3-27b"), 1, "auto")
    assert layout.bytes_per_layer_token == 8192 and layout.bytes_per_token == 62 * 8192
    assert layout.pool_bytes_per_block(16) == 10 * 8192 * 16 == 1_310_720
    assert layout.bytes_per_block(16) == 62 * 8192 * 16  # a block of every layer: 6.2x the pool's
    assert layout.kv_groups.padding_layers == 8 and layout.num_groups == 7


def test_each_layer_views_its_slot_and_knows_its_group():
    cache = PagedKVCache.for_shard("gemma-3-27b", 2, 16, 0, 1, "cpu")
    groups = cache.kv_groups
    for layer in range(62):
        g, slot = groups.slot_of(layer)
        k, v, ks, vs = cache.layer(layer)
        assert cache.group_of(layer) == g and ks is None and vs is None
        assert k is cache.block_tensors()[slot] and v is cache.block_tensors()[10 + slot]
    assert groups.windows[cache.group_of(5)] is None and groups.windows[cache.group_of(0)] == 1024
    assert cache.group_of(-1) == cache.group_of(61)
    for bad in (62, -63, 1.0, True):
        with pytest.raises(InvalidArgumentError, match="out of range for 62 layers"):
            cache.group_of(bad)


@pytest.mark.parametrize("kv_dtype", ["fp32", "fp8"])
def test_a_block_id_means_the_same_bytes_in_every_group(kv_dtype):
    cache = PagedKVCache.for_shard(HYBRID_CONFIG, 6, 8, 0, 1, "cpu", kv_dtype=kv_dtype, dtype=torch.float32)
    groups = cache.kv_groups  # sliding (0, 2, 4, 6) in slots 0..3; full (1, 3, 5) in slots 0..2; slot 3: padding
    assert groups.groups[0].layers == (0, 2, 4, 6) and groups.groups[1].layers == (1, 3, 5)
    writer, sharer = 2, 3  # group 0 slot 1, group 1 slot 1
    key, value = torch.randn(8, 2, 16), torch.randn(8, 2, 16)
    k, v, ks, vs = cache.layer(writer)
    write_kv_reference(key, value, k, v, torch.arange(8) + 4 * 8, ks, vs)  # block 4, owned by group 0
    k3, v3, ks3, vs3 = cache.layer(sharer)
    # the same block id in the other group is the same bytes (the group owning the block decides what they hold)
    assert torch.equal(k3[4].view(torch.uint8), k[4].view(torch.uint8)) and k3[4].float().abs().sum() > 0
    assert torch.equal(v3[4].view(torch.uint8), v[4].view(torch.uint8))
    if kv_dtype == "fp8":
        assert ks3 is ks and torch.equal(vs3[4], vs[4]) and not torch.all(vs3[4] == 1.0)
    # every other block of the sharing layer is untouched, and so is every other slot
    others = [b for b in range(6) if b != 4]
    assert torch.all(k3[others].float() == 0) and torch.all(v3[others].float() == 0)
    for layer in (0, 1, 4, 5, 6):
        assert all(torch.all(t.float() == 0) for t in cache.layer(layer)[:2])


def test_single_group_layout_is_unchanged():
    cache = PagedKVCache.for_shard("llama-3.1-8b", 2, 16, 0, 2, "cpu", kv_dtype="fp8")
    assert cache.num_slots == cache.num_layers == 32 and not cache.kv_groups.hybrid
    assert {cache.group_of(i) for i in range(32)} == {0}
    page, scales = 2 * 16 * 4 * 128, 2 * 16 * 4 * 4  # one K (or V) page tensor; one scale tensor
    base = cache.buffer.data_ptr()
    for i, (k, v, ks, vs) in enumerate(cache.layer(i) for i in range(32)):  # K0 V0 K1 V1 ..., Ks0 Vs0 Ks1 ...
        assert (k.data_ptr() - base, v.data_ptr() - base) == (2 * i * page, (2 * i + 1) * page)
        assert (ks.data_ptr() - base, vs.data_ptr() - base) == (64 * page + 2 * i * scales,
                                                                 64 * page + (2 * i + 1) * scales)
    assert cache.block_tensors() == [*cache.k_caches, *cache.v_caches, *cache.k_scales, *cache.v_scales]


def test_per_head_scales_stay_per_layer_in_a_hybrid_pool():
    cache = PagedKVCache.for_shard(HYBRID_CONFIG, 2, 8, 0, 1, "cpu", kv_dtype="fp8", fp8_scales="per_head")
    cache.k_scales[2].fill_(0.5)  # each layer keeps its own calibration though layers 2 and 3 share pages
    assert torch.all(cache.k_scales[3] == 1.0) and len(cache.block_tensors()) == 2 * 4
