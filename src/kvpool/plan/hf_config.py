"""A Hugging Face ``config.json`` (as a dict) read field by field into the arguments of a `ModelSpec`.

A field the file leaves out takes its architecture's transformers default (`config_defaults`); a field
that is required and missing, or holds an odd value, is a ConfigError naming it. A multimodal wrapper's
language model (``text_config``, ``language_config``, ``llm_config``) is what is planned; its vision tower
is read by `kvpool.plan.vision`.
"""
from __future__ import annotations

from typing import Mapping

from ..errors import ConfigError
from .config_defaults import WRAPPED_TEXT_TYPE, with_arch_defaults
from .dtypes import SERVING_DTYPE_NAMES, find_dtype
from .rope_cache import rope_caches
from .vision import vision_fields

LANGUAGE_MODEL_KEYS = ("text_config", "language_config", "llm_config")
# architectures whose model code has these weights whatever the config says (transformers' and vLLM's code)
QK_NORM_TYPES = frozenset({"qwen3", "qwen3_moe", "gemma3_text"})  # q_norm / k_norm over head_dim
SINK_TYPES = frozenset({"gpt_oss"})  # self_attn.sinks: one learned logit per head
EXPERT_BIAS_TYPES = frozenset({"gpt_oss"})  # experts' gate_up_proj_bias / down_proj_bias, router bias


def _get(cfg: Mapping, *keys, default=..., kind=None):
    """First present key among ``keys``; ConfigError naming the field when required and absent or odd."""
    for key in keys:
        if key in cfg and cfg[key] is not None:
            value = cfg[key]
            break
    else:
        if default is ...:
            raise ConfigError(
                f"model config is missing the field {keys[0]!r}"
                + (f" (also looked for {', '.join(map(repr, keys[1:]))})" if len(keys) > 1 else "")
                + "; add it to config.json"
            )
        return default
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"model config field {key!r} must be a positive integer, got {value!r}")
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"model config field {key!r} must be a number, got {value!r}")
        value = float(value)
    elif kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"model config field {key!r} must be true or false, got {value!r}")
    return value


def _nonneg_int(cfg: Mapping, key: str, default: int = 0) -> int:
    value = cfg.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"model config field {key!r} must be a non-negative integer, got {value!r}")
    return value


def _dtype(cfg: Mapping) -> str:
    raw = cfg.get("torch_dtype", cfg.get("dtype", "bfloat16"))
    raw = "bfloat16" if raw is None else raw
    name = find_dtype(raw)
    if name not in SERVING_DTYPE_NAMES:
        raise ConfigError(
            f"model config field 'torch_dtype' is {raw!r}; expected one of float32, float16, bfloat16"
        )
    return name


def _sliding_windows(cfg: Mapping, num_layers: int) -> tuple:
    window = cfg.get("sliding_window")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window <= 0):
        raise ConfigError(f"model config field 'sliding_window' must be a positive integer or null, got {window!r}")
    layer_types = cfg.get("layer_types")
    disabled = "use_sliding_window" in cfg and not cfg.get("use_sliding_window")
    if disabled:
        # Qwen2/Qwen3: transformers sets sliding_window = None unless use_sliding_window, so a layer listed
        # as "sliding_attention" then attends to everything (vLLM reads the config the same way)
        window = None
    if layer_types is not None:
        if not isinstance(layer_types, list) or len(layer_types) != num_layers:
            raise ConfigError(
                f"model config field 'layer_types' must list one entry per layer ({num_layers}), got {layer_types!r:.80}"
            )
        out = []
        for i, kind in enumerate(layer_types):
            if kind == "sliding_attention":
                if window is None and not disabled:
                    raise ConfigError(f"layer {i} is 'sliding_attention' but 'sliding_window' is not set")
                out.append(window)
            elif kind == "full_attention":
                out.append(None)
            else:
                raise ConfigError(f"model config 'layer_types[{i}]' is {kind!r}; expected sliding_attention or full_attention")
        return tuple(out)
    if window is None:
        return (None,) * num_layers
    pattern = cfg.get("sliding_window_pattern")
    if pattern is not None:
        # Gemma-2 / Gemma-3 / Cohere2: every `pattern`-th layer is global, the others slide (transformers
        # builds `layer_types` as "sliding" if (i + 1) % pattern else "full"; Gemma-2's pattern is 2).
        pattern = _get(cfg, "sliding_window_pattern", kind=int)
        return tuple(window if (i + 1) % pattern else None for i in range(num_layers))
    if "use_sliding_window" in cfg:
        # Qwen2: the window applies only when enabled, to layers from `max_window_layers` on.
        if not cfg.get("use_sliding_window"):
            return (None,) * num_layers
        first = _nonneg_int(cfg, "max_window_layers", num_layers)
        return tuple(window if i >= first else None for i in range(num_layers))
    # Mistral-7B v0.1 style: every layer uses the window.
    return (window,) * num_layers


