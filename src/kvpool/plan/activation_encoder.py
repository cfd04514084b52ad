"""The multimodal encoder profile of vLLM's profile run (a SigLIP-style vision tower, Gemma-3).

Before the dummy prefill, ``profile_run`` (vllm/v1/worker/gpu_model_runner.py) encodes a batch of dummy
images of the largest feature size and stores the outputs in ``encoder_cache``, which is cleared only
after the sampler warm-up:

- items: ``MultiModalBudget._get_max_items`` (vllm/multimodal/encoder_budget.py): the encoder budget
  (``max_num_batched_tokens``, at least one item's tokens) divided by the tokens of one item, at least 1
  (the decoder's limit, ``max_num_seqs`` x items per prompt, is far larger by default). Gemma-3 without
  pan-and-scan: 256 tokens per image, so 8,192 tokens profile 32 images;
- the pixel values ``[items, channels, image, image]``, cast to the model dtype by the processor
  (multimodal/processing/context.py), stay referenced by ``profile_run`` until it returns;
- the tower runs eagerly (no ``torch.compile`` for the encoder by default). ``SiglipEncoder.forward``
  keeps its input embeddings in ``hidden_states_pool``, the layer's input stays bound in the caller's
  loop, and ``SiglipEncoderLayer``/``SiglipMLP`` hold the residual, the normed input, ``fc1``'s output and
  the GELU's output at once: ``N x (4 x hidden + 2 x intermediate / tp)`` for ``N = items x patches``
  (fc1 is column-parallel under vLLM's default ``mm_encoder_tp_mode="weights"``). Attention is
  FlashAttention varlen on views of the fused qkv (no ``N x N`` scores) and smaller than the MLP;
- the projected outputs ``[items, tokens, text hidden]`` stay in ``encoder_cache`` through the prefill
  and the sampler warm-up.

Derived from reading the vLLM 0.19 source, not measured.
"""
from __future__ import annotations

from .activation_phase import Phase, ProfileShape


def tokens_per_image(tower) -> int:
    """Tokens one image puts in the language model's sequence (and in ``encoder_cache``).

    Gemma-3 pools each image to ``mm_tokens_per_image`` (256): vLLM's ``Gemma3ProcessingInfo.
    get_num_image_tokens`` gives ``(crops + 1) x 256`` and pan-and-scan (the crops) is off by default. A tower
    without pooling puts one token per patch.
    """
    return tower.tokens_per_image or tower.num_patches


def profiled_items(tower, shape: ProfileShape) -> int:
    """Images in the encoder profile: the encoder budget over one image's tokens, at least one.

    >>> from kvpool.plan.vision import VisionTower
    >>> siglip = VisionTower("siglip_vision_model", 1152, 4304, 27, 16, 3, 14, 896, "gemma3", 5376, 256)
    >>> profiled_items(siglip, ProfileShape(tokens=8192, seqs=1024)), profiled_items(siglip, ProfileShape(100, 1))
    (32, 1)
    """
    per_item = tokens_per_image(tower)
    budget = max(shape.tokens, per_item)  # SchedulerConfig: encoder budget = max_num_batched_tokens
    decoder = shape.seqs * max(1, (shape.max_model_len or budget) // per_item)
    return max(1, min(budget // per_item, decoder))


def encoder_phase(tower, shape: ProfileShape) -> Phase:
    """The vision tower's largest moment (an MLP of a later layer); pixels and outputs are kept.

    >>> from kvpool.plan.vision import VisionTower
    >>> siglip = VisionTower("siglip_vision_model", 1152, 4304, 27, 16, 3, 14, 896, "gemma3", 5376, 256)
    >>> phase = encoder_phase(siglip, ProfileShape(tokens=8192, seqs=1024))
    >>> pixels, outputs = 32 * 3 * 896 * 896 * 2, 32 * 256 * 5376 * 2
    >>> phase.live == pixels + 32 * 4096 * (4 * 1152 + 2 * 4304) * 2 and phase.kept == pixels + outputs
    True
    """
    b, tp = shape.dtype_bytes, shape.tp
    items = profiled_items(tower, shape)
    pixels = items * tower.num_channels * tower.image_size ** 2 * b
    patches = items * tower.num_patches
    inter = -(-tower.intermediate_size // tp)
    mlp = patches * (4 * tower.hidden_size + 2 * inter) * b
    outputs = items * tokens_per_image(tower) * tower.text_hidden_size * b
    return Phase("encoder", pixels + max(mlp, outputs), kept=pixels + outputs,
                 moment=f"vision MLP, {items} images × {tower.num_patches:,} patches")


__all__ = ["encoder_phase", "profiled_items", "tokens_per_image"]
