"""What transformers assumes for the config.json fields a checkpoint leaves out, per ``model_type``.

A real config.json omits whatever equals its architecture's default: google/gemma-2-9b has no
``tie_word_embeddings`` (Gemma ties them), Gemma-3's ``text_config`` omits even the head counts. vLLM and
transformers read such a file through the architecture's config class, so the planner must fill the same
defaults or it plans another model (untied Gemma-2-9B: 10.16B parameters instead of 9.24B).

``ARCH_DEFAULTS[model_type]`` lists, for every field the planner reads, the default of transformers'
config class (transformers 5.x, checked field by field in ``tests/test_plan_config_defaults.py``).
Fields whose default is derived from others are left out and derived by the parser the way transformers
does: ``head_dim = hidden_size // num_attention_heads`` (Llama, Mistral, Mixtral, Qwen2, Cohere2) and
``num_key_value_heads = num_attention_heads`` (Llama, Cohere2).
Two entries are not attributes of the config class but facts of its model code:
``sliding_window_pattern`` (every n-th layer is global; transformers builds ``layer_types`` from it) and
DeepSeek-V3's ``topk_method`` (its router always has the ``e_score_correction_bias`` of "noaux_tc").
gpt-oss's ``rope_scaling`` is transformers' ``rope_parameters`` without ``rope_theta`` (vLLM sizes its
rotary cache from it). DeepSeek-V2's class leaves ``num_experts_per_tok`` None (no working router), so
that field stays required.
A ``model_type`` not listed here keeps the generic fallbacks in `kvpool.plan.model`, and the fields
without one (layers, hidden size, heads, vocabulary, MLP size) stay required.

Multimodal wrappers hold the language model under ``text_config`` (or ``language_config``, ``llm_config``);
``WRAPPED_TEXT_TYPE`` names the language model's ``model_type`` when the inner dict omits it, and
``VISION_DEFAULTS`` lists the vision tower's defaults (transformers' ``SiglipVisionConfig``).
"""
from __future__ import annotations

from types import MappingProxyType
from typing import Any, Mapping

_LLAMA_SHAPES = dict(vocab_size=32000, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32)
_QWEN_SHAPES = dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=32768,
                    rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
                    use_sliding_window=False, sliding_window=4096, max_window_layers=28)
_GEMMA_COMMON = dict(head_dim=256, rms_norm_eps=1e-6, tie_word_embeddings=True, attention_bias=False)

ARCH_DEFAULTS: Mapping[str, Mapping[str, Any]] = MappingProxyType({
    "llama": dict(**_LLAMA_SHAPES, intermediate_size=11008, max_position_embeddings=2048, rms_norm_eps=1e-6,
                  rope_theta=10000.0, tie_word_embeddings=False, attention_bias=False, mlp_bias=False),
    "mistral": dict(**_LLAMA_SHAPES, intermediate_size=14336, num_key_value_heads=8,
                    max_position_embeddings=131072, rms_norm_eps=1e-6, rope_theta=10000.0,
                    tie_word_embeddings=False, sliding_window=4096),
    "mixtral": dict(**_LLAMA_SHAPES, intermediate_size=14336, num_key_value_heads=8,
                    max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=1e6,
                    tie_word_embeddings=False, sliding_window=None, num_local_experts=8, num_experts_per_tok=2),
    "qwen2": dict(_QWEN_SHAPES),
    "qwen3": dict(_QWEN_SHAPES, head_dim=128, attention_bias=False),
    "gemma": dict(_GEMMA_COMMON, vocab_size=256000, hidden_size=3072, intermediate_size=24576,
                  num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=16,
                  max_position_embeddings=8192, rope_theta=10000.0),
    "gemma2": dict(_GEMMA_COMMON, vocab_size=256000, hidden_size=2304, intermediate_size=9216,
                   num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
                   max_position_embeddings=8192, rope_theta=10000.0, sliding_window=4096,
                   sliding_window_pattern=2, attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
    "gemma3_text": dict(_GEMMA_COMMON, vocab_size=262208, hidden_size=2304, intermediate_size=9216,
                        num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
                        max_position_embeddings=131072, rope_theta=1e6, sliding_window=4096,
                        sliding_window_pattern=6, attn_logit_softcapping=None, final_logit_softcapping=None),
    "cohere2": dict(vocab_size=256000, hidden_size=8192, intermediate_size=22528, num_hidden_layers=40,
                    num_attention_heads=64, max_position_embeddings=8192, layer_norm_eps=1e-5,
                    rope_theta=10000.0, tie_word_embeddings=True, attention_bias=False, sliding_window=4096,
                    sliding_window_pattern=4),
    "qwen3_moe": dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=24,
                      num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=32768, rms_norm_eps=1e-6,
                      rope_theta=10000.0, tie_word_embeddings=False, attention_bias=False, use_sliding_window=False,
                      sliding_window=4096, decoder_sparse_step=1, moe_intermediate_size=768, num_experts_per_tok=8,
                      num_local_experts=128, mlp_only_layers=[]),
    "gpt_oss": dict(vocab_size=201088, hidden_size=2880, intermediate_size=2880, num_hidden_layers=36,
                    num_attention_heads=64, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
                    rms_norm_eps=1e-5, rope_theta=150000.0, tie_word_embeddings=False, attention_bias=True,
                    sliding_window=128, sliding_window_pattern=2, num_local_experts=128, num_experts_per_tok=4,
                    rope_scaling=dict(rope_type="yarn", factor=32.0, beta_fast=32.0, beta_slow=1.0, truncate=False,
                                      original_max_position_embeddings=4096)),
    "deepseek_v2": dict(vocab_size=102400, hidden_size=4096, intermediate_size=11008, moe_intermediate_size=1407,
                        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, n_shared_experts=2,
                        n_routed_experts=64, kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64, v_head_dim=128,
                        qk_nope_head_dim=128, first_k_dense_replace=0, max_position_embeddings=2048,
                        rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False, attention_bias=False,
                        mlp_bias=False, topk_method="greedy"),
    "deepseek_v3": dict(vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
                        num_hidden_layers=61, num_attention_heads=128, num_key_value_heads=128,
                        n_shared_experts=1, n_routed_experts=256, kv_lora_rank=512, q_lora_rank=1536,
                        qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128, num_experts_per_tok=8,
                        first_k_dense_replace=3, max_position_embeddings=4096, rms_norm_eps=1e-6,
                        rope_theta=10000.0, tie_word_embeddings=False, attention_bias=False,
                        num_nextn_predict_layers=1, topk_method="noaux_tc"),
})

# a wrapper's language model when its text_config gives no model_type (transformers' sub-config class)
WRAPPED_TEXT_TYPE: Mapping[str, str] = MappingProxyType({"gemma3": "gemma3_text"})

VISION_DEFAULTS: Mapping[str, Mapping[str, Any]] = MappingProxyType({
    "siglip_vision_model": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                                num_channels=3, image_size=224, patch_size=16, layer_norm_eps=1e-6),
})


def with_arch_defaults(cfg: Mapping[str, Any]) -> dict:
    """``cfg`` with its architecture's defaults under it: a field the file gives (even ``null``) wins.

    >>> with_arch_defaults({"model_type": "gemma2", "hidden_size": 3584})["tie_word_embeddings"]
    True
    """
    defaults = ARCH_DEFAULTS.get(str(cfg.get("model_type", "")), {})
    return {**defaults, **cfg}
