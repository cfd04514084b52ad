"""KVShardLayout of hybrid models (#13 item 4): a pool block holds one page per slot, not one per layer.

``pool_bytes_per_block`` is `PagedKVCache`'s block; single-group models keep every figure and every key
of ``to_dict()`` they always had (``pool_bytes_per_block == bytes_per_block``).
"""
import pytest

from kvpool.errors import InvalidArgumentError
from kvpool.plan import kv_shard_layout, load_model_spec
from kvpool.plan.kv_groups import kv_groups
from kvpool.plan.stage import stage_layers

SINGLE_GROUP_KEYS = {"num_layers", "kv_heads", "head_dim", "v_head_dim", "kv_dtype", "dtype_bytes", "scale_bytes",
                     "bytes_per_token", "fp8_scales", "scale_bytes_per_token", "scale_bytes_outside_pool",
                     "scale_layout"}


@pytest.mark.parametrize("model,kv_dtype", [("llama-3.1-8b", "auto"), ("llama-3.1-8b", "fp8"),
                                            ("mistral-7b", "auto"), ("deepseek-v3", "fp8")])
def test_single_group_figures_and_keys_are_unchanged(model, kv_dtype):
    spec = load_model_spec(model)
    layout = kv_shard_layout(spec, 1, kv_dtype)
    assert layout.num_groups == 1 and layout.slots == spec.num_layers
    assert layout.bytes_per_block(16) == layout.pool_bytes_per_block(16) == layout.bytes_per_token * 16
    assert layout.bytes_per_token == spec.num_layers * layout.bytes_per_layer_token
    assert set(layout.to_dict()) == SINGLE_GROUP_KEYS


@pytest.mark.parametrize("model,tp,slots,groups,padding", [
    ("gemma-3-27b", 1, 10, 7, 8), ("gemma-3-27b", 2, 10, 7, 8), ("gemma-2-9b", 1, 21, 2, 0),
    ("gpt-oss-20b", 1, 12, 2, 0), ("gpt-oss-120b", 4, 18, 2, 0),
])
def test_hybrid_bytes_per_block_counts_slots(model, tp, slots, groups, padding):
    spec = load_model_spec(model)
    layout = kv_shard_layout(spec, tp, "fp8")  # per-token scales: one float32 per token, head and tensor
    assert (layout.slots, layout.num_groups, layout.kv_groups.padding_layers) == (slots, groups, padding)
    assert layout.pool_bytes_per_block(32) == slots * layout.bytes_per_layer_token * 32
    assert layout.bytes_per_token == spec.num_layers * layout.bytes_per_layer_token  # every layer, full length
    assert layout.bytes_per_block(32) == layout.bytes_per_token * 32  # one table of every layer, as before
    assert set(layout.to_dict()) == SINGLE_GROUP_KEYS


def test_pipeline_stage_groups_its_own_layers():
    spec = load_model_spec("gemma-3-27b")
    windows = spec.layer_sliding_windows
    for stage in stage_layers(62, 2):  # 31 layers each: 5 global, 26 local
        layout = kv_shard_layout(spec, 1, "auto", layers=stage)
        assert layout.num_layers == 31 and layout.kv_groups == kv_groups([windows[i] for i in stage])
        assert layout.pool_bytes_per_block(16) == layout.slots * layout.bytes_per_layer_token * 16
    first = kv_shard_layout(spec, 1, "auto", num_layers=31)  # without `layers`: the first 31
    assert first == kv_shard_layout(spec, 1, "auto", num_layers=31, layers=range(31))


@pytest.mark.parametrize("kwargs,match", [
    (dict(layers=range(0)), "non-empty range"),
    (dict(layers=range(60, 63)), "within the model's 62"),
    (dict(layers=range(0, 10, 2)), "consecutive"),
    (dict(layers=[0, 1]), "range"),
    (dict(layers=range(0, 31), num_layers=30), "num_layers=30 disagrees"),
])
def test_bad_layers_are_refused(kwargs, match):
    with pytest.raises(InvalidArgumentError, match=match):
        kv_shard_layout(load_model_spec("gemma-3-27b"), 1, "auto", **kwargs)
