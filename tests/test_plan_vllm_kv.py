"""vLLM's own KV figures (groups, padding layers, "GPU KV cache size", "Maximum concurrency") beside kvpool's.

Expected values are worked out by hand from vLLM 0.19's rules (vllm/v1/core/kv_cache_utils.py, cited in
`kvpool.plan.vllm_kv`), not read back from the code under test.
"""
import json

import pytest

from kvpool import cli
from kvpool.plan import plan_memory
from kvpool.plan.vllm_kv import vllm_kv_figures

GIB = 2**30


def _gemma3_27b_windows():
    # transformers' Gemma-3 pattern 6: layer i is global when (i + 1) % 6 == 0
    return [None if (i + 1) % 6 == 0 else 1024 for i in range(62)]


def test_one_attention_type_is_one_group_of_every_layer():
    f = vllm_kv_figures([None] * 32, page_bytes=16 * 2048, kv_bytes=10 * GIB, block_size=16,
                        max_model_len=131_072, max_batched_tokens=8192)
    assert (f.group_size, f.num_groups, f.padding_layers) == (32, 1, 0)
    assert f.num_blocks == 10 * GIB // (16 * 2048) // 32 == 10_240
    assert f.tokens == 10_240 * 16
    assert f.blocks_per_request == 131_072 // 16
    assert f.max_concurrency == pytest.approx(10_240 / 8192)
    assert not f.hybrid


def test_gemma3_27b_is_seven_groups_of_ten_with_eight_padding_layers():
    f = vllm_kv_figures(_gemma3_27b_windows(), page_bytes=16 * 8192, kv_bytes=40 * GIB, block_size=16,
                        max_model_len=131_072, max_batched_tokens=8192)
    # 10 full + 52 sliding: group size 10 (52 >= 1.5 x 10); sliding needs ceil(52 / 10) = 6 groups, 60 - 52 = 8 padding
    assert f.groups == ((1024, 6), (None, 1)) and f.group_size == 10 and f.padding_layers == 8
    assert f.num_blocks == 40 * GIB // (16 * 8192) // 10 == 32_768
    assert f.tokens == 32_768 // 7 * 16 == 74_896
    # per request: full 131072/16 = 8192 blocks; each sliding group ceil(min(1023 + 8192, 131072)/16) + 1 = 577
    assert f.blocks_per_request == 8192 + 6 * 577
    assert f.hybrid


def test_near_equal_types_pad_to_the_larger_count():
    # vLLM's own example (gpt-oss-20b + an EAGLE drafter): 12 sliding + 13 full -> two groups of 13, 1 padding
    windows = [128, None] * 12 + [None]
    f = vllm_kv_figures(windows, page_bytes=4096, kv_bytes=GIB, block_size=16, max_model_len=8192,
                        max_batched_tokens=2048)
    assert (f.group_size, f.num_groups, f.padding_layers) == (13, 2, 1)


def test_gpt_oss_alternating_layers_are_two_groups_without_padding():
    f = vllm_kv_figures([128, None] * 12, page_bytes=4096, kv_bytes=GIB, block_size=16, max_model_len=131_072,
                        max_batched_tokens=8192)
    assert (f.group_size, f.num_groups, f.padding_layers) == (12, 2, 0)
    assert f.blocks_per_request == 8192 + (-(-(127 + 8192) // 16) + 1)


def test_a_model_sliding_on_every_layer_is_one_window_capped_group():
    # Mistral-7B-v0.1: window 4096 everywhere; 32K context needs only ceil((4095 + 8192) / 16) + 1 = 769 blocks
    f = vllm_kv_figures([4096] * 32, page_bytes=16 * 2048, kv_bytes=GIB, block_size=16, max_model_len=32_768,
                        max_batched_tokens=8192)
    assert (f.num_groups, f.blocks_per_request) == (1, 769)


def test_the_plan_carries_vllms_figures_and_they_equal_kvpools_for_a_uniform_model():
    plan = plan_memory("llama-3.1-8b", tp=1)
    v, kv = plan.kv_cache.vllm, plan.kv_cache
    assert v.num_blocks == kv.num_blocks and v.tokens == kv.tokens  # one group: the same pool
    assert plan.to_dict()["kv_cache"]["vllm"]["tokens"] == kv.tokens


def test_vllms_page_has_no_per_token_fp8_scales():
    plan = plan_memory("llama-3.1-8b", tp=1, kv_dtype="fp8")  # kvpool's default: per-token scales in the pool
    kv = plan.kv_cache
    vllm_page = 32 * 8 * 128 * 2 * 16  # layers x KV heads x (K + V) x 1 B x block_size, scales outside
    assert kv.vllm.num_blocks == kv.kv_bytes_per_gpu // vllm_page > kv.num_blocks


def test_the_table_prints_vllms_tokens_and_padding(capsys):
    rc = cli.main(["plan", "gemma-2-27b"])
    out = capsys.readouterr().out
    plan = plan_memory("gemma-2-27b")
    assert rc == 0 and "vLLM: GPU KV cache size" in out and f"{plan.kv_cache.vllm.tokens:,} tokens" in out
    assert cli.main(["plan", "gemma-2-27b", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kv_cache"]["vllm"]["groups"] == [
        {"sliding_window": 4096, "groups": 1}, {"sliding_window": None, "groups": 1}]
