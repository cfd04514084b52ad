"""Fields a config.json leaves out take its architecture's transformers default (issue 9 item 18)."""
import json

import pytest

from kvpool.plan import load_model_spec
from kvpool.plan.config_defaults import ARCH_DEFAULTS, VISION_DEFAULTS
from kvpool.plan.model import PRESET_DIR, spec_from_config

transformers = pytest.importorskip("transformers")
CONFIG_MAPPING = transformers.CONFIG_MAPPING


def _language_type(cfg: dict) -> str:
    """The language model's model_type (a multimodal wrapper's text_config's)."""
    return cfg.get("text_config", cfg)["model_type"]


# the language model of every preset, plus the Gemma generations the issue names
PRESET_TYPES = sorted({_language_type(json.loads(p.read_text())) for p in PRESET_DIR.glob("*.json")})


def _preset(name: str) -> dict:
    return json.loads((PRESET_DIR / f"{name}.json").read_text())


def test_every_preset_family_has_a_defaults_table():
    assert set(PRESET_TYPES) | {"gemma", "gemma2", "gemma3_text"} <= set(ARCH_DEFAULTS)


def test_gemma2_9b_preset_is_the_real_file_and_ties_its_embeddings():
    # google/gemma-2-9b's config.json has no tie_word_embeddings; Gemma2Config defaults it to True
    assert "tie_word_embeddings" not in _preset("gemma-2-9b")
    spec = load_model_spec("gemma-2-9b")
    assert spec.tie_word_embeddings
    assert spec.num_parameters == 9_241_705_984  # transformers' Gemma2ForCausalLM count (not 10.16B untied)


def _class_default(model_type: str, field: str):
    """The default transformers' config class gives ``field`` (or the model code's equivalent)."""
    # Qwen2/Qwen3 null the window unless it is enabled: read the default the flag turns on
    enable = {"use_sliding_window": True} if field == "sliding_window" and model_type.startswith("qwen") else {}
    config = CONFIG_MAPPING[model_type](**enable)
    if field == "rope_theta":
        rope = config.rope_parameters
        return rope.get("full_attention", rope)["rope_theta"]
    if field == "sliding_window_pattern":  # the period of "full_attention" in the derived layer_types
        return config.layer_types.index("full_attention") + 1
    if field == "rope_scaling":  # transformers 5 keeps it in rope_parameters, beside rope_theta
        return {k: v for k, v in config.rope_parameters.items() if k != "rope_theta"}
    if field == "topk_method" and model_type == "deepseek_v3":  # its router always has the noaux_tc bias
        from transformers.models.deepseek_v3 import modeling_deepseek_v3 as m

        router = m.DeepseekV3TopkRouter(config)
        return "noaux_tc" if hasattr(router, "e_score_correction_bias") else None
    return getattr(config, field)


@pytest.mark.parametrize("model_type,field", [(t, f) for t, fields in ARCH_DEFAULTS.items() for f in fields])
def test_table_equals_transformers_config_class(model_type, field):
    assert ARCH_DEFAULTS[model_type][field] == _class_default(model_type, field)


def _comparable(spec) -> dict:
    d = spec.to_dict()
    for key in ("name", "checkpoint"):
        d.pop(key)
    return d


# shapes off the defaults, so derived fields (head_dim = hidden / heads, kv heads = heads) are exercised
SHAPES = [{}, {"hidden_size": 2048, "num_attention_heads": 128, "num_hidden_layers": 12, "intermediate_size": 2816}]


@pytest.mark.parametrize("shape", SHAPES, ids=["defaults", "small"])
@pytest.mark.parametrize("model_type", sorted(ARCH_DEFAULTS))
def test_a_bare_config_reads_as_transformers_fills_it(model_type, shape):
    """{"model_type": t, ...} parsed by kvpool == the dict transformers' config class builds from it."""
    if model_type == "deepseek_v2":  # DeepseekV2Config leaves num_experts_per_tok None: no router without it
        shape = {**shape, "num_experts_per_tok": 6}
    filled = CONFIG_MAPPING[model_type](**shape).to_dict()
    assert _comparable(spec_from_config({"model_type": model_type, **shape})) == _comparable(spec_from_config(filled))


def _hf_count(cfg: dict) -> int:
    torch = pytest.importorskip("torch")
    config = transformers.AutoConfig.for_model(cfg["model_type"], **{k: v for k, v in cfg.items() if k != "model_type"})
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    seen = {id(p): p.numel() for p in model.parameters()}  # tied weights appear once
    buffers = sum(b.numel() for n, b in model.named_buffers() if n.endswith("e_score_correction_bias"))
    return sum(seen.values()) + buffers


@pytest.mark.parametrize("name", ["llama-3.1-8b", "mistral-7b", "mixtral-8x7b", "qwen2.5-7b", "gemma-2-9b",
                                  "deepseek-v3"])