def _rope_fields(cfg: Mapping) -> Mapping:
    """Where ``rope_theta`` lives: the config itself, or transformers 5's ``rope_parameters`` (per layer type
    for Gemma-3, whose global layers' theta is the one that matters for long contexts)."""
    rope = cfg.get("rope_parameters")
    if isinstance(rope, Mapping) and isinstance(rope.get("full_attention"), Mapping):
        rope = rope["full_attention"]
    return rope if isinstance(rope, Mapping) and rope.get("rope_theta") is not None else cfg


def _quantization(cfg: Mapping) -> dict:
    q = cfg.get("quantization_config")
    if not q:
        return {}
    if not isinstance(q, Mapping):
        raise ConfigError(f"model config field 'quantization_config' must be an object, got {q!r:.80}")
    method = str(q.get("quant_method", "")).lower()
    skip = tuple(q.get("modules_to_not_convert") or q.get("ignore") or q.get("ignored_layers") or ())
    if method in ("fp8", "fbgemm_fp8"):
        block = q.get("weight_block_size") or ()
        if block and (len(block) != 2 or not all(isinstance(b, int) and b > 0 for b in block)):
            raise ConfigError(f"quantization_config 'weight_block_size' must be two positive ints, got {block!r}")
        return dict(quant_method="fp8", weight_bits=8, quant_block_size=tuple(block), modules_not_quantized=skip)
    if method in ("awq", "gptq"):
        bits = q.get("bits", q.get("w_bit"))
        group = q.get("group_size", q.get("q_group_size", 128))
        if bits not in (2, 3, 4, 8):
            raise ConfigError(f"quantization_config 'bits' must be 2, 3, 4 or 8 for {method}, got {bits!r}")
        if not isinstance(group, int) or (group <= 0 and group != -1):
            raise ConfigError(f"quantization_config 'group_size' must be a positive int or -1, got {group!r}")
        # AWQ and GPTQ checkpoints both store packed zero points (GPTQ stores them even when sym=true)
        return dict(quant_method=method, weight_bits=bits, quant_group_size=group, quant_zero_point=True,
                    modules_not_quantized=skip)
    if method in ("w8a8", "int8", "w8a8_int8", "smoothquant"):
        return dict(quant_method="int8", weight_bits=8, modules_not_quantized=skip)
    if method == "mxfp4":  # gpt-oss: 4-bit e2m1 values, one e8m0 scale per 32, on the MoE experts only
        return dict(quant_method="mxfp4", weight_bits=4, quant_group_size=32, modules_not_quantized=skip)
    if method == "compressed-tensors":
        groups = q.get("config_groups") or {}
        try:
            weights = next(iter(groups.values()))["weights"]
            bits = int(weights["num_bits"])
            wtype = str(weights.get("type", "int"))
            group = weights.get("group_size") or 0
        except (StopIteration, KeyError, TypeError, ValueError):
            raise ConfigError(
                "quantization_config (compressed-tensors) needs config_groups.<name>.weights.num_bits"
            ) from None
        name = "fp8" if (wtype == "float" and bits == 8) else ("int8" if bits == 8 else "int4")
        return dict(quant_method=name, weight_bits=bits, quant_group_size=int(group), modules_not_quantized=skip)
    raise ConfigError(
        f"quantization_config 'quant_method' is {method!r}; supported: fp8, fbgemm_fp8, awq, gptq, w8a8/int8, "
        "compressed-tensors, mxfp4"
    )


