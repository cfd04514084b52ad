"""Current models as vLLM 0.19 loads them (issue 12 item 1): Gemma-3 (multimodal wrapper, SigLIP tower),
gpt-oss (MXFP4 experts, sinks, biases, alternating windows), Qwen3 / Qwen3-MoE (q/k norms), DeepSeek-V2-Lite.

The presets are the published config.json files; the weights term is vLLM's "Model loading took X GiB"
(torch bytes allocated by load_model on one TP rank), worked out by hand here from vLLM's source.
"""
import json

import pytest

from kvpool.errors import PlanError
from kvpool.plan import load_model_spec, plan_memory
from kvpool.plan.model import PRESET_DIR
from kvpool.plan.quant import mxfp4_expert_bytes, mxfp4_expert_intermediate
from kvpool.plan.weights import shard_weight_bytes

GIB = 2**30
NEW_PRESETS = ["gemma-3-4b", "gemma-3-12b", "gemma-3-27b", "gpt-oss-20b", "gpt-oss-120b", "qwen3-8b", "qwen3-32b",
               "qwen3-30b-a3b", "deepseek-v2-lite"]
# model cards: Gemma-3 4.30B / 12.2B / 27.4B with the vision tower, gpt-oss 20.9B / 116.8B (OpenAI's model card),
# Qwen3 8.2B / 32.8B / 30.5B, DeepSeek-V2-Lite 15.7B
PUBLISHED_B = {"gemma-3-4b": 4.30, "gemma-3-12b": 12.2, "gemma-3-27b": 27.4, "gpt-oss-20b": 20.9,
               "gpt-oss-120b": 116.8, "qwen3-8b": 8.19, "qwen3-32b": 32.8, "qwen3-30b-a3b": 30.5,
               "deepseek-v2-lite": 15.7}


def _preset(name: str) -> dict:
    return json.loads((PRESET_DIR / f"{name}.json").read_text())


@pytest.mark.parametrize("name", NEW_PRESETS)
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_every_new_preset_plans_on_h100s(name, tp):
    plan = plan_memory(name, tp, gpu="h100-sxm")
    assert plan.num_blocks > 0 and plan.term("weights").bytes > 0


@pytest.mark.parametrize("name", NEW_PRESETS)
def test_tp8_plans_or_names_the_head_split(name):
    try:
        assert plan_memory(name, 8, gpu="h100-sxm").num_blocks > 0
    except PlanError as exc:
        assert "head" in str(exc)


def test_gpt_oss_120b_does_not_fit_one_h100_and_says_so():
    with pytest.raises(PlanError, match=r"gpt-oss-120b weights need 65.52 GiB .* tp=2"):
        plan_memory("gpt-oss-120b", 1, gpu="h100-sxm", mem_fraction=0.8)


@pytest.mark.parametrize("name", NEW_PRESETS)
def test_parameter_count_within_one_percent_of_published(name):
    total = load_model_spec(name).num_parameters
    assert abs(total / 1e9 - PUBLISHED_B[name]) / PUBLISHED_B[name] < 0.01, total


def test_gemma3_4b_counts_its_vision_tower_and_qk_norms():
    c = load_model_spec("gemma-3-4b").parameter_counts()
    # SigLIP so400m: 27 x (4 x 1152^2 + 2 x 1152 x 4304 + 4304 + 9 x 1152) + patch (1152 x 3 x 14^2 + 1152)
    # + positions 64^2 x 1152 + post norm 2 x 1152; projector 1152 x 2560 + 1152
    assert c["vision"] == 27 * (4 * 1152**2 + 2 * 1152 * 4304 + 4304 + 9 * 1152) + 1152 * 589 + 4096 * 1152 + 2304 \
        + 1152 * 2560 + 1152 == 419_816_304
    assert c["norm"] == 34 * (4 * 2560 + 2 * 256) + 2560  # four norms per layer, q_norm and k_norm over 256
    assert c["total"] == 4_300_079_472 and c["active"] == c["total"] - c["vision"]


def test_gemma3_head_dims_windows_vocab_and_tied_embeddings():
    for name, head_dim in (("gemma-3-4b", 256), ("gemma-3-12b", 256), ("gemma-3-27b", 128)):
        spec = load_model_spec(name)
        assert spec.head_dim == head_dim and spec.vocab_size == 262208 and spec.tie_word_embeddings
        assert [w is None for w in spec.layer_sliding_windows[:6]] == [False] * 5 + [True]  # 5 local : 1 global
        assert set(spec.layer_sliding_windows) == {1024, None}


def test_gpt_oss_reads_mxfp4_sinks_biases_and_alternating_windows():
    spec = load_model_spec("gpt-oss-20b")
    assert (spec.quant_method, spec.weight_bits, spec.quant_group_size) == ("mxfp4", 4, 32)
    assert spec.attention_sinks and spec.expert_bias and spec.router_bias and spec.qkv_bias and spec.o_bias
    assert spec.layer_sliding_windows == (128, None) * 12
    assert spec.rope_caches == ((4096 * 32, 64, "fp32"),)  # yarn: original 4,096 x factor 32, float32


