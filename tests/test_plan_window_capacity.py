"""Capacity with window freeing: blocks a request holds per group, and the gain over one full table."""
import pytest

from kvpool.plan.kv_groups import kv_groups
from kvpool.plan.window_capacity import per_request_blocks, window_blocks, window_capacity


@pytest.mark.parametrize("window, tokens, blocks", [
    (None, 45, 3),      # 45 = (3 - 1) * 16 + 13
    (32, 100, 3),       # a query at 100 reads 69..99: blocks 4, 5, 6
    (32, 97, 3),        # reads 66..96: blocks 4, 5, 6
    (32, 96, 2),        # reads 65..95: blocks 4, 5
    (16, 32, 1),        # reads 17..31: block 1
    (4096, 100, 7),     # a window wider than the sequence: every block
    (1024, 32_768, 64),  # reads 31,745..32,767: blocks 1,984..2,047
    (32, 0, 0),
])
def test_blocks_a_group_holds(window, tokens, blocks):
    assert window_blocks(window, tokens, 16) == blocks


def test_gemma3_27b_like_pool_holds_over_four_and_a_half_times_the_requests():
    # 10 global + 52 local (window 1,024) layers, 32,768-token requests, bf16 pages of 16 tokens x 16 heads x 256
    groups = kv_groups([None if (i + 1) % 6 == 0 else 1024 for i in range(62)])
    page = 16 * 16 * 256 * 2 * 2
    cap = window_capacity(groups, page, kv_bytes=40 * 2**30, max_model_len=32_768, block_size=16)
    assert cap.blocks_per_request == 2048 + 6 * 64 == per_request_blocks(groups.windows, 32_768, 16)
    assert cap.num_blocks == 40 * 2**30 // (10 * page) and cap.num_blocks_full == 40 * 2**30 // (62 * page)
    # 62 layers x 2,048 blocks against 10 slots x 2,432 blocks: 5.2x (the physical ratio, about 5.1x)
    assert cap.gain == pytest.approx((62 * 2048) / (10 * 2432), rel=1e-3) and cap.gain >= 4.5


def test_a_model_without_windows_gains_nothing():
    cap = window_capacity(kv_groups([None] * 32), 4096, kv_bytes=2**30, max_model_len=8192, block_size=16)
    assert cap.gain == 1.0 and cap.num_blocks == cap.num_blocks_full


def test_the_plan_prints_window_freeing_for_hybrid_presets_only(capsys):
    from kvpool import cli
    from kvpool.plan import plan_memory

    for name in ("gemma-3-27b", "gemma-3-4b", "gpt-oss-20b", "gemma-2-9b"):
        plan = plan_memory(name, max_model_len=32_768)
        w = plan.kv_cache.window
        assert w is not None and w.gain > 1 and plan.to_dict()["kv_cache"]["window_freeing"]["gain"] == round(w.gain, 3)
        assert plan.kv_cache.max_concurrency_window_aware == w.max_concurrency
    assert plan_memory("gemma-3-27b", max_model_len=32_768).kv_cache.window.gain >= 4.5  # issue 13's bar
    assert plan_memory("llama-3.1-8b").kv_cache.window is None
    assert cli.main(["plan", "gemma-3-27b", "--max-model-len", "32768"]) == 0
    assert "with window freeing" in capsys.readouterr().out


def test_a_hybrid_plans_blocks_are_the_caches_and_a_workload_counts_every_group():
    from kvpool.plan import plan_memory
    from kvpool.plan.workload import fit

    plan = plan_memory("gemma-3-27b", max_model_len=32_768, batch=5, seq_len=32_768)
    kv = plan.kv_cache
    assert kv.num_groups == 7 and kv.bytes_per_block_per_gpu == 10 * 16 * 16 * 256 * 2  # 10 slots x 16 tokens
    assert kv.tokens == kv.num_blocks // 7 * 16
    assert kv.blocks_per_request(32_768) == 2048 + 6 * 64 and plan.workload.fit.blocks_per_seq == 2432
    assert plan.workload.fit.fits == (5 * 2432 <= kv.num_blocks)
    # the longest length 5 sequences reach: full group blocks + 6 x 65 window blocks within num_blocks // 5
    f = fit(kv.num_blocks, 16, 5, 32_768, kv.group_windows)
    assert f.blocks_per_seq <= kv.num_blocks // 5
    longest = f.max_seq_len
    assert kv.blocks_per_request(longest) <= kv.num_blocks // 5 < kv.blocks_per_request(longest + 1)
    # a full-length request fits with window freeing: no "does not fit" note although tokens < max_model_len
    assert kv.tokens < 32_768 and not any("does not fit" in w for w in plan.warnings)


def test_a_single_group_plan_is_unchanged_by_groups():
    from kvpool.plan import plan_memory

    kv = plan_memory("llama-3.1-8b").kv_cache
    assert kv.num_groups == 1 and kv.tokens == kv.num_blocks * 16
    assert kv.requests_fit(8192) == kv.num_blocks // 512