def _attention_shape(cfg: Mapping, hidden: int, heads: int, kv_heads: int) -> dict:
    """Head sizes and KV heads: MLA's latent and rope parts, or ``head_dim`` (given, else hidden // heads)."""
    kv_lora = _nonneg_int(cfg, "kv_lora_rank")
    if kv_lora > 0:
        rope = _get(cfg, "qk_rope_head_dim", kind=int)
        nope = _get(cfg, "qk_nope_head_dim", kind=int)
        # MLA decompresses the latent into one K/V head per query head
        return dict(is_mla=True, kv_lora_rank=kv_lora, qk_rope_head_dim=rope, qk_nope_head_dim=nope,
                    head_dim=nope + rope, v_head_dim=_get(cfg, "v_head_dim", kind=int), num_kv_heads=heads)
    if cfg.get("head_dim") is not None:
        head_dim = _get(cfg, "head_dim", kind=int)
    elif hidden % heads:
        raise ConfigError(
            f"hidden_size ({hidden}) is not a multiple of num_attention_heads ({heads}) and no 'head_dim' is given"
        )
    else:
        head_dim = hidden // heads
    return dict(head_dim=head_dim, v_head_dim=_nonneg_int(cfg, "v_head_dim") or head_dim, num_kv_heads=kv_heads)


def _dense_mlp_layers(cfg: Mapping, num_layers: int, first_dense: int) -> tuple:
    """Layers past ``first_k_dense_replace`` that keep a dense MLP: Qwen-MoE's ``mlp_only_layers`` and
    ``decoder_sparse_step`` (MoE where ``(i + 1) % step == 0``), DeepSeek's ``moe_layer_freq`` (MoE where
    ``i % freq == 0``), as vLLM's ``qwen3_moe.py`` / ``deepseek_v2.py`` decoder layers decide."""
    only = cfg.get("mlp_only_layers") or []
    if not isinstance(only, (list, tuple)) or any(isinstance(i, bool) or not isinstance(i, int) for i in only):
        raise ConfigError(f"model config field 'mlp_only_layers' must be a list of layer indices, got {only!r:.80}")
    step = _nonneg_int(cfg, "decoder_sparse_step", 1) or 1
    freq = _nonneg_int(cfg, "moe_layer_freq", 1) or 1
    return tuple(i for i in range(first_dense, num_layers) if i in only or (i + 1) % step or i % freq)


def _moe(cfg: Mapping, intermediate: int, num_layers: int) -> dict:
    """The mixture-of-experts fields ({} for a dense model)."""
    experts = _nonneg_int(cfg, "num_local_experts") or _nonneg_int(cfg, "n_routed_experts") or _nonneg_int(cfg, "num_experts")
    if not experts:
        return {}
    top_k = _get(cfg, "num_experts_per_tok", "top_k", "moe_top_k", kind=int)
    if top_k > experts:
        raise ConfigError(f"num_experts_per_tok ({top_k}) is larger than the number of experts ({experts})")
    moe = dict(
        num_experts=experts,
        num_experts_per_tok=top_k,
        moe_intermediate_size=_nonneg_int(cfg, "moe_intermediate_size") or intermediate,
        num_shared_experts=_nonneg_int(cfg, "n_shared_experts"),
        shared_expert_intermediate_size=_nonneg_int(cfg, "shared_expert_intermediate_size"),
        first_dense_layers=_nonneg_int(cfg, "first_k_dense_replace"),
        router_bias=cfg.get("topk_method") == "noaux_tc" or cfg.get("model_type") in EXPERT_BIAS_TYPES,
        expert_bias=cfg.get("model_type") in EXPERT_BIAS_TYPES,
    )
    if moe["first_dense_layers"] > num_layers:
        raise ConfigError(f"first_k_dense_replace ({moe['first_dense_layers']}) exceeds num_hidden_layers ({num_layers})")
    moe["mlp_only_layers"] = _dense_mlp_layers(cfg, num_layers, moe["first_dense_layers"])
    return moe


def _soft_caps(cfg: Mapping) -> dict:
    """Gemma's attention and final logit soft-capping (None when absent)."""
    out = {}
    for key, field in (("attn_logit_softcapping", "logit_soft_cap"), ("final_logit_softcapping", "final_logit_soft_cap")):
        value = cfg.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
            raise ConfigError(f"model config field {key!r} must be a positive number or null, got {value!r}")
        out[field] = float(value) if value is not None else None
    return out


