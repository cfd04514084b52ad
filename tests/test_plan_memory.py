"""plan_memory: the seed's worked example, both budget modes, pipeline stages, errors."""
import json

import pytest

from kvpool.errors import InvalidArgumentError, PlanError
from kvpool.plan import TPKVCachePlanner, kv_shard_layout, load_model_spec, plan_memory
from kvpool.plan.hardware import GIB

SEED = dict(tp=4, gpu="a100-80gb", weights_gib=35, comm_gib=4, activation_gib=10, overhead_gib=3)


def test_seed_worked_example_numbers():
    plan = plan_memory("llama-2-70b", **SEED, batch=32, seq_len=4096)
    g, kv = plan.per_gpu, plan.kv_cache
    assert (g["total_gib"], g["budget_gib"], g["kv_cache_gib"]) == (80.0, 80.0, 28.0)
    assert kv["bytes_per_token_per_gpu"] == 81920
    assert kv["kv_bytes_per_gpu"] == 28 * GIB
    assert kv["tokens_unpaged"] == 367001  # 28 GiB / 81,920 B
    assert kv["num_blocks"] == 22937 and kv["tokens"] == 22937 * 16 == 366992
    assert plan.workload["tokens_per_request_unpaged"] == 11468  # per request at batch 32
    assert plan.workload["max_seq_len_at_batch"] == 11456  # whole blocks: 716 per request


def test_seed_planner_class():
    p = TPKVCachePlanner("llama-2-70b", tp=4)
    assert p.bytes_per_token_per_gpu == 81920 and p.bytes_per_token == 4 * 81920
    assert p.max_tokens(28) == 367001
    assert p.tokens_per_request(28, 32) == 11468
    ok = p.plan(32, 4096, 28)
    assert ok.fits and ok.max_batch == 89 and "fits" in ok.recommendation
    bad = p.plan(32, 16384, 28)
    assert not bad.fits and bad.required_gib == 40.0
    assert "tp=8" in bad.recommendation and "fp8 KV holds 43" in bad.recommendation
    assert "batch <= 22" in bad.recommendation and "seq_len <= 11,456" in bad.recommendation


@pytest.mark.parametrize("model,tp,kv_dtype", [("llama-3.1-70b", 4, "auto"), ("deepseek-v3", 8, "auto"),
                                               ("qwen2.5-7b", 4, "fp8"), ("gemma-2-27b", 2, "auto"),
                                               ("mixtral-8x7b", 2, "fp8")])
def test_block_bytes_match_the_cache_contract(model, tp, kv_dtype):
    plan = plan_memory(model, tp=tp, gpu="h200", kv_dtype=kv_dtype)
    lay = kv_shard_layout(load_model_spec(model), tp, plan.kv_cache["kv_dtype"])
    # the block PagedKVCache holds: every layer for one group; a hybrid model's group_size slots
    assert plan.kv_cache["bytes_per_block_per_gpu"] == lay.pool_bytes_per_block(16)
    groups = lay.num_groups
    assert (groups > 1) == (model == "gemma-2-27b")  # 23 local + 23 global layers: 2 groups of 23 slots
    assert plan.kv_cache["tokens"] == plan.kv_cache["num_blocks"] // groups * 16
    assert plan.kv_cache["num_blocks"] * lay.pool_bytes_per_block(16) <= plan.kv_cache["kv_bytes_per_gpu"]


def test_mem_fraction_semantics():
    plan = plan_memory("llama-3.1-8b", tp=1, gpu="h100-sxm", mem_fraction=0.8)
    g, d = plan.per_gpu, plan.details
    total = 81079 * (1 << 20)  # cudaMemGetInfo total measured on an H100 SXM
    assert g["budget_mode"] == "mem_fraction" and g["budget_gib"] == round(int(total * 0.8) / GIB, 4)
    terms = plan.stages[0]
    used = terms["weights_gib"] + terms["activation_gib"] + terms["comm_gib"] + terms["overhead_gib"]
    assert abs(g["kv_cache_gib"] - (g["budget_gib"] - used)) < 1e-3
    assert g["headroom_gib"] == round((total - int(total * 0.8)) / GIB, 4)
    # weights: 8.03B params in bf16
    assert abs(d["weights_total_gib"] - 8.03e9 * 2 / GIB) < 0.05


def test_json_has_the_contract_keys():
    d = plan_memory("llama-3.1-70b", tp=4, gpu="a100-80gb", batch=8, seq_len=8192).to_dict()
    assert set(d["parallel"]) >= {"tp", "pp", "gpus"}
    assert set(d["per_gpu"]) >= {"total_gib", "budget_gib", "weights_gib", "activation_gib", "comm_gib",
                                 "overhead_gib", "kv_cache_gib"}
    assert set(d["kv_cache"]) >= {"bytes_per_token_per_gpu", "block_size", "bytes_per_block_per_gpu", "num_blocks",
                                  "tokens", "max_concurrency"}
    assert d["workload"]["fits"] is True
    json.dumps(d)


