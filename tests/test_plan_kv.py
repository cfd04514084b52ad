"""KVShardLayout contract (common.md) and head sharding."""
import pytest

from kvpool.errors import InvalidArgumentError, PlanError
from kvpool.plan import kv_shard_layout, load_model_spec, shard_kv_heads


def test_llama2_70b_tp4_is_81920_bytes_per_token():
    lay = kv_shard_layout(load_model_spec("llama-2-70b"), tp=4)
    assert (lay.num_layers, lay.kv_heads, lay.head_dim, lay.v_head_dim, lay.kv_dtype) == (80, 2, 128, 128, "fp16")
    assert lay.bytes_per_token == 80 * 2 * (128 + 128) * 2 == 81920
    assert lay.bytes_per_block(16) == 81920 * 16


def test_the_seed_bug_would_be_8x():
    spec = load_model_spec("llama-2-70b")
    seed = spec.num_layers * (spec.num_attention_heads // 4) * 2 * spec.head_dim * 2  # num_attention_heads as KV heads
    assert seed == 8 * kv_shard_layout(spec, tp=4).bytes_per_token


def test_fp8_adds_per_token_head_scales():
    spec = load_model_spec("llama-3.1-8b")
    lay = kv_shard_layout(spec, tp=2, kv_dtype="fp8")
    assert (lay.dtype_bytes, lay.scale_bytes, lay.kv_heads) == (1, 4, 4)
    assert lay.bytes_per_token == 32 * 4 * 256 * 1 + 32 * 4 * 2 * 4
    assert kv_shard_layout(spec, 2, "fp8", fp8_scales="per_head").bytes_per_token == 32 * 4 * 256


def test_mla_latent_is_one_replicated_head():
    spec = load_model_spec("deepseek-v3")
    for tp in (1, 8, 16):
        lay = kv_shard_layout(spec, tp=tp)
        assert (lay.kv_heads, lay.head_dim, lay.v_head_dim) == (1, 576, 0)
        assert lay.bytes_per_token == 61 * 576 * 2
    assert kv_shard_layout(spec, 8, "fp8").bytes_per_token == 61 * 576 + 61 * 4


def test_heads_replicate_when_tp_exceeds_kv_heads():
    spec = load_model_spec("qwen2.5-7b")  # 28 heads, 4 KV heads
    assert kv_shard_layout(spec, tp=4).kv_heads == 1
    spec8 = load_model_spec("llama-3.1-8b")  # 32 heads, 8 KV heads
    assert kv_shard_layout(spec8, tp=16).kv_heads == 1


def test_shard_kv_heads_contiguous_and_replicated():
    assert shard_kv_heads(8, 4, 1) == [2, 3]
    assert [shard_kv_heads(8, 1, 0)] == [list(range(8))]
    assert [shard_kv_heads(2, 8, r) for r in range(8)] == [[0], [0], [0], [0], [1], [1], [1], [1]]
    assert sorted({h for r in range(4) for h in shard_kv_heads(8, 4, r)}) == list(range(8))
    with pytest.raises(InvalidArgumentError):
        shard_kv_heads(8, 4, 4)
    with pytest.raises(InvalidArgumentError):
        shard_kv_heads(8, 3, 0)


@pytest.mark.parametrize("tp,match", [(3, "does not divide the 64 attention heads"), (0, "positive"),
                                      (48, "does not divide")])
def test_bad_tp(tp, match):
    with pytest.raises((PlanError, InvalidArgumentError), match=match):
        kv_shard_layout(load_model_spec("llama-2-70b"), tp=tp)


def test_tp_not_dividing_kv_heads():
    # 40 heads and 8 KV heads: tp=5 divides the heads but not the KV heads
    spec = load_model_spec("qwen2.5-14b")
    with pytest.raises(PlanError, match="KV heads"):
        kv_shard_layout(spec, tp=5)


@pytest.mark.parametrize("bs", [0, 3, 24, -16, 16.0])
def test_block_size_power_of_two(bs):
    with pytest.raises(InvalidArgumentError, match="power of two"):
        kv_shard_layout(load_model_spec("llama-2-7b")).bytes_per_block(bs)


def test_bad_kv_dtype():
    with pytest.raises(InvalidArgumentError, match="kv_dtype"):
        kv_shard_layout(load_model_spec("llama-2-7b"), kv_dtype="int4")
