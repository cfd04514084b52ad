"""kvpool.demo with --tp 2: two gloo processes, half the KV heads each, identical block ids on both
ranks, greedy tokens equal to transformers' exactly (with prefix hits and preemption)."""
import pytest

from kvpool.demo.hf_reference import build_hf_model, hf_greedy
from kvpool.demo.launch import DemoOptions, run_demo
from kvpool.demo.model import (
    random_llama_weights,
    tiny_hybrid_config,
    tiny_llama_config,
)
from kvpool.demo.requests import make_workload
from kvpool.errors import ConfigError

SEED = 0
BYTES_PER_BLOCK_TP2 = 4 * 1 * (32 + 32) * 4 * 16  # layers x 1 KV head per rank x (K + V) x fp32 x block_size


def test_tp2_ranks_share_block_ids_and_match_transformers():
    config = tiny_llama_config()
    requests = make_workload(10, config["vocab_size"], seed=2, mean_gap=0.5)
    # 8 blocks per rank: small enough to force preemption, as in the tp=1 test
    opts = DemoOptions(tp=2, requests=requests, seed=SEED, kv_mib=8 * BYTES_PER_BLOCK_TP2 / 2**20,
                       progress=False, bad_requests=True)
    reports = run_demo(opts, timeout_s=120)
    r0, r1 = reports
    assert (r0.kv_head_ids, r1.kv_head_ids) == ([0], [1])  # each rank holds half the KV heads
    assert r0.num_blocks == r1.num_blocks == 8
    # one allocator decision: the block tables and slot mappings of every step are identical
    assert len(r0.summary.block_digests) > 10
    assert r0.summary.block_digests == r1.summary.block_digests
    assert r0.summary.preemptions > 0 and r0.summary.prefix_hit_rate > 0
    assert r0.summary.rejected == 3
    hf = build_hf_model(config, random_llama_weights(config, seed=SEED))
    for r in requests:
        out0 = r0.summary.results[r.req_id].output
        assert out0 == r1.summary.results[r.req_id].output
        assert out0 == hf_greedy(hf, r.prompt, r.max_new_tokens), f"request {r.req_id}"
    assert r0.num_free_blocks == r1.num_free_blocks == 8  # nothing leaked on either rank


def test_tp_that_does_not_split_the_heads_is_refused_before_spawning():
    opts = DemoOptions(tp=3, num_requests=1, progress=False)
    with pytest.raises(ConfigError, match="num_attention_heads=8 does not split over tp=3"):
        run_demo(opts, timeout_s=60)


def test_tp2_hybrid_ranks_share_every_groups_block_ids_and_match_transformers():
    config = tiny_hybrid_config()
    requests = make_workload(6, config["vocab_size"], seed=5, mean_gap=0.5, prefix_len=(32, 64),
                             suffix_len=(8, 32), new_tokens=(32, 64))
    # 24 blocks of 2 page slots x 1 KV head per rank x (K + V) x fp32 x 16 tokens: preemption happens
    opts = DemoOptions(tp=2, model="hybrid", requests=requests, seed=SEED, kv_mib=24 * 2 * 64 * 4 * 16 / 2**20,
                       progress=False)
    r0, r1 = run_demo(opts, timeout_s=120)
    assert r0.num_blocks == r1.num_blocks == 24
    # both groups' tables ([2, batch, max_blocks]) and slot mappings are digested every step
    assert r0.summary.block_digests == r1.summary.block_digests and r0.summary.preemptions > 0
    assert r0.summary.group_usage[0].max_seq_held == 3  # the windowed group's bound, on every rank alike
    hf = build_hf_model(config, random_llama_weights(config, seed=SEED))
    for r in requests:
        out0 = r0.summary.results[r.req_id].output
        assert out0 == r1.summary.results[r.req_id].output
        assert out0 == hf_greedy(hf, r.prompt, r.max_new_tokens), f"request {r.req_id}"
    assert r0.num_free_blocks == r1.num_free_blocks == 24
