"""The rotary-embedding cos/sin caches vLLM keeps on the GPU beside the weights.

vLLM 0.19 builds each attention layer's rotary embedding with ``get_rope``
(``vllm/model_executor/layers/rotary_embedding/__init__.py``), which caches one module per distinct
(head size, rotary dim, max position, rope parameters, dtype): every layer with the same rope shares one
``cos_sin_cache`` buffer of ``rows x rotary_dim`` elements (cos and sin halves side by side), created on the
GPU while the model loads, so it is part of vLLM's "Model loading took X GiB". Its rows
(``RotaryEmbeddingBase._compute_cos_sin_cache`` and the scaled subclasses):

- default, llama3, longrope ...: ``max_position_embeddings`` (the config's, not ``--max-model-len``)
- linear (``LinearScalingRotaryEmbedding``) and dynamic NTK: ``max_position_embeddings x factor``
- yarn / deepseek_yarn (``YaRNScalingRotaryEmbedding``, ``DeepseekScalingRotaryEmbedding``):
  ``original_max_position_embeddings x factor``

Its dtype is the model's (torch's default dtype while vLLM builds the model), except where the model
code asks for float32 (gpt-oss: ``gpt_oss.py OAIAttention`` passes ``dtype=torch.float32``). Gemma-3's
sliding layers use a plain rope of ``rope_local_base_freq`` and its global layers the scaled one
(``gemma3.py Gemma3Attention``): two caches. Llama-3.1-8B's 131,072 x 128 bf16 cache (32 MiB) is why vLLM
logs 14.99 GiB for its 14.96 GiB of parameters; Gemma-3's global cache is 8 x 131,072 rows (512 MiB at
head_dim 256).
"""
from __future__ import annotations

from typing import Mapping

# model types whose model code builds the cache in float32 whatever the serving dtype
FLOAT32_ROPE_TYPES = frozenset({"gpt_oss"})
# model types whose sliding layers get a rope of their own (rope_local_base_freq), unscaled
LOCAL_ROPE_TYPES = frozenset({"gemma3_text"})


def _params(cfg: Mapping, layer_type: str) -> Mapping:
    """The rope parameters of ``layer_type``'s layers: transformers 5's ``rope_parameters`` (per layer type
    for Gemma-3), else transformers 4's ``rope_scaling`` (which Gemma-3 applies to its global layers only)."""
    rope = cfg.get("rope_parameters")
    if isinstance(rope, Mapping):
        if isinstance(rope.get(layer_type), Mapping):
            return rope[layer_type]
        if not any(isinstance(v, Mapping) for v in rope.values()):
            return rope
    if layer_type == "sliding_attention" and cfg.get("model_type") in LOCAL_ROPE_TYPES:
        return {}
    scaling = cfg.get("rope_scaling")
    return scaling if isinstance(scaling, Mapping) else {}


def cache_rows(params: Mapping, max_positions: int) -> int:
    """Rows of vLLM's cos/sin cache for one set of rope parameters.

    >>> cache_rows({"rope_type": "linear", "factor": 8.0}, 131072)  # Gemma-3's global layers
    1048576
    >>> cache_rows({"rope_type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096}, 131072)
    131072
    """
    kind = str(params.get("rope_type") or params.get("type") or "default")
    factor = params.get("factor") or 1.0
    if kind in ("linear", "dynamic") and "alpha" not in params:
        return int(max_positions * factor)
    if kind in ("yarn", "deepseek_yarn") and params.get("original_max_position_embeddings"):
        return int(params["original_max_position_embeddings"] * factor)
    return max_positions


def rope_caches(cfg: Mapping, rotary_dim: int, max_positions: int, has_sliding: bool) -> tuple:
    """vLLM's distinct cos/sin caches: ``((rows, rotary_dim, dtype), ...)``, dtype "" for the model's own
    or "fp32"; one entry per distinct rope (Gemma-3 with sliding layers: local, then global)."""
    dtype = "fp32" if cfg.get("model_type") in FLOAT32_ROPE_TYPES else ""
    kinds = ["full_attention"]
    if has_sliding and cfg.get("model_type") in LOCAL_ROPE_TYPES:
        kinds.insert(0, "sliding_attention")
    return tuple((cache_rows(_params(cfg, kind), max_positions), rotary_dim, dtype) for kind in kinds)
