"""PagedKVCache: one allocation per shard, exact agreement with the planner, views, errors."""
import re

import pytest
import torch

from kvpool.cache import PagedKVCache
from kvpool.errors import InvalidArgumentError, KVPoolError
from kvpool.kernels.reference import gather_kv_reference, write_kv_reference
from kvpool.plan import kv_shard_layout, load_model_spec, plan_memory
from kvpool.plan.dtypes import DTYPES
from kvpool.plan.kv import serving_dtype

# An MQA-like model (one KV head), as a Hugging Face config dict built here.
MQA_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256,
    "num_attention_heads": 8, "num_key_value_heads": 1, "num_hidden_layers": 3, "intermediate_size": 512,
    "vocab_size": 1000, "torch_dtype": "float16", "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
}

CASES = [  # (model, tp, kv_dtype, fp8_scales, block_size)
    ("llama-3.1-8b", 1, "auto", "per_token_head", 16),   # GQA, 8 KV heads
    ("llama-3.1-8b", 2, "fp8", "per_token_head", 16),
    ("llama-3.1-8b", 4, "fp16", "per_token_head", 32),
    ("llama-3.1-8b", 8, "fp8", "per_head", 16),
    ("llama-3.1-70b", 16, "auto", "per_token_head", 16),  # tp > KV heads: replicated
    ("llama-2-7b", 1, "fp8", "per_token_head", 8),        # MHA, 32 KV heads
    ("llama-2-7b", 4, "auto", "per_token_head", 1),
    (MQA_CONFIG, 1, "auto", "per_token_head", 16),
    (MQA_CONFIG, 4, "fp8", "per_token_head", 2),
    ("deepseek-v3", 1, "auto", "per_token_head", 16),     # MLA latent
    ("deepseek-v3", 8, "fp8", "per_token_head", 64),
    ("deepseek-v3", 8, "fp8", "per_head", 16),
    ("gemma-2-9b", 2, "auto", "per_token_head", 16),      # fp32 checkpoint: "auto" serves bf16 everywhere
]


def _byte_ranges(cache):
    base = cache.buffer.data_ptr()
    out = []
    for t in cache.block_tensors():
        assert t.untyped_storage().data_ptr() == cache.buffer.untyped_storage().data_ptr()
        assert t.is_contiguous()
        start = t.data_ptr() - base
        assert start % t.element_size() == 0  # every view aligned for its dtype
        out.append((start, start + t.numel() * t.element_size()))
    return sorted(out)


@pytest.mark.parametrize("model,tp,kv_dtype,fp8_scales,block_size", CASES,
                         ids=lambda v: v["model_type"] if isinstance(v, dict) else str(v))
def test_memory_bytes_equals_planner(model, tp, kv_dtype, fp8_scales, block_size):
    num_blocks = 3
    plan = plan_memory(model, tp=tp, gpu_mem_gib=16384, kv_dtype=kv_dtype, fp8_scales=fp8_scales,
                       block_size=block_size).to_dict()["kv_cache"]
    layout = kv_shard_layout(load_model_spec(model), tp, kv_dtype, fp8_scales)
    spec = load_model_spec(model)
    for rank in sorted({0, tp - 1}):
        cache = PagedKVCache.for_shard(model, num_blocks, block_size, rank, tp, "cpu", kv_dtype=kv_dtype,
                                       fp8_scales=fp8_scales)
        assert cache.memory_bytes() == layout.pool_bytes_per_block(block_size) * num_blocks
        if layout.num_groups == 1:  # a hybrid pool's block is `slots` layer pages: test_cache_hybrid.py
            assert cache.memory_bytes() == plan["bytes_per_block_per_gpu"] * num_blocks
        # the views tile the one allocation exactly: no gap, no overlap
        ranges = _byte_ranges(cache)
        assert ranges[0][0] == 0 and ranges[-1][1] == cache.memory_bytes()
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        heads = layout.kv_heads
        assert cache.kv_heads == heads == len(cache.kv_head_ids) and cache.num_layers == spec.num_layers
        assert cache.k_caches[0].shape == (num_blocks, block_size, heads, layout.head_dim)
        if spec.is_mla:
            assert cache.kv_head_ids == [0] and all(v is None for v in cache.v_caches)
        else:
            assert cache.v_caches[0].shape == (num_blocks, block_size, heads, layout.v_head_dim)
        fp8 = layout.kv_dtype == "fp8"
        assert cache.kv_dtype == {"fp8": torch.float8_e4m3fn, "fp16": torch.float16, "bf16": torch.bfloat16,
                                  "fp32": torch.float32}[layout.kv_dtype]
        assert cache.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[serving_dtype(spec, None)]
        if fp8 and fp8_scales == "per_head":
            assert cache.k_scales[0].shape == (heads,) and torch.all(cache.k_scales[0] == 1.0)
        elif fp8:
            assert cache.k_scales[0].shape == (num_blocks, block_size, heads)
        else:
            assert cache.k_scales is None and cache.v_scales is None
        assert str(rank) in repr(cache)


