"""The demo's hybrid model (Qwen2 with q/k/v biases, sliding-window layers mixed with full-attention
layers): kvpool's plain-torch model equals transformers' ``Qwen2ForCausalLM`` logit for logit."""
import pytest
import torch

from demo_util import assert_matches_hf, hf, one_thread, weights  # noqa: F401 (fixtures)

from kvpool.demo.hf_reference import build_hf_model, hf_logits
from kvpool.demo.model import (
    TinyLlama,
    dense_causal_attention,
    layer_windows,
    random_llama_weights,
    tiny_hybrid_config,
    tiny_llama_config,
)
from kvpool.errors import ConfigError
from kvpool.plan.kv_groups import kv_groups

SEED = 0
WINDOW = 32


@pytest.fixture(scope="module")
def config():
    return tiny_hybrid_config()


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


# ---------------------------------------------------------------------------- served over kvpool's pages
HYBRID_WORKLOAD = {"prefix_len": (32, 80), "suffix_len": (8, 48), "new_tokens": (32, 96)}  # several windows long


def charged_bytes_per_block(config) -> int:
    """What size_kv_pool charges the pool per block of the hybrid model (fp32, tp 1, block 16)."""
    from kvpool.plan import load_model_spec
    from kvpool.runtime import size_kv_pool

    pool = size_kv_pool(load_model_spec(config), 16, mem_fraction=1.0, kv_dtype="fp32", device="cpu",
                        activation_bytes=0, max_batched_tokens=256, device_memory_bytes=2**26, in_use_bytes=0)
    return int(pool.bytes_per_block)


def serve(requests, num_blocks, **kw):
    from kvpool.demo.launch import DemoOptions, run_rank

    per_block = charged_bytes_per_block(tiny_hybrid_config())
    opts = DemoOptions(model="hybrid", requests=requests, seed=SEED, kv_mib=num_blocks * per_block / 2**20,
                       progress=False, **kw)
    report = run_rank(0, opts)
    assert report.num_blocks == num_blocks
    return report


def assert_window_freeing(report):
    """The windowed group held at most ceil((W - 1) / bs) + 1 = 3 blocks per sequence after every step,
    far below a full table; the full group held every block."""
    windowed, full = report.summary.group_usage
    assert (windowed.window, windowed.layers, full.window, full.layers) == (WINDOW, (0, 2), None, (1, 3))
    assert windowed.bound_per_seq == 3 and windowed.max_seq_held == 3
    assert full.peak_held == full.peak_full and full.held_block_steps == full.full_block_steps
    assert windowed.peak_full == full.peak_full
    assert 2 * windowed.held_block_steps < windowed.full_block_steps


def test_hybrid_serving_with_prefix_sharing_matches_transformers(config, hf):
    from kvpool.demo.requests import make_workload

    requests = make_workload(8, config["vocab_size"], seed=1, mean_gap=2.0, **HYBRID_WORKLOAD)
    assert max(len(r.prompt) + r.max_new_tokens for r in requests) > 4 * WINDOW
    report = serve(requests, num_blocks=64)
    assert report.summary.prefix_hit_rate > 0.2 and report.summary.max_batch_seqs > 1
    assert_matches_hf(hf, requests, report)
    assert_window_freeing(report)
    assert report.num_free_blocks == report.num_blocks  # every group freed everything


def test_hybrid_prefix_hit_reuses_the_window_before_it(config, hf):
    from kvpool.demo.requests import Request

    prefix = [(7 * i + 3) % config["vocab_size"] for i in range(80)]  # 5 full blocks, 2.5 windows
    requests = [Request(0, prefix + [1, 2], 40, 0), Request(1, prefix + [9, 8, 7], 40, 50)]
    report = serve(requests, num_blocks=64)
    # request 0's windowed blocks 0..2 left its window and went back to the pool, cached; the hit needs
    # the full group's blocks 0..4 and the windowed group's blocks covering tokens 49..79 only
    assert report.summary.results[1].num_cached_prompt_tokens == 80
    assert_matches_hf(hf, requests, report)


def test_hybrid_preemption_matches_transformers(config, hf):
    from kvpool.demo.requests import make_workload

    requests = make_workload(8, config["vocab_size"], seed=2, mean_gap=0.5, **HYBRID_WORKLOAD)
    report = serve(requests, num_blocks=24)
    assert report.summary.preemptions > 0
    assert_matches_hf(hf, requests, report)
    assert_window_freeing(report)
    assert report.num_free_blocks == report.num_blocks


def test_hybrid_request_longer_than_the_pool_is_refused(config):
    from kvpool.demo.requests import Request

    report = serve([Request(0, list(range(64)) * 24, 8, 0), Request(1, list(range(40)), 4, 0)], num_blocks=24)
    error = report.summary.results[0].error
    assert "1544 tokens need 194 (2 KV-cache groups x 97) KV blocks but the whole pool holds 24" in error
    assert report.summary.results[1].error is None and report.num_free_blocks == 24


def test_cli_prints_blocks_held_per_group(capsys):
    from kvpool.demo.__main__ import main

    assert main(["--model", "hybrid", "--requests", "4", "--no-progress", "--check-hf"]) == 0
    out = capsys.readouterr().out
    assert "model=hybrid" in out
    assert "KV group 0    window 32 (layers 0, 2): peak" in out and "(bound 3)" in out
    assert "KV group 1    full attention (layers 1, 3): peak" in out
    assert "4/4 requests match Qwen2ForCausalLM greedy tokens exactly" in out


def test_window_freeing_runs_the_same_tokens_in_fewer_steps(config, hf):
    from kvpool.demo.requests import make_workload

    requests = make_workload(8, config["vocab_size"], seed=2, mean_gap=0.5, **HYBRID_WORKLOAD)
    freeing = serve(requests, num_blocks=24).summary
    keeping = serve(requests, num_blocks=24, window_freeing=False).summary
    windowed = keeping.group_usage[0]
    assert windowed.window == WINDOW and windowed.held_block_steps == windowed.full_block_steps
    assert windowed.max_seq_held > 3 * windowed.bound_per_seq  # a full table of a long sequence
    assert_matches_hf(hf, requests, type("Report", (), {"summary": keeping}))
    # the windowed group's freed blocks let more sequences run at once in the same pool
    assert freeing.steps < keeping.steps and freeing.preemptions < keeping.preemptions


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (Triton kernels, CUDA pages)")
def test_cuda_hybrid_matches_transformers(config, hf):
    from kvpool.demo.requests import make_workload

    requests = make_workload(8, config["vocab_size"], seed=2, mean_gap=0.5, **HYBRID_WORKLOAD)
    report = serve(requests, num_blocks=24, device="cuda")  # Triton paged_decode with sliding_window=32
    assert report.summary.preemptions > 0
    assert_matches_hf(hf, requests, report)
    assert_window_freeing(report)
    assert report.num_free_blocks == report.num_blocks
