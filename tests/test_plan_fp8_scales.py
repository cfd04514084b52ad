"""fp8 scale layouts: kvpool's per-token-head default, vLLM's per-tensor figure, the cache allocates the plan
(issue 9 item 19)."""
import json

import pytest

from kvpool.cli import main
from kvpool.plan import kv_shard_layout, load_model_spec
from kvpool.plan.memory import plan_memory

LLAMA_70B = load_model_spec("llama-3.1-70b")


@pytest.mark.parametrize("fp8_scales,per_token,outside", [
    ("per_token_head", 42_240, 0),      # 40,960 + 80 layers x 2 heads x 2 tensors x 4 B in the pool
    ("per_head", 40_960, 1_280),        # 80 x 2 heads x 2 tensors x 4 B, outside the pool
    ("per_tensor", 40_960, 640),        # vLLM: one k_scale and one v_scale per layer
    ("none", 40_960, 0),
])
def test_llama_70b_tp4_fp8_bytes_per_token(fp8_scales, per_token, outside):
    layout = kv_shard_layout(LLAMA_70B, 4, "fp8", fp8_scales)
    assert layout.bytes_per_token == per_token
    assert layout.scale_bytes_outside_pool == outside
    assert layout.to_dict()["fp8_scales"] == fp8_scales and layout.to_dict()["scale_layout"]


def test_non_fp8_layout_has_no_scales():
    layout = kv_shard_layout(LLAMA_70B, 4, "bf16", "per_tensor")
    assert (layout.fp8_scales, layout.scale_bytes_outside_pool, layout.scale_layout()) == (None, 0, "")


def _cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def test_cli_reproduces_vllms_figure(capsys):
    out = _cli(capsys, "plan", "meta-llama/Llama-3.1-70B-Instruct", "--tensor-parallel-size", "4",
               "--kv-cache-dtype", "fp8", "--fp8-scales", "per_tensor", "--json")
    d = json.loads(out)
    assert d["kv_cache"]["bytes_per_token_per_gpu"] == 40_960
    assert d["details"]["layout"]["fp8_scales"] == "per_tensor"


@pytest.mark.parametrize("flags,row", [((), "fp8 scales 1,280 B/token float32 per token and head, in the pool"),
                                       (("--fp8-scales", "per_tensor"), "fp8 scales 0 B/token float32 per tensor (vLLM's layout), outside the pool: 80 × 2 × 4 B = 640 B in all")])
def test_kv_section_prints_the_scale_layout_and_bytes(capsys, monkeypatch, flags, row):
    monkeypatch.setenv("COLUMNS", "200")
    out = _cli(capsys, "plan", "llama-3.1-70b", "--tp", "4", "--kv-cache-dtype", "fp8", *flags)
    assert row in " ".join(out.split())


def test_memory_plan_with_per_tensor_has_more_blocks():
    default = plan_memory("llama-3.1-70b", 4, kv_dtype="fp8")
    vllm = plan_memory("llama-3.1-70b", 4, kv_dtype="fp8", fp8_scales="per_tensor")
    assert vllm.kv_cache["bytes_per_block_per_gpu"] == 40_960 * 16
    assert vllm.num_blocks > default.num_blocks


torch = pytest.importorskip("torch")


def test_cache_allocates_exactly_the_per_tensor_plan():
    from kvpool.cache import PagedKVCache

    cache = PagedKVCache.for_shard("llama-3.1-8b", 6, 16, 1, 4, "cpu", kv_dtype="fp8", fp8_scales="per_tensor")
    layout = kv_shard_layout(load_model_spec("llama-3.1-8b"), 4, "fp8", "per_tensor")
    assert cache.memory_bytes() == layout.bytes_per_block(16) * 6
    k_scale = cache.k_scales[3]
    assert k_scale.shape == (cache.kv_heads,) and k_scale.stride() == (0,) and k_scale.dtype == torch.float32
    outside = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in cache.k_scales + cache.v_scales}
    assert sum(outside.values()) == layout.scale_bytes_outside_pool  # one float32 per layer and tensor
    assert len(cache.block_tensors()) == 2 * cache.num_layers  # no scale tensor is indexed by block


def test_per_tensor_scale_round_trip():
    from kvpool.cache import PagedKVCache
    from kvpool.kernels import gather_kv, write_kv

    cache = PagedKVCache.for_shard("llama-3.1-8b", 4, 16, 0, 4, "cpu", kv_dtype="fp8", fp8_scales="per_tensor")
    k_cache, v_cache, k_scale, v_scale = cache.layer(0)
    k_scale[:1].fill_(0.5)
    v_scale[:1].fill_(0.25)
    assert k_scale.tolist() == [0.5] * cache.kv_heads
    torch.manual_seed(0)
    key = torch.randn(5, cache.kv_heads, cache.head_dim, dtype=torch.bfloat16)
    value = torch.randn(5, cache.kv_heads, cache.head_dim, dtype=torch.bfloat16)
    write_kv(key, value, k_cache, v_cache, torch.arange(16, 21, dtype=torch.int32), k_scale, v_scale)
    assert k_cache[1, :5].float().abs().max() > 2 * key.float().abs().max() * 0.9  # stored as key / 0.5
    k, v, _ = gather_kv(k_cache, v_cache, torch.tensor([[1]], dtype=torch.int32), torch.tensor([5], dtype=torch.int32),
                        k_scale, v_scale, out_dtype=torch.float32)
    torch.testing.assert_close(k, key.float(), rtol=0.07, atol=0.02)
    torch.testing.assert_close(v, value.float(), rtol=0.07, atol=0.02)
