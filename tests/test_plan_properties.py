"""Hypothesis properties of the planner."""
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpool.errors import PlanError
from kvpool.plan import kv_shard_layout, list_presets, load_model_spec, plan_memory
from kvpool.plan.kv import check_tp
from kvpool.plan.weights import shard_weight_bytes

PRESETS = [p for p in list_presets() if p != "llama-3.1-405b"]  # 405B fits nowhere small; it slows the search


def _valid_tps(spec):
    out = []
    for tp in (1, 2, 4, 8, 16):
        try:
            out.append(check_tp(spec, tp))
        except PlanError:
            pass
    return out


@st.composite
def model_and_tp(draw):
    spec = load_model_spec(draw(st.sampled_from(PRESETS)))
    return spec, draw(st.sampled_from(_valid_tps(spec)))


def _tokens(spec, tp, **kw):
    try:
        return plan_memory(spec, tp, gpu="h200", **kw).kv_cache["tokens"]
    except PlanError:
        return 0


@settings(max_examples=40, deadline=None)
@given(model_and_tp(), st.floats(20, 400), st.floats(0.5, 1.0))
def test_tokens_never_increase_when_memory_shrinks(mt, mem, shrink):
    spec, tp = mt
    assert _tokens(spec, tp, gpu_mem_gib=mem * shrink) <= _tokens(spec, tp, gpu_mem_gib=mem)


@settings(max_examples=40, deadline=None)
@given(model_and_tp(), st.integers(256, 65536), st.integers(1, 4))
def test_tokens_never_increase_when_batched_tokens_grow(mt, tokens, factor):
    spec, tp = mt
    small = _tokens(spec, tp, max_batched_tokens=tokens)
    assert _tokens(spec, tp, max_batched_tokens=tokens * factor) <= small


@settings(max_examples=60, deadline=None)
@given(model_and_tp(), st.sampled_from(["bf16", "fp16", "fp32"]))
def test_weights_per_gpu_times_tp_cover_the_model(mt, dtype):
    spec, tp = mt
    assert shard_weight_bytes(spec, tp, dtype)["total"] * tp >= shard_weight_bytes(spec, 1, dtype)["total"]


@settings(max_examples=60, deadline=None)
@given(model_and_tp())
def test_bytes_per_token_scale_exactly_with_kv_dtype(mt):
    spec, tp = mt
    b16 = kv_shard_layout(spec, tp, "bf16").bytes_per_token
    assert kv_shard_layout(spec, tp, "fp16").bytes_per_token == b16
    assert kv_shard_layout(spec, tp, "fp32").bytes_per_token == 2 * b16
    assert 2 * kv_shard_layout(spec, tp, "fp8", fp8_scales="none").bytes_per_token == b16
    lay = kv_shard_layout(spec, tp, "fp8")
    assert lay.bytes_per_token == b16 // 2 + lay.num_layers * lay.kv_heads * lay.tensors_per_layer * 4
