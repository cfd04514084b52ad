"""`ModelSpec` (a model's shape) and where it comes from: a preset, a ``config.json`` (or its folder), a
Hugging Face repo id, a dict. The config's fields are read by `kvpool.plan.hf_config`.

Presets are config.json files under ``presets/`` parsed by the same code as a user's file, so a preset
and the real checkpoint's config give the same plan. A repo id reads the local Hugging Face cache, else
the preset of the same model; the network is never used.
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
from .hf_cache import cached_config, hub_cache_dir, is_repo_id
from .hf_config import config_fields
from .vision import VisionTower

PRESET_DIR = Path(__file__).with_name("presets")


@dataclass(frozen=True)
class ModelSpec:
    """Everything the planner and the page allocator need to know about a decoder-only model.

    All fields are JSON-able (ints, floats, strings, bools, None and tuples of them).
    ``head_dim`` is the attention head size (Q and K; for MLA the "nope" + "rope" query size);
    ``v_head_dim`` is V's head size (equal to ``head_dim`` unless the config says otherwise).
    ``layer_sliding_windows[i]`` is layer i's attention window in tokens, or None for full attention.
    ``rope_caches`` are vLLM's rotary cos/sin caches, ``(rows, rotary_dim, dtype)`` each (dtype "" for the
    serving dtype, "fp32"; see `kvpool.plan.rope_cache`). ``vision`` is a multimodal checkpoint's image
    encoder (its weights count, the planner plans the language model); ``vision_uncounted`` names a tower
    whose weights the planner cannot count.
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
    qk_norm: bool = False  # an RMS norm over head_dim on q and on k (Qwen3, Gemma-3)
    attention_sinks: bool = False  # one learned logit per attention head and layer (gpt-oss)
    # mixture of experts (num_experts == 0: dense MLP everywhere)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    num_shared_experts: int = 0
    shared_expert_intermediate_size: int = 0
    first_dense_layers: int = 0
    mlp_only_layers: tuple = ()  # further layers with a dense MLP (Qwen-MoE mlp_only_layers / sparse step)
    router_bias: bool = False
    expert_bias: bool = False  # biases on the experts' gate/up and down projections (gpt-oss)
    num_mtp_layers: int = 0
    # weight quantization of the checkpoint (None: weights stored in ``dtype``)
    quant_method: str | None = None
    weight_bits: int = 16
    quant_group_size: int = 0
    quant_block_size: tuple = ()
    quant_zero_point: bool = False
    modules_not_quantized: tuple = ()
    # buffers vLLM allocates while loading, and a multimodal checkpoint's image encoder
    rope_caches: tuple = ()
    vision: VisionTower | None = None
    vision_uncounted: str = ""
    # where the spec was read from ("preset llama-3.1-8b", a config.json path, the local Hugging Face cache);
    # not part of the model's identity: left out of equality and of to_dict()
    source: str = dataclasses.field(default="", compare=False)

    # ---------------------------------------------------------------- derived shapes
    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def is_moe_layer(self, layer: int) -> bool:
        return self.is_moe and layer >= self.first_dense_layers and layer not in self.mlp_only_layers

    @property
    def num_moe_layers(self) -> int:
        return sum(1 for i in range(self.num_layers) if self.is_moe_layer(i))

    @property
    def sliding_layers(self) -> int:
        return sum(1 for w in self.layer_sliding_windows if w is not None)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        del d["source"]
        for key, value in d.items():
            if isinstance(value, tuple):
                d[key] = [list(v) if isinstance(v, tuple) else v for v in value]
        return d

    # ---------------------------------------------------------------- parameter counts
    def parameter_counts(self) -> dict:
        """Parameter counts by part (ints). ``total`` excludes multi-token-prediction layers (as published)."""
        from .weights import parameter_counts

        return parameter_counts(self)

    @property
    def num_parameters(self) -> int:
        return self.parameter_counts()["total"]


def spec_from_config(cfg: Mapping, name: str | None = None) -> ModelSpec:
    """Build a ModelSpec from a Hugging Face config dict; ConfigError names any missing or odd field."""
    return ModelSpec(**config_fields(cfg, name))


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
