"""`kvpool plan --host-kv-gib N` (#14 item 5): the host tier's blocks, tokens and bytes, in the plan and the CLI;
no trace of it (golden JSON unchanged) without the flag."""
import json

import pytest

from kvpool import PagedKVCache
from kvpool.cli import main
from kvpool.errors import InvalidArgumentError, PlanError
from kvpool.plan import plan_memory
from kvpool.plan.host_tier import host_tier_capacity


def test_llama_8b_host_tier_arithmetic():
    plan = plan_memory("llama-3.1-8b", tp=1, gpu="h100-sxm", host_kv_gib=64)
    h = plan.kv_cache.host_tier
    # 2,097,152 B per block = 32 layers x (K + V) x 16 tokens x 8 heads x 128 dims x 2 B; 64 GiB // that = 32,768
    assert (h.bytes_per_block, h.num_blocks, h.tokens, h.bytes) == (2097152, 32768, 32768 * 16, 64 << 30)
    d = plan.to_dict()["kv_cache"]["host_tier"]
    assert d == {"host_kv_bytes_per_gpu": 64 << 30, "bytes_per_block_per_gpu": 2097152, "num_blocks": 32768,
                 "tokens": 524288, "bytes_per_gpu": 64 << 30, "bytes_all_gpus": 64 << 30,
                 "tokens_vs_gpu_pool": round(524288 / plan.kv_cache.tokens, 2)}


def test_host_block_is_the_gpu_shards_block():
    """A host block holds exactly one block of the rank's cache (what HostPages allocates per block)."""
    plan = plan_memory("qwen3-32b", tp=4, kv_dtype="fp8", host_kv_gib=10.5)
    cache = PagedKVCache.for_shard("qwen3-32b", 2, 16, 0, 4, "cpu", kv_dtype="fp8")
    h = plan.kv_cache.host_tier
    assert h.bytes_per_block == cache.memory_bytes() // 2 == plan.kv_cache.bytes_per_block_per_gpu
    assert h.num_blocks == int(10.5 * 2**30) // h.bytes_per_block and h.gpus == 4
    assert plan.to_dict()["kv_cache"]["host_tier"]["bytes_all_gpus"] == 4 * h.num_blocks * h.bytes_per_block


def test_hybrid_and_pipeline_counts():
    plan = plan_memory("gemma-3-27b", tp=2, pp=2, host_kv_gib=100)
    h, kv = plan.kv_cache.host_tier, plan.kv_cache
    assert h.num_groups == kv.num_groups == 7 and h.tokens == h.num_blocks // 7 * 16  # counted like the GPU pool
    largest = max(st.layout.pool_bytes_per_block(16) for st in plan.per_stage)
    assert h.bytes_per_block == largest and h.gpus == 4


def test_absent_flag_leaves_the_plan_unchanged():
    plain = plan_memory("llama-3.1-8b").to_dict()
    with_tier = plan_memory("llama-3.1-8b", host_kv_gib=8).to_dict()
    assert "host_tier" not in plain["kv_cache"]
    del with_tier["kv_cache"]["host_tier"]
    assert with_tier == plain  # the GPU plan does not move


@pytest.mark.parametrize("value,error,fragment", [
    (0, InvalidArgumentError, "host_kv_gib must be > 0"), (-1, InvalidArgumentError, "host_kv_gib must be > 0"),
    (float("nan"), InvalidArgumentError, "number of GiB"), ("8", InvalidArgumentError, "number of GiB"),
    (0.001, PlanError, "holds no block of 2,097,152 bytes"),
])
def test_bad_budgets_refused(value, error, fragment):
    with pytest.raises(error, match=fragment):
        plan_memory("llama-3.1-8b", host_kv_gib=value)


def test_capacity_rounds_down():
    t = host_tier_capacity(5 * 1000 + 999, bytes_per_block=1000, block_size=8, num_groups=2, gpus=1)
    assert (t.num_blocks, t.tokens, t.bytes) == (5, 2 * 8, 5000)


def test_cli_table_and_json(capsys):
    assert main(["plan", "llama-3.1-8b", "--host-kv-gib", "64"]) == 0
    out = capsys.readouterr().out
    assert "host tier blocks" in out and "32,768" in out and "524,288" in out
    assert main(["plan", "llama-3.1-8b", "--host-kv-gib", "64", "--tp", "2", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["kv_cache"]["host_tier"]["num_blocks"] == 65536 and d["kv_cache"]["host_tier"]["bytes_all_gpus"] == 128 << 30
    assert main(["plan", "llama-3.1-8b"]) == 0
    assert "host tier" not in capsys.readouterr().out


def test_cli_bad_flag_is_one_line(capsys):
    assert main(["plan", "llama-3.1-8b", "--host-kv-gib", "0.0001"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds no block" in err[0]
