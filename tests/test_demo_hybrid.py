"""The demo's hybrid model (Qwen2 with q/k/v biases, sliding-window layers mixed with full-attention
layers): kvpool's plain-torch model equals transformers' ``Qwen2ForCausalLM`` logit for logit."""
import pytest
import torch

from kvpool.demo.hf_reference import build_hf_model, hf_logits
from kvpool.demo.model import (TinyLlama, dense_causal_attention, layer_windows, random_llama_weights,
                               tiny_hybrid_config, tiny_llama_config)
from kvpool.errors import ConfigError
from kvpool.plan.kv_groups import kv_groups

SEED = 0
WINDOW = 32


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def config():
    return tiny_hybrid_config()


@pytest.fixture(scope="module")
def weights(config):
    return random_llama_weights(config, seed=SEED)


@pytest.fixture(scope="module")
def hf(config, weights):
    return build_hf_model(config, weights)


def dense_logits(model, prompt, windows):
    def attention(layer, q, k, v):
        return dense_causal_attention(q, k, v, model.scale, window=windows[layer])

    n = prompt.shape[0]
    return model.forward(prompt, torch.arange(n), attention, torch.arange(n))


def test_hybrid_config_has_a_windowed_and_a_full_group(config):
    assert layer_windows(config) == (WINDOW, None, WINDOW, None)
    groups = kv_groups(layer_windows(config))
    assert groups.windows == (WINDOW, None) and groups.group_size == 2
    assert [g.layers for g in groups.groups] == [(0, 2), (1, 3)]
    assert layer_windows(tiny_llama_config()) == (None,) * 4


def test_hybrid_logits_equal_transformers_over_several_windows(config, weights, hf):
    model = TinyLlama(config, weights)
    assert model.layer_windows == (WINDOW, None, WINDOW, None)
    assert model.layers[0]["qkv_bias"] is not None  # Qwen2's biases are loaded and used
    prompt = torch.randint(0, config["vocab_size"], (4 * WINDOW + 5,), generator=torch.Generator().manual_seed(3))
    ref = hf_logits(hf, prompt.tolist())
    torch.testing.assert_close(dense_logits(model, prompt, model.layer_windows), ref, rtol=1e-5, atol=1e-5)
    top2 = ref.topk(2, dim=-1).values
    assert (top2[:, 0] - top2[:, 1]).min() > 1e-4  # clear argmax winners: exact token equality is meaningful
    # the windows matter: the same weights with every layer attending to the whole prefix differ past the window
    full = dense_logits(model, prompt, (None,) * 4)
    torch.testing.assert_close(full[:WINDOW], ref[:WINDOW], rtol=1e-5, atol=1e-5)
    assert (full[WINDOW:] - ref[WINDOW:]).abs().max() > 1e-2


def test_qkv_biases_matter(config, weights, hf):
    unbiased = {k: (torch.zeros_like(v) if k.endswith("_proj.bias") else v) for k, v in weights.items()}
    prompt = torch.arange(40) * 7 % config["vocab_size"]
    logits = dense_logits(TinyLlama(config, unbiased), prompt, layer_windows(config))
    assert (logits - hf_logits(hf, prompt.tolist())).abs().max() > 1e-2


def test_llama_weights_unchanged_by_the_bias_option():
    weights = random_llama_weights(tiny_llama_config(), seed=SEED)
    assert not any(k.endswith(".bias") for k in weights)
    hybrid = random_llama_weights(tiny_hybrid_config(), seed=SEED)
    assert sum(k.endswith("_proj.bias") for k in hybrid) == 3 * 4


@pytest.mark.parametrize("q_start, n_q, window", [(0, 50, 32), (40, 5, 32), (40, 1, 1), (10, 3, 64), (7, 9, None)])
def test_windowed_dense_attention_reads_only_the_window(q_start, n_q, window):
    gen = torch.Generator().manual_seed(q_start + n_q)
    n_kv = q_start + n_q
    q = torch.randn(n_q, 4, 8, generator=gen)
    k, v = torch.randn(n_kv, 2, 8, generator=gen), torch.randn(n_kv, 2, 8, generator=gen)
    # reference: a boolean mask over every key
    qp, kp = torch.arange(q_start, n_kv)[:, None], torch.arange(n_kv)[None, :]
    visible = (kp <= qp) & ((kp > qp - window) if window is not None else True)
    kk, vv = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, kk) * 0.3
    want = torch.einsum("hqk,khd->qhd", torch.softmax(scores.masked_fill(~visible, float("-inf")), -1), vv)
    first = 0 if window is None else max(0, q_start - window + 1)
    k[:first], v[:first] = float("nan"), float("nan")  # released rows (padding) before the window
    torch.testing.assert_close(dense_causal_attention(q, k, v, 0.3, q_start=q_start, window=window), want)


def test_unknown_architecture_is_refused(weights):
    with pytest.raises(ConfigError, match="architecture 'GPT2LMHeadModel' has no transformers reference"):
        build_hf_model(tiny_llama_config(architectures=["GPT2LMHeadModel"]), weights)
