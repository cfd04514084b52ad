"""Model shape (`ModelSpec`) read from a Hugging Face ``config.json``, a folder holding one, or a preset.

Presets are config.json files under ``presets/`` parsed by the same code as a user's file, so a preset
and the real checkpoint's config give the same plan.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ..errors import ConfigError
from .config_defaults import with_arch_defaults
from .hf_cache import cached_config, hub_cache_dir, is_repo_id

PRESET_DIR = Path(__file__).with_name("presets")

_DTYPES = {
    "float32": "fp32", "fp32": "fp32", "float": "fp32",
    "float16": "fp16", "fp16": "fp16", "half": "fp16",
    "bfloat16": "bf16", "bf16": "bf16",
}


@dataclass(frozen=True)
class ModelSpec:
    """Everything the planner and the page allocator need to know about a decoder-only model.

    All fields are JSON-able (ints, floats, strings, bools, None and tuples of them).
    ``head_dim`` is the attention head size (Q and K; for MLA the "nope" + "rope" query size);
    ``v_head_dim`` is V's head size (equal to ``head_dim`` unless the config says otherwise).
    ``layer_sliding_windows[i]`` is layer i's attention window in tokens, or None for full attention.
    """

    name: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    dtype: str
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    is_mla: bool = False
    kv_lora_rank: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    layer_sliding_windows: tuple = ()
    logit_soft_cap: float | None = None
    # architecture details that change the parameter count / activation shapes
    model_type: str = ""
    checkpoint: str = ""  # the config's `_name_or_path` (e.g. "mistralai/Mistral-7B-v0.1")
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    norms_per_layer: int = 2
    final_logit_soft_cap: float | None = None
    q_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    # mixture of experts (num_experts == 0: dense MLP everywhere)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    num_shared_experts: int = 0
    shared_expert_intermediate_size: int = 0
    first_dense_layers: int = 0
    router_bias: bool = False
    num_mtp_layers: int = 0
    # weight quantization of the checkpoint (None: weights stored in ``dtype``)
    quant_method: str | None = None
    weight_bits: int = 16
    quant_group_size: int = 0
    quant_block_size: tuple = ()
    quant_zero_point: bool = False
    modules_not_quantized: tuple = ()
    # where the spec was read from ("preset llama-3.1-8b", a config.json path, the local Hugging Face cache);
    # not part of the model's identity: left out of equality and of to_dict()
    source: str = dataclasses.field(default="", compare=False)

    # ---------------------------------------------------------------- derived shapes
    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def is_moe_layer(self, layer: int) -> bool:
        return self.is_moe and layer >= self.first_dense_layers

    @property
    def num_moe_layers(self) -> int:
        return max(0, self.num_layers - self.first_dense_layers) if self.is_moe else 0

    @property
    def q_head_dim(self) -> int:
        """Per-head size of Q (and of K for non-MLA models)."""
        return self.head_dim

    @property
    def sliding_layers(self) -> int:
        return sum(1 for w in self.layer_sliding_windows if w is not None)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        del d["source"]
        for key, value in d.items():
            if isinstance(value, tuple):
                d[key] = list(value)
        return d

    # ---------------------------------------------------------------- parameter counts
    def parameter_counts(self) -> dict:
        """Parameter counts by part (ints). ``total`` excludes multi-token-prediction layers (as published)."""
        from .weights import parameter_counts

        return parameter_counts(self)

    @property
    def num_parameters(self) -> int:
        return self.parameter_counts()["total"]


# ------------------------------------------------------------------------------- parsing
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
    key = str(raw).replace("torch.", "").lower()
    if key not in _DTYPES:
        raise ConfigError(
            f"model config field 'torch_dtype' is {raw!r}; expected one of float32, float16, bfloat16"
        )
    return _DTYPES[key]


def _sliding_windows(cfg: Mapping, num_layers: int) -> tuple:
    window = cfg.get("sliding_window")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window <= 0):
        raise ConfigError(f"model config field 'sliding_window' must be a positive integer or null, got {window!r}")
    layer_types = cfg.get("layer_types")
    model_type = cfg.get("model_type", "")
    if layer_types is not None:
        if not isinstance(layer_types, list) or len(layer_types) != num_layers:
            raise ConfigError(
                f"model config field 'layer_types' must list one entry per layer ({num_layers}), got {layer_types!r:.80}"
            )
        out = []
        for i, kind in enumerate(layer_types):
            if kind == "sliding_attention":
                if window is None:
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
        "compressed-tensors"
    )


def spec_from_config(cfg: Mapping, name: str | None = None) -> ModelSpec:
    """Build a ModelSpec from a Hugging Face config dict; ConfigError names any missing or odd field."""
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"model config must be a JSON object, got {type(cfg).__name__}")
    if "text_config" in cfg and "hidden_size" not in cfg:  # multimodal wrappers hold the LM in text_config
        inner = dict(cfg["text_config"])
        inner.setdefault("torch_dtype", cfg.get("torch_dtype"))
        cfg = inner
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

    kv_lora = _nonneg_int(cfg, "kv_lora_rank")
    is_mla = kv_lora > 0
    if is_mla:
        rope = _get(cfg, "qk_rope_head_dim", kind=int)
        nope = _get(cfg, "qk_nope_head_dim", kind=int)
        v_dim = _get(cfg, "v_head_dim", kind=int)
        head_dim = nope + rope
        kv_heads = heads  # MLA decompresses the latent into one K/V head per query head
    else:
        rope, nope = 0, 0
        explicit = cfg.get("head_dim")
        if explicit is not None:
            head_dim = _get(cfg, "head_dim", kind=int)
        else:
            if hidden % heads:
                raise ConfigError(
                    f"hidden_size ({hidden}) is not a multiple of num_attention_heads ({heads}) and no 'head_dim' is given"
                )
            head_dim = hidden // heads
        v_dim = _nonneg_int(cfg, "v_head_dim") or head_dim

    experts = _nonneg_int(cfg, "num_local_experts") or _nonneg_int(cfg, "n_routed_experts") or _nonneg_int(cfg, "num_experts")
    moe = {}
    if experts:
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
            router_bias=cfg.get("topk_method") == "noaux_tc",
        )
        if moe["first_dense_layers"] > num_layers:
            raise ConfigError(f"first_k_dense_replace ({moe['first_dense_layers']}) exceeds num_hidden_layers ({num_layers})")

    soft_cap = cfg.get("attn_logit_softcapping")
    final_cap = cfg.get("final_logit_softcapping")
    for key, value in (("attn_logit_softcapping", soft_cap), ("final_logit_softcapping", final_cap)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
            raise ConfigError(f"model config field {key!r} must be a positive number or null, got {value!r}")

    qkv_bias = bool(cfg.get("attention_bias", False)) or model_type in ("qwen2", "qwen2_moe")
    return ModelSpec(
        name=name,
        num_layers=num_layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=intermediate,
        vocab_size=vocab,
        tie_word_embeddings=tie,
        dtype=_dtype(cfg),
        max_position_embeddings=max_pos,
        rms_norm_eps=eps,
        rope_theta=theta,
        is_mla=is_mla,
        kv_lora_rank=kv_lora,
        qk_rope_head_dim=rope,
        v_head_dim=v_dim,
        layer_sliding_windows=_sliding_windows(cfg, num_layers),
        logit_soft_cap=float(soft_cap) if soft_cap is not None else None,
        model_type=model_type,
        checkpoint=str(cfg.get("_name_or_path") or ""),
        qkv_bias=qkv_bias,
        o_bias=bool(cfg.get("attention_bias", False)),
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        norms_per_layer=4 if model_type in ("gemma2", "gemma3_text") else 2,
        final_logit_soft_cap=float(final_cap) if final_cap is not None else None,
        q_lora_rank=_nonneg_int(cfg, "q_lora_rank"),
        qk_nope_head_dim=nope,
        num_mtp_layers=_nonneg_int(cfg, "num_nextn_predict_layers"),
        **moe,
        **_quantization(cfg),
    )


def list_presets() -> list[str]:
    """Names of the built-in presets (file stems under ``presets/``), sorted."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}); fix the file") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None