def test_head_split_follows_tp():
    ids = [PagedKVCache.for_shard("llama-3.1-8b", 1, 16, r, 4, "cpu").kv_head_ids for r in range(4)]
    assert ids == [[0, 1], [2, 3], [4, 5], [6, 7]]
    ids = [PagedKVCache.for_shard("llama-3.1-70b", 1, 16, r, 16, "cpu").kv_head_ids for r in range(16)]
    assert ids == [[r // 2] for r in range(16)]  # each of the 8 heads replicated on two ranks


def test_layers_and_tensors_do_not_alias():
    cache = PagedKVCache.for_shard(MQA_CONFIG, 4, 8, 0, 1, "cpu", kv_dtype="fp32")
    for t in cache.block_tensors():
        assert torch.all(t == 0)
    cache.k_caches[1].fill_(1.0)
    assert torch.all(cache.k_caches[0] == 0) and torch.all(cache.v_caches[1] == 0)
    assert torch.all(cache.k_caches[2] == 0) and torch.all(cache.k_caches[1] == 1.0)
    assert cache.layer(1)[0] is cache.k_caches[1] and cache.layer(-1)[1] is cache.v_caches[2]
    with pytest.raises(InvalidArgumentError, match="layer 3"):
        cache.layer(3)


def test_hnd_layout_and_kernel_view():
    cache = PagedKVCache.for_shard(MQA_CONFIG, 4, 8, 0, 1, "cpu", layout="HND", kv_dtype="fp32",
                                   dtype=torch.float32)
    k, v, _, _ = cache.layer(0)
    assert k.shape == (4, 1, 8, 32) and cache.layout == "HND"
    key, value = torch.randn(3, 1, 32), torch.randn(3, 1, 32)
    write_kv_reference(key, value, k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3), torch.tensor([9, 10, 31]))
    torch.testing.assert_close(k[1, 0, 1], key[0, 0])
    torch.testing.assert_close(v[3, 0, 7], value[2, 0])
    torch.testing.assert_close(k[1, 0, 2], key[1, 0])


@pytest.mark.parametrize("fp8_scales", ["per_token_head", "per_head"])
def test_fp8_round_trip(fp8_scales):
    cache = PagedKVCache.for_shard("llama-3.1-8b", 4, 16, 0, 4, "cpu", kv_dtype="fp8", fp8_scales=fp8_scales)
    assert cache.dtype == torch.bfloat16
    k, v, ks, vs = cache.layer(5)
    if fp8_scales == "per_head":
        ks.fill_(0.02)
        vs.fill_(0.02)
    key = torch.randn(20, 2, 128, dtype=torch.bfloat16)
    value = torch.randn(20, 2, 128, dtype=torch.bfloat16)
    slots = torch.arange(20, dtype=torch.int32) + 16
    write_kv_reference(key, value, k, v, slots, ks, vs)
    gk, gv, _ = gather_kv_reference(k, v, torch.tensor([[1, 2]], dtype=torch.int32),
                                    torch.tensor([20], dtype=torch.int32), ks, vs, out_dtype=torch.float32)
    torch.testing.assert_close(gk, key.float(), atol=0.1, rtol=0.07)
    torch.testing.assert_close(gv, value.float(), atol=0.1, rtol=0.07)


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_blocks=0), "num_blocks=0"),
    (dict(num_blocks=2.5), "num_blocks=2.5"),
    (dict(block_size=12), "block_size=12 is not a power of two"),
    (dict(block_size=-16), "block_size=-16"),
    (dict(tp_rank=4), r"tp_rank=4 must be an int in \[0, 4\)"),
    (dict(tp_rank=-1), "tp_rank=-1"),
    (dict(tp_size=0), "tp_size=0"),
    (dict(tp_size=3, tp_rank=0), "tp_size=3 does not divide the 8 KV heads"),
    (dict(tp_size=12, tp_rank=0), "tp_size=12 exceeds the 8 KV heads"),
    (dict(kv_dtype="int4"), "kv_dtype='int4'"),
    (dict(dtype="fp8"), "dtype='fp8'"),
    (dict(dtype=torch.int8), "dtype=torch.int8"),
    (dict(layout="NDH"), "layout='NDH'"),
    (dict(fp8_scales="per_block", kv_dtype="fp8"), "fp8_scales='per_block'"),
])
def test_bad_arguments(kwargs, match):
    args = dict(spec="llama-3.1-8b", num_blocks=4, block_size=16, tp_rank=0, tp_size=4, device="cpu")
    args.update(kwargs)
    with pytest.raises(InvalidArgumentError, match=match):
        PagedKVCache.for_shard(**args)


