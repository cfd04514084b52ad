"""Parameter counts against real transformers model code, built on the meta device (nothing downloaded)."""
import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from kvpool.plan import load_model_spec  # noqa: E402
from kvpool.plan.model import PRESET_DIR  # noqa: E402


def _hf_count(cfg: dict) -> int:
    config = transformers.AutoConfig.for_model(cfg["model_type"], **{k: v for k, v in cfg.items() if k != "model_type"})
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    seen, total = set(), 0
    for p in model.parameters():  # tied weights appear once
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    # DeepSeek-V3's router bias is a buffer in transformers but a tensor of the checkpoint: count it
    total += sum(b.numel() for n, b in model.named_buffers() if n.endswith("e_score_correction_bias"))
    return total


@pytest.mark.parametrize("name,layers", [("llama-3.1-8b", 2), ("qwen2.5-7b", 2), ("mistral-7b", 2),
                                         ("mixtral-8x7b", 2), ("gemma-2-9b", 2), ("deepseek-v3", 4)])
def test_parameter_count_equals_transformers(name, layers):
    cfg = json.loads((PRESET_DIR / f"{name}.json").read_text())
    cfg["num_hidden_layers"] = layers  # fewer layers keep the meta model small; the per-layer terms are the same
    cfg.pop("quantization_config", None)
    if name == "deepseek-v3":
        cfg["n_routed_experts"] = 16
        cfg["num_nextn_predict_layers"] = 0
        cfg["n_group"], cfg["topk_group"] = 4, 2
    assert load_model_spec(cfg).num_parameters == _hf_count(cfg)