def test_mxfp4_bytes_of_one_expert_tensor_by_hand():
    # gpt-oss gate_up at tp 1: [5760, 2880] -> packed values [5760, 1440] uint8, swizzled with both dims padded to
    # 64 (1440 -> 1472); its e8m0 scales [5760, 90] swizzled with rows padded to 256 (5760 -> 5888), and the
    # loaded [5760, 90] scale parameter kept beside them
    assert mxfp4_expert_bytes(5760, 2880) == 5760 * 1472 + 5888 * 90 + 5760 * 90 == 9_527_040
    # down at tp 2: the intermediate 1440 rounds up to 1472: [2880, 1472] -> values 2880 x 768, scales 3072 x 46
    assert mxfp4_expert_intermediate(2880, 2) == 1472
    assert mxfp4_expert_bytes(2880, 1472) == 2880 * 768 + 3072 * 46 + 2880 * 46


def test_gpt_oss_20b_weights_at_tp2_equal_vllms_layout_by_hand():
    experts = 32 * (mxfp4_expert_bytes(2944, 2880) + mxfp4_expert_bytes(2880, 1472) + (2944 + 2880) * 4)
    attention = ((4096 + 2 * 512) // 2 * (2880 + 1) + 2880 * 2048 + 2880 + 64 // 2) * 2  # qkv+bias, o, o bias, sinks
    rest = (2 * 2880 + 32 * 2880 + 32) * 2  # two norms, the router and its bias (replicated)
    embeddings = 2 * (201088 // 2) * 2880 * 2 + 2880 * 2  # embedding + untied LM head, final norm
    rope = 131072 * 64 * 4
    expected = 24 * (experts + attention + rest) + embeddings + rope
    assert shard_weight_bytes(load_model_spec("gpt-oss-20b"), 2, "bf16")["total"] == expected == 7_504_664_192


def test_gemma3_4b_weights_are_its_parameters_plus_two_rope_caches():
    spec = load_model_spec("gemma-3-4b")
    rope = (131072 + 131072 * 8) * 256 * 2  # local layers' plain cache + global layers' linear x8 cache, bf16
    assert shard_weight_bytes(spec, 1, "bf16")["total"] == spec.num_parameters * 2 + rope


def test_qwen3_8b_weights_at_tp2_by_hand():
    layer = (4096 * (4096 + 2 * 1024) // 2 + 4096 * 4096 // 2 + 3 * 4096 * 12288 // 2 + 2 * 4096 + 2 * 128) * 2
    expected = 36 * layer + 2 * 151936 // 2 * 4096 * 2 + 4096 * 2 + 40960 * 128 * 2
    assert shard_weight_bytes(load_model_spec("qwen3-8b"), 2, "bf16")["total"] == expected


def test_qwen3_moe_layers_follow_sparse_step_and_mlp_only_layers():
    cfg = {**_preset("qwen3-30b-a3b"), "num_hidden_layers": 8, "decoder_sparse_step": 2, "mlp_only_layers": [3]}
    spec = load_model_spec(cfg)
    assert [spec.is_moe_layer(i) for i in range(8)] == [False, True, False, False, False, True, False, True]
    assert spec.num_moe_layers == 3 and load_model_spec("qwen3-30b-a3b").num_moe_layers == 48


def test_vllm_pads_the_vocabulary_to_64_before_splitting_it():
    cfg = {**_preset("qwen3-8b"), "vocab_size": 32001}
    embed = shard_weight_bytes(load_model_spec(cfg), 4, "bf16")["embedding"]
    assert embed == 32064 // 4 * 4096 * 2  # 32,001 -> 32,064 rows, 8,016 per rank


@pytest.mark.parametrize("key", ["text_config", "language_config", "llm_config"])
def test_a_multimodal_wrapper_plans_its_language_model(key):
    llm = {k: v for k, v in _preset("qwen3-8b").items() if k not in ("_name_or_path", "torch_dtype")}
    wrapper = {"_name_or_path": "org/vlm", "model_type": "some_vlm", "torch_dtype": "bfloat16", key: llm,
               "vision_config": {"model_type": "intern_vit_6b", "hidden_size": 3200}}
    spec = load_model_spec(wrapper)
    assert spec.num_parameters == load_model_spec("qwen3-8b").num_parameters
    assert (spec.checkpoint, spec.dtype, spec.vision, spec.vision_uncounted) == ("org/vlm", "bf16", None, "intern_vit_6b")


def test_a_wrapper_without_model_type_in_text_config_takes_the_wrappers_text_model():
    cfg = _preset("gemma-3-4b")
    del cfg["text_config"]["model_type"]
    assert load_model_spec(cfg) == load_model_spec(_preset("gemma-3-4b"))


# "Model loading took X GiB" in public vLLM start-up logs on one H100 (tp 1): Llama-3.1-8B-Instruct 14.99 and
# Qwen3-0.6B 1.12 (vLLM 0.11-era V1 engine, the same loader and rope caches as 0.19); gpt-oss-20b 13.47 in the same
# set, where the vendored triton_kernels did not yet pad the packed values to 64 (0.19's HopperMXValueLayout does)
QWEN3_06B = {**_preset("qwen3-8b"), "_name_or_path": "Qwen/Qwen3-0.6B", "hidden_size": 1024, "intermediate_size": 3072,
             "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8, "max_window_layers": 28,
             "tie_word_embeddings": True}


# gemma-3-4b-it: 8.5834 GiB in a public vLLM 0.11-era log (RTX 4080): 8.01 GiB of parameters + the two rope caches
# (64 + 512 MiB); without the global layers' 8x linear cache the plan would be 6.5% short
@pytest.mark.parametrize("model,logged_gib", [("llama-3.1-8b", 14.99), (QWEN3_06B, 1.12), ("gpt-oss-20b", 13.47),
                                              ("gemma-3-4b", 8.5834)])
def test_weights_within_two_percent_of_vllms_logged_figure(model, logged_gib):
    planned = shard_weight_bytes(load_model_spec(model), 1, "bf16")["total"] / GIB
    assert abs(planned - logged_gib) / logged_gib < 0.02, planned


FP8_BLOCK = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}


@pytest.mark.parametrize("max_positions,logged_gib", [(40960, 29.0435), (262144, 29.0972)])
def test_qwen3_30b_a3b_fp8_matches_vllms_logged_figure(max_positions, logged_gib):
    """Public vLLM logs, one GPU: Qwen/Qwen3-30B-A3B-FP8 "Model loading took 29.0435 GiB" and
    Qwen3-30B-A3B-Instruct-2507-FP8 (max_position_embeddings 262,144: a 64 MiB rope cache) 29.0972 GiB."""
    cfg = {**_preset("qwen3-30b-a3b"), "quantization_config": FP8_BLOCK, "max_position_embeddings": max_positions}
    planned = shard_weight_bytes(load_model_spec(cfg), 1, "bf16")["total"] / GIB
    assert abs(planned - logged_gib) < 0.002, planned


def test_llama_and_qwen3_small_match_vllm_to_the_logged_hundredth():
    assert round(shard_weight_bytes(load_model_spec("llama-3.1-8b"), 1, "bf16")["total"] / GIB, 2) == 14.99
    assert round(shard_weight_bytes(load_model_spec(QWEN3_06B), 1, "bf16")["total"] / GIB, 2) == 1.12


def test_the_plan_says_what_it_assumes_about_the_weights():
    assumptions = " ".join(plan_memory("gpt-oss-20b", 1, gpu="h100-sxm").assumptions)
    assert "MXFP4" in assumptions and "Hopper" in assumptions
    assumptions = " ".join(plan_memory("gemma-3-4b", 1, gpu="h100-sxm").assumptions)
    assert "vision tower" in assumptions


def _hf_count(cfg: dict) -> int:
    """Parameters of transformers' own model for ``cfg``, built on the meta device (nothing downloaded)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.AutoConfig.for_model(cfg["model_type"], **{k: v for k, v in cfg.items() if k != "model_type"})
    auto = transformers.AutoModelForImageTextToText if "vision_config" in cfg else transformers.AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(config)
    return sum({id(p): p.numel() for p in model.parameters()}.values())  # tied weights once


@pytest.mark.parametrize("name", ["gemma-3-4b", "gemma-3-27b", "gpt-oss-20b", "qwen3-8b", "qwen3-30b-a3b",
                                  "deepseek-v2-lite"])
def test_parameter_count_equals_transformers(name):
    cfg = _preset(name)
    cfg.pop("quantization_config", None)  # transformers would dequantize; the count is the same
    text = cfg.get("text_config", cfg)
    text["num_hidden_layers"] = 6 if name.startswith("gemma") else 2  # the per-layer terms are the same
    text.pop("layer_types", None)
    if name == "gpt-oss-20b":
        cfg["layer_types"] = ["sliding_attention", "full_attention"]
    if name == "deepseek-v2-lite":
        cfg["num_hidden_layers"] = 3
    assert load_model_spec(cfg).num_parameters == _hf_count(cfg)


@pytest.mark.parametrize("module", ["quant", "rope_cache", "config_defaults"])
def test_docstring_examples_hold(module):
    import doctest
    import importlib

    assert doctest.testmod(importlib.import_module(f"kvpool.plan.{module}")).failed == 0