def _language_model(cfg: Mapping) -> tuple[Mapping, Mapping | None]:
    """(the language model's config, the multimodal wrapper or None): a wrapper's text/language/llm config,
    typed by its ``model_type`` (else the wrapper's sub-config type), with the wrapper's dtype, name and
    quantization where the inner config has none."""
    key = next((k for k in LANGUAGE_MODEL_KEYS if isinstance(cfg.get(k), Mapping)), None)
    if key is None or "hidden_size" in cfg:
        return cfg, None
    inner = dict(cfg[key])
    wrapper_type = str(cfg.get("model_type") or "")
    if not inner.get("model_type") and wrapper_type in WRAPPED_TEXT_TYPE:
        inner["model_type"] = WRAPPED_TEXT_TYPE[wrapper_type]
    if inner.get("torch_dtype") is None and inner.get("dtype") is None:
        inner["torch_dtype"] = cfg.get("torch_dtype") or cfg.get("dtype")
    for field in ("_name_or_path", "quantization_config"):
        if inner.get(field) is None and cfg.get(field) is not None:
            inner[field] = cfg[field]
    return inner, cfg


def _buffers_and_tower(cfg: Mapping, wrapper: Mapping | None, attention: dict, max_pos: int, windows: tuple,
                       hidden: int) -> dict:
    """vLLM's rope caches and a multimodal wrapper's vision tower."""
    if attention.get("is_mla"):
        rotary = attention["qk_rope_head_dim"]
    else:
        factor = _get(cfg, "partial_rotary_factor", default=1.0, kind=float)
        rotary = int(attention["head_dim"] * factor)
    out = {"rope_caches": rope_caches(cfg, rotary, max_pos, any(w is not None for w in windows))}
    if wrapper is not None:
        out.update(vision_fields(wrapper, hidden))
    return out


def config_fields(cfg: Mapping, name: str | None = None) -> dict:
    """The `ModelSpec` fields of a Hugging Face config dict; ConfigError names any missing or odd field."""
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"model config must be a JSON object, got {type(cfg).__name__}")
    cfg, wrapper = _language_model(cfg)
    cfg = with_arch_defaults(cfg)
    name = name or str(cfg.get("_name_or_path") or cfg.get("model_type") or "model")
    model_type = str(cfg.get("model_type", ""))
    num_layers = _get(cfg, "num_hidden_layers", "n_layer", "num_layers", kind=int)
    hidden = _get(cfg, "hidden_size", "n_embd", "d_model", kind=int)
    heads = _get(cfg, "num_attention_heads", "n_head", kind=int)
    kv_heads = _get(cfg, "num_key_value_heads", "num_kv_heads", default=heads, kind=int)
    if heads % kv_heads:
        raise ConfigError(
            f"num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kv_heads}); fix config.json"
        )
    vocab = _get(cfg, "vocab_size", kind=int)
    intermediate = _get(cfg, "intermediate_size", "n_inner", "ffn_dim", kind=int)
    max_pos = _get(cfg, "max_position_embeddings", "n_positions", "max_seq_len", default=4096, kind=int)
    eps = _get(cfg, "rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", default=1e-6, kind=float)
    theta = _get(_rope_fields(cfg), "rope_theta", default=10000.0, kind=float)
    tie = _get(cfg, "tie_word_embeddings", default=False, kind=bool)

    attention = _attention_shape(cfg, hidden, heads, kv_heads)
    moe, soft_caps = _moe(cfg, intermediate, num_layers), _soft_caps(cfg)
    qkv_bias = bool(cfg.get("attention_bias", False)) or model_type in ("qwen2", "qwen2_moe")
    windows = _sliding_windows(cfg, num_layers)
    return dict(
        name=name,
        num_layers=num_layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        vocab_size=vocab,
        tie_word_embeddings=tie,
        dtype=_dtype(cfg),
        max_position_embeddings=max_pos,
        rms_norm_eps=eps,
        rope_theta=theta,
        layer_sliding_windows=windows,
        model_type=model_type,
        checkpoint=str(cfg.get("_name_or_path") or ""),
        qkv_bias=qkv_bias,
        o_bias=bool(cfg.get("attention_bias", False)),
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        norms_per_layer=4 if model_type in ("gemma2", "gemma3_text") else 2,
        qk_norm=model_type in QK_NORM_TYPES,
        attention_sinks=model_type in SINK_TYPES,
        q_lora_rank=_nonneg_int(cfg, "q_lora_rank"),
        num_mtp_layers=_nonneg_int(cfg, "num_nextn_predict_layers"),
        **attention,
        **soft_caps,
        **moe,
        **_quantization(cfg),
        **_buffers_and_tower(cfg, wrapper, attention, max_pos, windows, hidden),
    )
