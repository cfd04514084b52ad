"""The typed, byte-exact plan and its one home per rule (issue 11, items 1, 2 and 4).

Each test failed on the dict-and-GiB planner it replaces: attribute access, bytes that were rebuilt from
GiB rounded to 4 decimals, dtype spellings one module took and another refused, the TP rule written twice.
"""
import ast
import json
from dataclasses import replace
from pathlib import Path

import pytest

from kvpool.cli import main
from kvpool.errors import InvalidArgumentError, PlanError
from kvpool.plan import NCCLSettings, TPKVCachePlanner, load_model_spec, plan_memory, shard_kv_heads
from kvpool.plan.diagnose import NON_TORCH_SLACK_BYTES, diagnose, parse_snapshots
from kvpool.plan.dtypes import dtype_bytes, resolve_kv_dtype, serving_dtype, torch_dtype_name
from kvpool.plan.memory import make_request, plan_request
from kvpool.plan.parallel import check_kv_head_split, larger_tps
from kvpool.plan.scaling import step_model
from kvpool.plan.units import GIB
from kvpool.plan.weights import shard_weight_bytes

PLAN_DIR = Path(__file__).resolve().parents[1] / "src" / "kvpool" / "plan"


def test_kv_cache_reads_as_attributes_and_as_the_json_mapping():
    plan = plan_memory("llama-3.1-70b", tp=4, gpu="a100-80gb")
    kv = plan.kv_cache
    assert kv.bytes_per_block_per_gpu == kv["bytes_per_block_per_gpu"] == 1_310_720
    assert kv.num_blocks == kv["num_blocks"] == plan.num_blocks and kv.tokens == kv["tokens"]
    assert dict(kv) == plan.to_dict()["kv_cache"] and "max_concurrency" in kv
    assert kv["max_concurrency"] == round(kv.max_concurrency, 2)  # the JSON rounds, the attribute is exact


def test_terms_are_the_planners_exact_bytes():
    spec = load_model_spec("llama-3.1-70b")
    plan = plan_memory(spec, tp=4, gpu="a100-80gb")
    weights = plan.term("weights")
    assert weights.bytes == weights.computed == shard_weight_bytes(spec, 4, "bf16")["total"]
    assert weights.bytes != round(plan.per_gpu["weights_gib"] * GIB)  # what readers rebuilt: off by kilobytes
    assert plan.tight.kv_bytes == plan.budget_bytes - sum(t.bytes for t in plan.tight.terms)
    assert plan.budget_bytes + plan.headroom_bytes == plan.total_bytes == 80 * GIB
    assert "1/4 of 131.45 GiB (bf16) + replicated norms, rope cache 0.03" == weights.how


def test_a_given_reservation_keeps_the_computed_figure_beside_it():
    plan = plan_memory("llama-2-70b", tp=4, gpu="a100-80gb", weights_gib=35)
    weights = plan.term("weights")
    assert weights.given and weights.bytes == 35 * GIB and weights.computed == shard_weight_bytes(
        plan.request.spec, 4, "fp16")["total"]
    assert plan.details["overridden"] == ["weights_gib"]


def test_a_variant_is_a_replaced_request_not_arguments_found_by_name():
    request = make_request("llama-3.1-70b", 4, gpu="a100-80gb", max_seqs=64)
    variant = plan_request(replace(request, tp=8))
    assert variant.to_dict() == plan_memory("llama-3.1-70b", 8, gpu="a100-80gb", max_seqs=64).to_dict()


def test_scaling_reads_the_weights_bytes_not_rounded_gib():
    spec = load_model_spec("mixtral-8x7b")
    plan = plan_memory(spec, tp=2, gpu="h100-sxm")
    gpu, link = plan.request.gpu, plan.request.link
    step = step_model(spec, plan, gpu, link, batch=1, context=1)
    weights = plan.term("weights")
    touched = 1 - (1 - 2 / 8)  # one token routes to 2 of 8 experts
    read = weights.bytes - weights.parts["experts"] * (1 - touched) + plan.kv_cache.bytes_per_token_per_gpu
    assert step["memory_s"] == pytest.approx(read / (gpu.hbm_gbps * 1e9), rel=1e-12)


def test_diagnose_compares_with_the_plans_bytes():
    plan = plan_memory("llama-3.1-70b", tp=4, gpu="a100-80gb")
    limit = plan.term("comm").bytes + plan.term("overhead").bytes + plan.before_snapshot.bytes + NON_TORCH_SLACK_BYTES
    reserved = 60 * GIB

    def non_torch_warned(non_torch):
        snap = {"rank": 0, "total": 80 * GIB, "used": reserved + non_torch, "allocated": reserved, "reserved": reserved}
        return any("outside torch" in f.title for f in diagnose(parse_snapshots(json.dumps([snap])), plan))

    assert not non_torch_warned(limit) and non_torch_warned(limit + 1)


