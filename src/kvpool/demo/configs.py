"""The demo's models as Hugging Face ``config.json`` dicts (built here, nothing downloaded; no torch import, so
``python -m kvpool.demo --help`` and its argument checks run without torch)."""
from __future__ import annotations

from ..errors import ConfigError


def tiny_llama_config(**overrides) -> dict:
    """The demo's model as a Hugging Face ``config.json`` dict (built here, nothing downloaded).

    4 layers, hidden 256, 8 query heads and 2 KV heads of dim 32 (GQA group 4), SwiGLU 512,
    vocabulary 512, fp32. No BOS/EOS: every request runs for exactly its ``max_new_tokens``.
    """
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 512,
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
    }
    config.update(overrides)
    return config


def tiny_hybrid_config(**overrides) -> dict:
    """A tiny hybrid model as a Hugging Face ``Qwen2ForCausalLM`` ``config.json`` dict.

    The tiny Llama's shapes plus Qwen2's q/k/v biases; layers 0 and 2 attend to a sliding window of
    32 tokens, layers 1 and 3 to the whole sequence (explicit ``layer_types``; transformers' Qwen2
    honours the window only with ``use_sliding_window`` set). Its KV-cache groups: one windowed group
    (layers 0, 2) and one full group (layers 1, 3), two page slots each.
    """
    config = tiny_llama_config()
    for key in ("attention_bias", "mlp_bias"):  # Qwen2 has q/k/v biases by construction, no such fields
        del config[key]
    config.update({
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "use_sliding_window": True,
        "sliding_window": 32,
        "layer_types": ["sliding_attention", "full_attention"] * 2,
    })
    config.update(overrides)
    return config


# --model NAME of the demo -> its config (both built here, nothing downloaded)
DEMO_MODELS = {"llama": tiny_llama_config, "hybrid": tiny_hybrid_config}


def demo_config(name: str) -> dict:
    """The config dict of the demo model ``name`` (:data:`DEMO_MODELS`)."""
    if name not in DEMO_MODELS:
        raise ConfigError(f"model {name!r} is not one of the demo's models {sorted(DEMO_MODELS)}; pick one of them")
    return DEMO_MODELS[name]()