def test_preset_stripped_of_defaulted_fields_counts_as_transformers(name):
    """Every field the table covers removed from the preset: kvpool and transformers fill the same."""
    cfg = _preset(name)
    cfg.pop("quantization_config", None)
    keep = {"model_type": cfg["model_type"], "num_hidden_layers": 2}
    stripped = {k: v for k, v in cfg.items() if k not in ARCH_DEFAULTS[cfg["model_type"]]}
    stripped.update(keep)
    if name == "deepseek-v3":  # a small expert count and no MTP layer keep the meta model small
        stripped.update(num_hidden_layers=4, n_routed_experts=16, n_group=4, topk_group=2, num_nextn_predict_layers=0)
    assert load_model_spec(stripped).num_parameters == _hf_count(stripped)


def test_missing_structural_field_takes_the_architecture_default():
    cfg = _preset("llama-2-7b")
    del cfg["hidden_size"], cfg["intermediate_size"]
    spec = load_model_spec(cfg)
    assert (spec.hidden_size, spec.intermediate_size) == (4096, 11008)  # LlamaConfig's defaults


def test_rope_parameters_of_transformers_5_are_read():
    cfg = _preset("llama-3.1-8b")
    del cfg["rope_theta"]
    cfg["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 500000.0}
    assert load_model_spec(cfg).rope_theta == 500000.0


def test_gemma3_slides_five_layers_of_six():
    spec = spec_from_config({"model_type": "gemma3_text", "num_hidden_layers": 12, "sliding_window": 1024})
    assert spec.layer_sliding_windows == (1024,) * 5 + (None,) + (1024,) * 5 + (None,)


def test_explicit_null_in_the_file_wins_over_the_default():
    cfg = _preset("mistral-7b-v0.3")
    assert cfg["sliding_window"] is None  # MistralConfig's default is 4096; the file says none
    assert load_model_spec(cfg).sliding_layers == 0
    del cfg["sliding_window"]
    assert load_model_spec(cfg).sliding_layers == cfg["num_hidden_layers"]


@pytest.mark.parametrize("model_type,field", [(t, f) for t, fields in VISION_DEFAULTS.items() for f in fields])
def test_vision_table_equals_transformers_config_class(model_type, field):
    assert VISION_DEFAULTS[model_type][field] == getattr(CONFIG_MAPPING[model_type](), field)


def test_gemma3_wrapper_reads_the_text_model_as_transformers_fills_it():
    """google/gemma-3-4b-it's text_config gives no heads, head_dim, vocabulary or tie flag: Gemma3TextConfig's."""
    cfg = _preset("gemma-3-4b")
    text = CONFIG_MAPPING["gemma3"](**{k: v for k, v in cfg.items() if k != "model_type"}).text_config
    spec = load_model_spec(cfg)
    assert (spec.num_attention_heads, spec.num_kv_heads, spec.head_dim, spec.vocab_size) == (
        text.num_attention_heads, text.num_key_value_heads, text.head_dim, text.vocab_size) == (8, 4, 256, 262208)
    assert spec.tie_word_embeddings and text.tie_word_embeddings
    assert [w is not None for w in spec.layer_sliding_windows] == [t == "sliding_attention" for t in text.layer_types]
    assert spec.model_type == "gemma3_text" and spec.dtype == "bf16" and spec.qk_norm


@pytest.mark.parametrize("name", ["qwen3-8b", "qwen3-30b-a3b", "gpt-oss-20b", "deepseek-v2-lite"])
def test_current_preset_stripped_of_defaulted_fields_counts_as_transformers(name):
    """The new architectures' tables: every covered field removed, kvpool and transformers count the same."""
    cfg = _preset(name)
    cfg.pop("quantization_config", None)
    cfg.pop("layer_types", None)  # derived by both from the layer count
    stripped = {k: v for k, v in cfg.items() if k not in ARCH_DEFAULTS[cfg["model_type"]]}
    stripped.update(model_type=cfg["model_type"], num_hidden_layers=2)
    if name == "deepseek-v2-lite":  # its remote code's config fields, as transformers' DeepseekV2Config reads them
        stripped.update(num_hidden_layers=3, first_k_dense_replace=1)
    assert load_model_spec(stripped).num_parameters == _hf_count(stripped)


@pytest.mark.parametrize("use_sliding_window, windows", [(False, (None,) * 4), (True, (32, None, 32, None))])
def test_qwen2_layer_types_slide_only_when_the_window_is_enabled(use_sliding_window, windows):
    """transformers' Qwen2Config drops sliding_window unless use_sliding_window, so listed sliding layers
    then attend to everything; the planner (and the pages it sizes) must read the file the same way."""
    from transformers import Qwen2Config

    layer_types = ["sliding_attention", "full_attention"] * 2
    cfg = dict(model_type="qwen2", num_hidden_layers=4, hidden_size=64, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=100, intermediate_size=128, sliding_window=32,
               use_sliding_window=use_sliding_window, layer_types=layer_types)
    hf = Qwen2Config(**{k: v for k, v in cfg.items() if k != "model_type"})
    assert tuple(hf.sliding_window if t == "sliding_attention" else None for t in hf.layer_types) == windows
    assert spec_from_config(cfg).layer_sliding_windows == windows