@pytest.mark.parametrize("spelling,name", [("auto", "bf16"), ("bfloat16", "bf16"), ("torch.bfloat16", "bf16"),
                                           ("HALF", "fp16"), ("float", "fp32"), ("fp8_e4m3", "fp8"),
                                           ("float8_e4m3fn", "fp8")])
def test_one_dtype_table_for_every_spelling(spelling, name):
    assert resolve_kv_dtype(spelling, "bf16") == name
    assert plan_memory("llama-3.1-8b", kv_dtype=spelling).kv_cache.kv_dtype == name


def test_fp8_is_e4m3_and_e5m2_is_refused_not_stored_as_e4m3():
    assert (dtype_bytes("fp8"), torch_dtype_name("fp8"), torch_dtype_name("bfloat16")) == (1, "float8_e4m3fn", "bfloat16")
    with pytest.raises(InvalidArgumentError, match=r"kv_dtype must be one of .*fp8 \(e4m3\), got 'fp8_e5m2'"):
        plan_memory("llama-3.1-8b", kv_dtype="fp8_e5m2")
    with pytest.raises(InvalidArgumentError, match="dtype must be one of auto, fp32, fp16, bf16, got 'fp8'"):
        serving_dtype("bf16", "fp8")


def test_the_kv_head_rule_is_one_function_whatever_the_caller():
    with pytest.raises(PlanError, match="tp=12 exceeds the 8 KV heads of m but is not a multiple"):
        check_kv_head_split(8, 12, model="m")
    with pytest.raises(InvalidArgumentError, match="tp_size=3 does not divide the 8 KV heads"):
        check_kv_head_split(8, 3, tp_name="tp_size", error=InvalidArgumentError)
    with pytest.raises(InvalidArgumentError, match="tp=12 exceeds the 8 KV heads"):
        shard_kv_heads(8, 12, 0)  # handed out head 0 before: a split the planner refuses


def test_larger_tp_degrees_are_those_the_model_can_use():
    assert larger_tps(load_model_spec("qwen2.5-7b"), 1) == [2, 4]  # 28 heads: 8 does not divide them
    assert larger_tps(load_model_spec("llama-3.1-70b"), 4) == [8, 16, 32, 64]


def test_the_workload_check_and_the_seed_planner_share_one_fit():
    plan = plan_memory("llama-2-70b", tp=4, gpu="a100-80gb", weights_gib=35, comm_gib=4, activation_gib=10,
                       overhead_gib=3, batch=32, seq_len=16384)
    seed = TPKVCachePlanner("llama-2-70b", tp=4).plan(32, 16384, 28)
    fit = plan.workload.fit
    assert (fit.fits, fit.max_batch, fit.max_seq_len) == (seed.fits, seed.max_batch, seed.max_seq_len) == (
        False, 22, 11456)
    assert "tp=8" in seed.recommendation and plan.workload.larger_tp.tp == 8


def test_comm_row_names_the_nccl_protocols_in_use(capsys, monkeypatch):
    # NCCL 2.27 allocates every connection for LL, LL128 and Simple whatever NCCL_PROTO says (p2p.cc
    # p2pRecvSetup), so NCCL_PROTO leaves the bytes alone and the row says which buffers it counts
    monkeypatch.setenv("COLUMNS", "200")
    plan = plan_memory("llama-3.1-70b", tp=4, nccl=NCCLSettings(protocols=("Simple",)))
    assert plan.term("comm").bytes == plan_memory("llama-3.1-70b", tp=4).term("comm").bytes
    assert "of LL+LL128+Simple" in plan.term("comm").how
    assert main(["plan", "llama-3.1-70b", "--tp", "4", "--nccl-proto", "Simple"]) == 0
    assert "LL+LL128+Simple" in capsys.readouterr().out


def _plan_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in tree.body:  # module level: what runs at import
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            out |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
    return out


def test_plan_modules_import_without_a_cycle():
    graph = {p.stem: _plan_imports(p) for p in PLAN_DIR.glob("*.py")}
    done, path = set(), []

    def visit(module):
        assert module not in path, f"import cycle: {' -> '.join(path[path.index(module):] + [module])}"
        if module in done:
            return
        path.append(module)
        for dep in graph.get(module, ()):
            visit(dep)
        path.pop()
        done.add(module)

    for module in graph:
        visit(module)


@pytest.mark.parametrize("module", ["units", "checks", "dtypes", "parallel", "kv", "stage", "workload", "memory",
                                    "planner", "model"])
def test_docstring_examples_hold(module):
    import doctest
    import importlib

    assert doctest.testmod(importlib.import_module(f"kvpool.plan.{module}")).failed == 0
