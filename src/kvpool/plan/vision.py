"""The vision tower of a multimodal checkpoint, as far as its weights go.

A multimodal wrapper (Gemma-3's ``Gemma3ForConditionalGeneration``) holds the language model under
``text_config`` and the image encoder under ``vision_config``. vLLM loads both onto every GPU: the planner
plans the language model and adds the tower's weights (`kvpool.plan.weights`). Known towers:

- ``siglip_vision_model`` (vLLM ``siglip.py``: ``SiglipVisionEmbeddings``, ``SiglipEncoderLayer``, the
  post layer norm; no pooling head, Gemma-3 builds ``SiglipVisionModel`` with ``use_head=False``)
- Gemma-3's projector (``gemma3_mm.py Gemma3MultiModalProjector``): one ``vision_hidden x text_hidden``
  matrix and an RMS norm over the vision hidden size, replicated on every rank.

A tower of another type is not counted; the spec names it (``vision_uncounted``) and the plan says so.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from ..errors import ConfigError
from .config_defaults import VISION_DEFAULTS

# wrapper model_type -> the projector vLLM builds between the tower and the language model
PROJECTORS = {"gemma3": "gemma3"}


@dataclass(frozen=True)
class VisionTower:
    """A ViT-style image encoder's shape (SigLIP) and the projector into the language model."""

    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_channels: int
    patch_size: int
    image_size: int
    projector: str  # "gemma3" or "" (none counted)
    text_hidden_size: int  # the projector's output size
    # tokens one image puts in the language model's sequence (0: one per patch, no pooling); Gemma-3's projector
    # pools to the wrapper's mm_tokens_per_image (transformers Gemma3Config default 256)
    tokens_per_image: int = 0

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def _positive(cfg: Mapping, key: str) -> int:
    value = cfg.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"vision_config field {key!r} must be a positive integer, got {value!r}")
    return value


def _tokens_per_image(wrapper: Mapping) -> int:
    """Gemma-3: ``mm_tokens_per_image`` (default 256, transformers ``Gemma3Config``); other wrappers: 0 (patches)."""
    if PROJECTORS.get(str(wrapper.get("model_type"))) != "gemma3":
        return 0
    tokens = wrapper.get("mm_tokens_per_image", 256)
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens <= 0:
        raise ConfigError(f"mm_tokens_per_image must be a positive integer, got {tokens!r}")
    return tokens


def vision_fields(wrapper: Mapping, text_hidden: int) -> dict:
    """``{"vision": VisionTower}`` for a known tower, ``{"vision_uncounted": type}`` for another, ``{}`` without."""
    vision = wrapper.get("vision_config")
    if not isinstance(vision, Mapping):
        return {}
    model_type = str(vision.get("model_type") or "")
    if model_type not in VISION_DEFAULTS:
        return {"vision_uncounted": model_type or "unnamed"}
    cfg = {**VISION_DEFAULTS[model_type], **vision}
    sizes = {k: _positive(cfg, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                            "num_attention_heads", "num_channels", "patch_size", "image_size")}
    if sizes["hidden_size"] % sizes["num_attention_heads"]:
        raise ConfigError(f"vision_config hidden_size ({sizes['hidden_size']}) is not a multiple of "
                          f"num_attention_heads ({sizes['num_attention_heads']})")
    tower = VisionTower(model_type, sizes["hidden_size"], sizes["intermediate_size"], sizes["num_hidden_layers"],
                        sizes["num_attention_heads"], sizes["num_channels"], sizes["patch_size"],
                        sizes["image_size"], PROJECTORS.get(str(wrapper.get("model_type")), ""), text_hidden,
                        _tokens_per_image(wrapper))
    return {"vision": tower}