def test_weights_shard_is_a_quarter_plus_replicated():
    spec = load_model_spec("llama-3.1-70b")
    p1 = plan_memory(spec, tp=2, gpu="h200")
    p4 = plan_memory(spec, tp=4, gpu="h200")
    total = p1.details["weights_total_gib"]
    rope = 131072 * 128 * 2 / 2**30  # vLLM's rotary cos/sin cache, replicated like the norms
    assert total / 4 <= p4.per_gpu["weights_gib"] < total / 4 + 3 / 4 * rope + 0.01


def test_quantized_weights_shrink():
    base = plan_memory("deepseek-v3", tp=8, gpu="h200").per_gpu["weights_gib"]
    # 671B fp8 with 128x128 block scales over 8 GPUs, embeddings/norms in bf16: ~80 GiB each
    assert 75 < base < 85


def test_pipeline_stages_and_tightest():
    plan = plan_memory("llama-3.1-405b", tp=8, pp=2, gpu="h100-sxm")
    assert plan.parallel["gpus"] == 16 and len(plan.stages) == 2
    assert [s["layers"] for s in plan.stages] == [[0, 63], [63, 126]]
    assert plan.num_blocks == min(s["num_blocks"] for s in plan.stages)
    # the pipeline's pynccl communicator exists before vLLM's snapshot (shown, not subtracted)
    assert any(c.get("name") == "PP pynccl" and c["before_snapshot"] for c in plan.details["nccl_communicators"])


def test_sliding_window_figures():
    plan = plan_memory("gemma-2-9b", tp=1, gpu="l40s", max_model_len=8192)
    kv = plan.kv_cache
    lay = kv_shard_layout(load_model_spec("gemma-2-9b"), 1, "bf16")
    assert kv["bytes_per_token_per_gpu"] == lay.bytes_per_token  # the single pool stores every layer in full
    per_layer = lay.bytes_per_token // 42
    assert kv["per_seq_bytes_per_gpu_window_aware"] == per_layer * (21 * 8192 + 21 * 4096)
    assert kv["max_concurrency_window_aware"] > kv["max_concurrency"]
    assert any("sliding window" in w for w in plan.warnings)


def test_workload_not_fitting_gets_numbers():
    plan = plan_memory("llama-3.1-70b", tp=2, gpu="h100-sxm", batch=32, seq_len=32768)
    w = plan.workload
    assert not w["fits"]
    text = " ".join(w["recommendations"])
    assert "tp=4" in text or "tp=8" in text
    assert "fp8 KV" in text and f"at most {w['max_batch_at_seq_len']:,}" in text
    huge = plan_memory("llama-3.1-70b", tp=2, gpu="h100-sxm", batch=512, seq_len=131072).workload
    assert any("even tp=" in r for r in huge["recommendations"])


def test_weights_that_do_not_fit_say_by_how_much_and_what_fits():
    with pytest.raises(PlanError, match=r"over by 59.45 GiB; tp=2 \(65.74 GiB of weights per GPU\) would fit"):
        plan_memory("llama-3.1-70b", tp=1, gpu="a100-80gb")


def test_no_room_for_kv():
    with pytest.raises(PlanError, match="no memory left for the KV cache"):
        plan_memory("llama-3.1-8b", gpu="l4", max_batched_tokens=65536, max_seqs=1024)


@pytest.mark.parametrize("kwargs,match", [
    (dict(pp=81), "pp=81 is larger than the 80 layers"),
    (dict(pp=0), "pp must be a positive"),
    (dict(gpu_mem_gib=0), "gpu_mem_gib must be > 0"),
    (dict(gpu_mem_gib=-80), "gpu_mem_gib must be > 0"),
    (dict(weights_gib=-1), "weights_gib must be >= 0"),
    (dict(mem_fraction=0), r"mem_fraction must be in \(0, 1\]"),
    (dict(mem_fraction=1.2), r"mem_fraction must be in \(0, 1\]"),
    (dict(block_size=24), "power of two"),
    (dict(tp=3), "does not divide the 64 attention heads"),
    (dict(gpu="a100-90gb"), "unknown GPU"),
    (dict(batch=4), "both batch and seq_len"),
    (dict(max_seqs=0), "max_seqs must be a positive"),
])
def test_bad_inputs(kwargs, match):
    args = dict(tp=4, gpu="a100-80gb") | kwargs
    with pytest.raises((PlanError, InvalidArgumentError), match=match):
        plan_memory("llama-2-70b", **args)
