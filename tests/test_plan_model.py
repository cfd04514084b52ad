"""ModelSpec parsing: presets, paths, dicts, parameter counts against published figures and transformers."""
import json

import pytest

from kvpool.errors import ConfigError
from kvpool.plan import list_presets, load_model_spec
from kvpool.plan.model import PRESET_DIR

# Published parameter counts (model cards / papers), in billions.
PUBLISHED_B = {
    "llama-2-7b": 6.74, "llama-2-13b": 13.0, "llama-2-70b": 69.0,
    "llama-3.1-8b": 8.03, "llama-3.1-70b": 70.6, "llama-3.1-405b": 405.9,
    "mistral-7b": 7.24, "mistral-7b-v0.3": 7.25, "mixtral-8x7b": 46.7, "mixtral-8x22b": 140.6,
    "qwen2.5-7b": 7.62, "qwen2.5-14b": 14.7, "qwen2.5-32b": 32.5, "qwen2.5-72b": 72.7,
    "gemma-2-9b": 9.24, "gemma-2-27b": 27.2, "deepseek-v3": 671.0,
}


def test_every_issue_preset_exists():
    assert set(PUBLISHED_B) <= set(list_presets())
    assert len(list_presets()) >= 15


@pytest.mark.parametrize("name", sorted(PUBLISHED_B))
def test_parameter_count_within_one_percent_of_published(name):
    total = load_model_spec(name).num_parameters
    assert abs(total / 1e9 - PUBLISHED_B[name]) / PUBLISHED_B[name] < 0.01, total


def test_moe_active_parameters_match_published():
    assert abs(load_model_spec("mixtral-8x7b").parameter_counts()["active"] / 1e9 - 12.9) < 0.13
    assert abs(load_model_spec("deepseek-v3").parameter_counts()["active"] / 1e9 - 37.0) < 0.75


def test_deepseek_mtp_layer_is_counted_apart():
    c = load_model_spec("deepseek-v3").parameter_counts()
    # 671B main model; the MTP module adds ~11.6B of its own (+ the shared embedding/head = the published 14B)
    assert 11e9 < c["mtp"] < 14e9
    assert c["total"] < 672e9


def test_shapes_gqa_mla_sliding():
    llama = load_model_spec("llama-2-70b")
    assert (llama.num_attention_heads, llama.num_kv_heads, llama.head_dim, llama.dtype) == (64, 8, 128, "fp16")
    ds = load_model_spec("deepseek-v3")
    assert ds.is_mla and ds.kv_lora_rank == 512 and ds.qk_rope_head_dim == 64 and ds.v_head_dim == 128
    assert ds.quant_method == "fp8" and ds.quant_block_size == (128, 128) and ds.first_dense_layers == 3
    gemma = load_model_spec("gemma-2-9b")
    assert gemma.layer_sliding_windows[:4] == (4096, None, 4096, None) and gemma.sliding_layers == 21
    assert gemma.head_dim == 256 and gemma.logit_soft_cap == 50.0 and gemma.final_logit_soft_cap == 30.0
    mistral = load_model_spec("mistral-7b")  # v0.1: sliding_window 4096 on every layer
    assert set(mistral.layer_sliding_windows) == {4096} and mistral.checkpoint == "mistralai/Mistral-7B-v0.1"
    assert set(load_model_spec("mistral-7b-v0.3").layer_sliding_windows) == {None}
    assert set(load_model_spec("qwen2.5-7b").layer_sliding_windows) == {None}  # use_sliding_window false
    assert load_model_spec("qwen2.5-7b").qkv_bias


def test_spec_is_frozen_and_json_able():
    spec = load_model_spec("gemma-2-27b")
    d = spec.to_dict()
    assert json.loads(json.dumps(d)) == d
    with pytest.raises(Exception):
        spec.num_layers = 3


def test_path_folder_and_dict_give_the_preset_spec(tmp_path):
    cfg = json.loads((PRESET_DIR / "llama-3.1-8b.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    from_dir = load_model_spec(tmp_path)
    from_file = load_model_spec(str(tmp_path / "config.json"))
    from_dict = load_model_spec(cfg)
    preset = load_model_spec("llama-3.1-8b")
    for spec in (from_dir, from_file, from_dict):
        assert spec.to_dict() | {"name": ""} == preset.to_dict() | {"name": ""}


def test_layer_types_field_is_read():
    cfg = json.loads((PRESET_DIR / "gemma-2-9b.json").read_text())
    cfg["layer_types"] = ["full_attention"] * 40 + ["sliding_attention"] * 2
    spec = load_model_spec(cfg)
    assert spec.layer_sliding_windows[-3:] == (None, 4096, 4096)


def test_quantization_configs():
    base = json.loads((PRESET_DIR / "llama-3.1-8b.json").read_text())
    awq = load_model_spec({**base, "quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 128,
                                                           "zero_point": True}})
    assert (awq.quant_method, awq.weight_bits, awq.quant_group_size) == ("awq", 4, 128)
    gptq = load_model_spec({**base, "quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 128}})
    assert gptq.quant_method == "gptq"
    ct = load_model_spec({**base, "quantization_config": {"quant_method": "compressed-tensors", "config_groups": {
        "group_0": {"weights": {"num_bits": 8, "type": "int"}}}, "ignore": ["lm_head"]}})
    assert (ct.quant_method, ct.weight_bits, ct.modules_not_quantized) == ("int8", 8, ("lm_head",))
    with pytest.raises(ConfigError, match="quant_method"):
        load_model_spec({**base, "quantization_config": {"quant_method": "mystery"}})
    with pytest.raises(ConfigError, match="bits"):
        load_model_spec({**base, "quantization_config": {"quant_method": "awq", "bits": 5}})


def test_unknown_preset_lists_close_names():
    with pytest.raises(ConfigError, match="llama-3.1-70b") as e:
        load_model_spec("llama-3.1-7b")
    assert "did you mean" in str(e.value)


@pytest.mark.parametrize("field", ["num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size",
                                   "intermediate_size"])
def test_missing_field_is_named(field):
    # an architecture transformers has no defaults for (known ones fill them: test_plan_config_defaults.py)
    cfg = json.loads((PRESET_DIR / "llama-2-7b.json").read_text())
    cfg["model_type"] = "my_custom_llama"
    del cfg[field]
    with pytest.raises(ConfigError, match=field):
        load_model_spec(cfg)


@pytest.mark.parametrize("field,value", [("num_hidden_layers", -2), ("hidden_size", "4096"),
                                         ("num_key_value_heads", 5), ("torch_dtype", "int3"),
                                         ("sliding_window", -1), ("tie_word_embeddings", "yes")])
def test_odd_field_is_named(field, value):
    cfg = json.loads((PRESET_DIR / "llama-2-7b.json").read_text())
    cfg[field] = value
    with pytest.raises(ConfigError, match=field.split("_")[0]):
        load_model_spec(cfg)


def test_malformed_json_file(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text('{"hidden_size": 4096,')
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_model_spec(bad)
    with pytest.raises(ConfigError, match="no config.json"):
        load_model_spec(tmp_path / "..")