# words that name a variant of the same weights' shapes, not another model ("-Instruct", "-chat-hf", "-it")
_VARIANT_WORDS = frozenset({"instruct", "chat", "hf", "it", "base"})


def _model_key(name: str) -> str:
    """A model name without case, organisation, Meta's "Meta-" prefix and variant words.

    >>> _model_key("meta-llama/Meta-Llama-3.1-70B-Instruct")
    'llama-3.1-70b'
    >>> _model_key("mistralai/Mistral-7B-Instruct-v0.3")
    'mistral-7b-v0.3'
    """
    leaf = name.strip().lower().rsplit("/", 1)[-1]
    leaf = leaf.removeprefix("meta-") if leaf.startswith("meta-llama") else leaf
    return "-".join(w for w in leaf.split("-") if w not in _VARIANT_WORDS)


def preset_for(name: str) -> str | None:
    """The preset of the model ``name`` names (a Hugging Face repo id or a variant of a preset's name):
    its key equals the preset's name or its checkpoint's (``_name_or_path``) key; None when none does."""
    key = _model_key(name)
    for preset in list_presets():
        checkpoint = str(_read_json(PRESET_DIR / f"{preset}.json").get("_name_or_path") or "")
        if key in (preset, _model_key(checkpoint) if checkpoint else None):
            return preset
    return None