def test_bad_model_name_is_a_kvpool_error():
    with pytest.raises(KVPoolError):
        PagedKVCache.for_shard("no-such-model-xyz", 4, 16, 0, 1, "cpu")


def test_dtype_overrides_auto_kv_dtype():
    cache = PagedKVCache.for_shard("llama-3.1-8b", 2, 16, 0, 8, "cpu", dtype="float32")
    assert cache.dtype == cache.kv_dtype == torch.float32
    plan = plan_memory("llama-3.1-8b", tp=8, gpu_mem_gib=1024, kv_dtype="fp32").to_dict()["kv_cache"]
    assert cache.memory_bytes() == 2 * plan["bytes_per_block_per_gpu"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_views_are_256_byte_aligned():
    cache = PagedKVCache.for_shard("llama-3.1-8b", 64, 16, 0, 2, "cuda", kv_dtype="fp8")
    assert cache.device.type == "cuda"
    assert all(t.data_ptr() % 256 == 0 for t in cache.block_tensors())


_SPELLINGS = sorted({s for d in DTYPES.values() for s in (d.name, *d.aliases)} | {"BF16", "torch.float16", "fp8_e5m2"})


@pytest.mark.parametrize("spelling", _SPELLINGS)
def test_the_cache_and_the_planner_read_one_dtype_table(spelling):
    # the cache once had its own alias table: kv_dtype="fp8_e5m2" planned as e4m3 but refused by the cache
    spec = load_model_spec("llama-3.1-8b")
    try:
        layout = kv_shard_layout(spec, 2, spelling)
    except InvalidArgumentError:
        with pytest.raises(InvalidArgumentError, match=re.escape(f"kv_dtype={spelling!r}")):
            PagedKVCache.for_shard(spec, 1, 16, 0, 2, "cpu", kv_dtype=spelling)
        return
    cache = PagedKVCache.for_shard(spec, 1, 16, 0, 2, "cpu", kv_dtype=spelling)
    assert cache.kv_dtype == getattr(torch, DTYPES[layout.kv_dtype].torch_name)
    assert cache.memory_bytes() == layout.bytes_per_block(16)
