"""The independent reference: Hugging Face transformers' ``LlamaForCausalLM`` (or, for the hybrid
config, ``Qwen2ForCausalLM`` with its sliding-window layers) on the same weights.

The config is built locally from the demo's HF-style dict (nothing is downloaded) and greedy
generation uses transformers' own dense KV cache, so the demo's paged path is checked against code
nobody on this project wrote.
"""
from __future__ import annotations

import torch

from ..errors import ConfigError

# config["architectures"][0] -> transformers' (config class, model class) names
ARCHITECTURES = {
    "LlamaForCausalLM": ("LlamaConfig", "LlamaForCausalLM"),
    "Qwen2ForCausalLM": ("Qwen2Config", "Qwen2ForCausalLM"),
}


def build_hf_model(config: dict, weights: dict[str, torch.Tensor]):
    """The transformers model ``config["architectures"][0]`` names (:data:`ARCHITECTURES`), in fp32 eval
    mode with ``weights`` loaded strictly (every name must match)."""
    import transformers

    arch = (config.get("architectures") or ["LlamaForCausalLM"])[0]
    if arch not in ARCHITECTURES:
        raise ConfigError(f"architecture {arch!r} has no transformers reference here; use one of {sorted(ARCHITECTURES)}")
    config_cls, model_cls = (getattr(transformers, name) for name in ARCHITECTURES[arch])
    keys = {k: v for k, v in config.items() if k not in ("architectures", "model_type", "torch_dtype")}
    hf_config = config_cls(**keys)
    hf_config._attn_implementation = "eager"  # plain matmul + softmax: no fused-kernel surprises
    model = model_cls(hf_config).to(torch.float32).eval()
    missing, unexpected = model.load_state_dict(weights, strict=False)
    # rotary inv_freq is a non-persistent buffer; nothing else may be missing
    if [m for m in missing if "rotary" not in m] or unexpected:
        raise RuntimeError(f"weights do not fit {arch}: missing {missing}, unexpected {unexpected}")
    return model


@torch.inference_mode()
def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Greedy tokens of transformers' ``generate`` with its own cache (prompt excluded)."""
    ids = torch.tensor([prompt], dtype=torch.long)
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
        do_sample=False, use_cache=True, eos_token_id=None, pad_token_id=0,
    )
    return out[0, len(prompt):].tolist()


@torch.inference_mode()
def hf_logits(model, prompt: list[int]) -> torch.Tensor:
    """Logits ``[len(prompt), vocab]`` fp32 of one full forward pass."""
    return model(torch.tensor([prompt], dtype=torch.long)).logits[0]