def _from_repo_id(text: str) -> ModelSpec | None:
    """A Hugging Face repo id: its config.json in the local cache, else the preset of the same model."""
    if not is_repo_id(text):
        return None
    cached = cached_config(text)
    if cached is not None:
        spec = spec_from_config(_read_json(cached), name=text)
        return dataclasses.replace(spec, source=f"config.json of {text} in the local Hugging Face cache ({cached})")
    preset = preset_for(text)
    if preset is None:
        return None
    checkpoint = str(_read_json(PRESET_DIR / f"{preset}.json").get("_name_or_path") or preset)
    spec = spec_from_config(_read_json(PRESET_DIR / f"{preset}.json"), name=text)
    return dataclasses.replace(spec, source=f"preset {preset} (config.json of {checkpoint}; {text} is not in the "
                                            f"Hugging Face cache {hub_cache_dir()})")


def load_model_spec(model: "str | os.PathLike | Mapping[str, Any] | ModelSpec") -> ModelSpec:
    """Load a ModelSpec from a preset name, a config.json path, a folder holding one, a Hugging Face repo id,
    or an HF config dict.

    A repo id (``meta-llama/Llama-3.1-70B-Instruct``, as ``vllm serve`` takes it) reads the repo's
    config.json from the local Hugging Face cache when it was downloaded, else the preset of the same model
    (case, organisation and variant words such as -Instruct, -chat, -hf, -it ignored); the network is never
    used. ``spec.source`` says which was read.

    Raises
    ------
    ConfigError
        Unknown preset (the message lists close names), unreadable file, or a config field missing or odd.
    """
    if isinstance(model, ModelSpec):
        return model
    if isinstance(model, Mapping):
        return dataclasses.replace(spec_from_config(model), source="config dict")
    if not isinstance(model, (str, os.PathLike)):
        raise ConfigError(f"model must be a preset name, a path or a config dict, got {type(model).__name__}")
    text = os.fspath(model)
    key = text.strip().lower()
    preset = PRESET_DIR / f"{key}.json"
    if "/" not in key and os.sep not in key and preset.is_file():
        return dataclasses.replace(spec_from_config(_read_json(preset), name=key), source=f"preset {key}")
    path = Path(text).expanduser()
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"folder {text!r} holds no config.json; point at the checkpoint folder or a config.json file")
    if path.is_file():
        cfg = _read_json(path)
        spec = spec_from_config(cfg, name=str(cfg.get("_name_or_path") or path.parent.name or path.stem))
        return dataclasses.replace(spec, source=f"config.json at {path.resolve()}")
    spec = _from_repo_id(text.strip())
    if spec is not None:
        return spec
    names = list_presets()
    close = difflib.get_close_matches(_model_key(key) if is_repo_id(key) else key, names, n=4, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else f"known presets: {', '.join(names)}"
    cache = f", nor a repo in the local Hugging Face cache {hub_cache_dir()}" if is_repo_id(text.strip()) else ""
    raise ConfigError(f"unknown model {text!r}: not a preset, not a config.json path{cache}; {hint}")
