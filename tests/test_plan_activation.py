"""The activation term as vLLM 0.19's ``torch_peak_increase``: each profile-run phase in bytes, by hand.

Every expected figure below is written out from what vLLM 0.19 holds at the phase's largest moment
(vllm/v1/worker/gpu_model_runner.py: profile_run, _dummy_run, _dummy_sampler_run; v1/sample/sampler.py;
v1/sample/ops/topk_topp_sampler.py, topk_topp_triton.py; model_executor/layers/fused_moe/modular_kernel.py,
fused_moe.py; model_executor/layers/attention/mla_attention.py), not computed by the code under test.
"""
import doctest
import importlib

import pytest

from kvpool.errors import KVPoolError
from kvpool.plan import list_presets, make_request, plan_memory
from kvpool.plan.memory import plan_request
from kvpool.plan.activation import Phase, ProfileShape, peak_of, profile_phases, profile_run_peak, profile_shape
from kvpool.plan.activation_prefill import attention_phase, dense_mlp_phase, moe_phase, moe_workspace_bytes
from kvpool.plan.activation_sampler import sampler_phase
from kvpool.plan.model import spec_from_config

GIB = 2**30
CUBLAS = 32 * 2**20  # torch's cuBLAS workspace on SM90 (CublasHandlePool.cpp: ":4096:8")

# a small Llama-shaped config: hidden 64, 4 heads of 16 (2 KV heads), intermediate 160, vocab 1,000
TINY = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 160, "num_hidden_layers": 2,
        "vocab_size": 1000, "max_position_embeddings": 4096, "torch_dtype": "bfloat16"}

# published config.json of Qwen/Qwen3-30B-A3B (the fields that shape the model)
QWEN3_30B_A3B = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 2048,
                 "head_dim": 128, "intermediate_size": 6144, "max_position_embeddings": 40960,
                 "moe_intermediate_size": 768, "num_attention_heads": 32, "num_experts": 128,
                 "num_experts_per_tok": 8, "num_hidden_layers": 48, "num_key_value_heads": 4, "norm_topk_prob": True,
                 "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "tie_word_embeddings": False,
                 "torch_dtype": "bfloat16", "vocab_size": 151936, "decoder_sparse_step": 1, "mlp_only_layers": []}

# published config.json of deepseek-ai/DeepSeek-V2-Lite (the fields that shape the model)
DEEPSEEK_V2_LITE = {"architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "hidden_size": 2048,
                    "first_k_dense_replace": 1, "intermediate_size": 10944, "kv_lora_rank": 512,
                    "max_position_embeddings": 163840, "moe_intermediate_size": 1408, "moe_layer_freq": 1,
                    "n_group": 1, "n_routed_experts": 64, "n_shared_experts": 2, "num_attention_heads": 16,
                    "num_experts_per_tok": 6, "num_hidden_layers": 27, "num_key_value_heads": 16,
                    "q_lora_rank": None, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
                    "tie_word_embeddings": False, "topk_group": 1, "topk_method": "greedy",
                    "torch_dtype": "bfloat16", "v_head_dim": 128, "vocab_size": 102400}


def tiny(**fields):
    return spec_from_config({**TINY, **fields}, "tiny")


# ---------------------------------------------------------------- the dummy prefill, phase by phase
def test_dense_mlp_phase_holds_piece_inputs_residual_gate_up_and_its_activation():
    t = 256
    # tp 1: attn out 64 + residual in 64 + residual after the add 64 + gate/up 320 + act-and-mul 160 (bf16)
    assert dense_mlp_phase(tiny(), ProfileShape(t, 16)).live == t * 2 * (64 + 64 + 64 + 320 + 160)
    # tp 2: attn out 32 + 2 residuals 128 + gate/up 160 + act 80 = 400 > gate/up GEMM 32 + 192 + 160 = 384
    assert dense_mlp_phase(tiny(), ProfileShape(t, 16, tp=2)).live == t * 2 * (32 + 128 + 160 + 80)
    # tp 4 of a narrow MLP: the down projection's out-of-place all-reduce (attn 16 + 4 x hidden) decides
    narrow = tiny(intermediate_size=64)
    assert dense_mlp_phase(narrow, ProfileShape(t, 16, tp=4)).live == t * 2 * (16 + 4 * 64)


def test_attention_phase_is_qkv_rotated_q_k_and_the_output_buffer():
    t = 256
    # attn out in 64 + 2 residuals 128 + qkv 128 + rotated q 64 + rotated k 32 + new output 64; no T x T scores
    assert attention_phase(tiny(), ProfileShape(t, 16)).live == t * 2 * (64 + 128 + 128 + 64 + 32 + 64)
    # tp 4 > 2 KV heads: one KV head replicated per rank (q 16, k 16, v 16, out 16); the qkv GEMM's moment
    # (attn out 16 + residual in, after the add and normed 3 x 64 + qkv 48 = 256) beats the piece's end (240)
    assert attention_phase(tiny(), ProfileShape(t, 16, tp=4)).live == t * 2 * (16 + 3 * 64 + 48)


def test_moe_phase_keeps_the_fused_moe_workspace_qwen3_30b_a3b():
    spec = spec_from_config(QWEN3_30B_A3B, "qwen3-30b-a3b")
    shape = ProfileShape(tokens=8192, seqs=1024)
    # TritonExperts.workspace_shapes at M = 8,192: [M, 8, max(768, 2048)] + [M, 8, max(1536, 2048)], bf16
    workspace = 2 * (8192 * 8 * 2048 * 2)
    assert moe_workspace_bytes(spec, shape) == workspace == 512 * 2**20
    moe = moe_phase(spec, shape)
    # attn out 4,096 + residual in, after the add, normed input, routed output (4 x 2,048) + router logits 128,
    # fused_topk's fp32 weights + int32 ids + int32 token indices (12 B x 8 per token)
    assert moe.live == 8192 * 2 * (4096 + 4 * 2048 + 128) + 8192 * 8 * 12 + workspace
    assert moe.kept == workspace
    peak = profile_run_peak(spec, shape)
    assert [p.name for p in peak.phases] == ["cublas workspace", "prefill moe", "prefill attention", "sampler"]
    # every later phase runs beside the workspace (and torch's 32 MiB cuBLAS workspace of an H100)
    assert peak.phase_bytes("prefill attention") == attention_phase(spec, shape).live + workspace + CUBLAS
    assert peak.phase_bytes("sampler") == sampler_phase(spec, shape).live + workspace + CUBLAS
    # tp 4: 768 / 4 = 192 per rank, below hidden: the workspace stays [M, 8, 2048] twice
    assert moe_workspace_bytes(spec, ProfileShape(8192, 1024, tp=4)) == workspace


def test_mla_profile_allocates_the_stand_in_decompressed_kv_deepseek_v2_lite():
    spec = spec_from_config(DEEPSEEK_V2_LITE, "deepseek-v2-lite")
    shape = ProfileShape(tokens=8192, seqs=1024, max_model_len=163840)
    # determine_chunked_prefill_workspace_size: min(max(8 x 163,840, 4 x 1,024 x 16), 64K) = 65,536 tokens;
    # forward_impl without metadata: torch.empty([65,536, 16 heads, 128 nope + 128 v]) in bf16 = 512 MiB
    stand_in = 65536 * 16 * 256 * 2
    # beside it: residual 2,048 + q 16 x 192 + normed latent 512 + k_pe 64 + output 16 x 128
    assert attention_phase(spec, shape).live == 8192 * 2 * (2048 + 3072 + 512 + 64 + 2048) + stand_in
    # a short max_model_len shrinks it: max(8 x 2,048, 4 x 1,024 x 16) = 65,536 still; 8 seqs: 16,384 tokens
    small = ProfileShape(tokens=8192, seqs=8, max_model_len=2048)
    assert attention_phase(spec, small).live == 8192 * 2 * (2048 + 3072 + 512 + 64 + 2048) + 16384 * 16 * 256 * 2


def test_moe_with_shared_experts_and_a_dense_first_layer_deepseek_v2_lite():
    spec = spec_from_config(DEEPSEEK_V2_LITE, "deepseek-v2-lite")
    shape = ProfileShape(tokens=8192, seqs=1024, max_model_len=163840)
    phases = profile_phases(spec, shape)[1:]  # after the cuBLAS workspace
    assert [p.name for p in phases] == ["prefill mlp", "prefill moe", "prefill attention", "sampler"]
    # layer 0's dense MLP (intermediate 10,944) runs before any workspace exists
    assert phases[0].live == 8192 * 2 * (2048 + 2 * 2048 + 3 * 10944) and phases[0].kept == 0
    workspace = 8192 * 6 * 2048 * 2 + 8192 * 6 * 2816 * 2  # [M, 6, max(1408, 2048)] + [M, 6, max(2816, 2048)]
    # 2 shared experts (2,816) run first, eagerly: gate/up + SiLU + product = 4 x 2,816, beside the piece
    # inputs (attn out 2,048 + residual), the residual after the add, the normed input and the router logits (64)
    shared = 8192 * 2 * (2048 + 3 * 2048 + 64 + 4 * 2816)
    routed = 8192 * 2 * (2048 + 3 * 2048 + 64 + 2048 + 2048) + 8192 * 6 * 12
    assert phases[1].live == max(shared, routed) + workspace == shared + workspace
    assert phases[1].kept == workspace


def test_mxfp4_moe_takes_the_triton_path_without_workspace():
    # gpt-oss-20b's MoE shape (hidden 2,880, 32 experts, top 4, intermediate 2,880, MXFP4 experts)
    spec = tiny(hidden_size=2880, num_attention_heads=64, num_key_value_heads=8, head_dim=64,
                intermediate_size=2880, vocab_size=201088)
    spec = type(spec)(**{**spec.__dict__, "num_experts": 32, "num_experts_per_tok": 4,
                         "moe_intermediate_size": 2880, "quant_method": "mxfp4", "weight_bits": 4})
    moe = moe_phase(spec, ProfileShape(tokens=8192, seqs=1024))
    # attn out 4,096 + 3 x 2,880 + router 32 + output 2,880 + intermediate 4 x 2,880 + scratchpad 4 x 2,880,
    # and 16 B of routing indices per routed pair
    assert moe.live == 8192 * 2 * (4096 + 4 * 2880 + 32 + 8 * 2880) + 8192 * 4 * 16
    assert moe.kept == 0
    # tp 4: 2,880 / 4 = 720 rounded up to 768 (mxfp4_round_up_hidden_size_and_intermediate_size)
    moe4 = moe_phase(spec, ProfileShape(tokens=8192, seqs=1024, tp=4))
    assert moe4.live == 8192 * 2 * (1024 + 4 * 2880 + 32 + 4 * 768 + 4 * 2880) + 8192 * 4 * 16


# ---------------------------------------------------------------- the sampler warm-up
def test_sampler_phase_by_hand_triton_and_sort_paths():
    # 16 rows >= 8: Triton top-k/top-p; vocab 1,000 padded to 1,024 for the LM head
    held = (256 + 2 * 16) * 64 * 2  # prefill output [256, 64] + last_hidden_states + rand_like [16, 64]
    logits, fp32 = 16 * 1024 * 2, 16 * 1000 * 4  # bf16 logits (padded), each float32 [16, 1000]
    buffer = 16 * 1000 * 4  # min(next_pow2(min(132 SMs, 16)), 132) = 16 rows, float32, kept
    phase = sampler_phase(tiny(), ProfileShape(256, 16))
    assert phase.live == held + logits + 3 * fp32 + buffer and phase.kept == buffer
    # 4 rows: PyTorch sort (fp32 logits + sorted values + int64 indices + softmax + 2 bool masks), no buffer
    phase = sampler_phase(tiny(), ProfileShape(256, 4))
    assert phase.live == (256 + 8) * 64 * 2 + 4 * 1024 * 2 + 4 * 1000 * (4 + 4 + 8 + 1 + 4 + 1)
    assert phase.kept == 0


def test_sampler_of_a_262k_vocabulary_at_1024_seqs():
    spec = tiny(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                intermediate_size=14336, vocab_size=262144)
    phase = sampler_phase(spec, ProfileShape(tokens=8192, seqs=1024))
    held = (8192 + 2 * 1024) * 4096 * 2
    expected = held + 1024 * 262144 * (2 + 3 * 4) + 132 * 262144 * 4
    assert phase.live == expected == 3_980_394_496  # 3.71 GiB
    # the seed's sampler (bf16 + fp32 logits + fp32 probs) gave 1,024 x 262,144 x 10 + hidden: 1.14 GiB less
    assert expected - (1024 * 262144 * 10 + 8192 * 4096 * 2) == 1_228_931_072
    # an A100 (108 SMs) keeps a 108-row buffer
    a100 = sampler_phase(spec, ProfileShape(tokens=8192, seqs=1024, sm_count=108))
    assert phase.live - a100.live == (132 - 108) * 262144 * 4


def test_sampler_rows_are_capped_by_the_tokens():
    # _dummy_run: num_reqs = min(max_num_seqs, num_tokens)
    assert sampler_phase(tiny(), ProfileShape(256, 1024)).live == sampler_phase(tiny(), ProfileShape(256, 256)).live


# ---------------------------------------------------------------- the peak over phases
def test_peak_is_the_max_over_phases_of_kept_plus_live():
    phases = (Phase("encoder", 100, kept=30), Phase("prefill moe", 50, kept=20), Phase("sampler", 60))
    peak = peak_of(phases)
    assert peak.at == (100, 80, 110) and peak.bytes == 110 and peak.deciding.name == "sampler"
    # without what the earlier phases keep, the encoder would decide
    assert max(p.live for p in phases) == 100


def test_llama_3_1_8b_worked_example():
    plan = plan_memory("llama-3.1-8b", tp=1, gpu="h100-sxm")  # 8,192 tokens, 1,024 seqs on an H100
    term = plan.term("activation")
    prefill = 8192 * 2 * (4096 + 2 * 4096 + 3 * 14336)  # act-and-mul: 0.84 GiB
    sampler = (8192 + 2048) * 4096 * 2 + 1024 * 128256 * 14 + 132 * 128256 * 4  # 1.85 GiB
    assert term.parts["cublas_workspace"] == CUBLAS  # torch's, at the first GEMM, kept (SM90: 32 MiB)
    assert term.parts["prefill_mlp"] == CUBLAS + prefill and term.bytes == term.computed == CUBLAS + sampler
    assert "peak in sampler" in term.how and "1,024 rows × 128,256 vocab" in term.how


def test_a_non_last_pipeline_stage_has_no_sampler():
    plan = plan_memory("llama-3.1-70b", tp=2, pp=2, gpu="h100-sxm")
    first, last = plan.per_stage
    assert "sampler" not in first.term("activation").parts or first.term("activation").parts["sampler"] == 0
    assert first.term("activation").bytes < last.term("activation").bytes


@pytest.mark.parametrize("preset", list_presets())
@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_the_planners_activation_term_is_the_profile_run_model(preset, tp):
    try:
        req = make_request(preset, tp, gpu="h200")
    except KVPoolError:  # tp not dividing the heads: nothing to plan
        return
    try:
        plan = plan_request(req)
    except KVPoolError:  # weights over the budget
        return
    assert plan.term("activation").computed == profile_run_peak(req.spec, profile_shape(req, True)).bytes


@pytest.mark.parametrize("module", ["activation", "activation_prefill", "activation_sampler", "activation_encoder"])
def test_docstring_examples_hold(module):
    assert doctest.testmod(importlib.import_module(f"kvpool.plan.{module}")).failed == 0


# ---------------------------------------------------------------- presets of issue 12 (their published config.json)
def test_gemma_3_27b_encoder_profile_and_what_it_keeps():
    spec = make_request("gemma-3-27b", 1, gpu="h100-sxm").spec
    shape = ProfileShape(tokens=8192, seqs=1024)
    peak = profile_run_peak(spec, shape)
    assert [p.name for p in peak.phases] == ["cublas workspace", "encoder", "prefill mlp", "prefill attention",
                                             "sampler"]
    # 8,192 // 256 = 32 images of 896 x 896 (bf16 after the processor's cast), 32 x 4,096 SigLIP patches;
    # the later layers' MLP holds the kept input embeddings, the layer input, the residual, the normed input
    # (4 x 1,152) and fc1's and the GELU's outputs (2 x 4,304)
    pixels, patches = 32 * 3 * 896 * 896 * 2, 32 * 4096
    outputs = 32 * 256 * 5376 * 2  # encoder_cache: [32, 256, text hidden 5,376]
    encoder = peak.phases[1]
    assert encoder.live == pixels + patches * (4 * 1152 + 2 * 4304) * 2 and encoder.kept == pixels + outputs
    # the sampler (262,208 vocab) runs beside the pixels and the encoder outputs
    held = (8192 + 2048) * 5376 * 2
    sampler = held + 1024 * 262208 * (2 + 12) + 132 * 262208 * 4
    assert peak.phase_bytes("sampler") == CUBLAS + pixels + outputs + sampler == peak.bytes
    # tp 2: fc1 split over 2 ranks
    encoder2 = profile_phases(spec, ProfileShape(tokens=8192, seqs=1024, tp=2))[1]
    assert encoder2.live == pixels + patches * (4 * 1152 + 2 * 2152) * 2


def test_mm_tokens_per_image_sets_the_number_of_profiled_images():
    import json

    from kvpool.plan.model import PRESET_DIR

    cfg = json.loads((PRESET_DIR / "gemma-3-4b.json").read_text())
    spec = spec_from_config({**cfg, "mm_tokens_per_image": 64}, "gemma-3-4b-64")
    assert spec.vision.tokens_per_image == 64
    encoder = profile_phases(spec, ProfileShape(tokens=8192, seqs=1024))[1]
    assert encoder.kept == 128 * 3 * 896 * 896 * 2 + 128 * 64 * spec.hidden_size * 2  # 8,192 // 64 images


def test_gpt_oss_20b_preset_takes_the_mxfp4_path():
    spec = make_request("gpt-oss-20b", 1, gpu="h100-sxm").spec
    assert spec.quant_method == "mxfp4"
    moe = profile_phases(spec, ProfileShape(tokens=8192, seqs=1024))[1]
    assert moe.name == "prefill moe" and moe.kept == 0
    assert moe.live == 8192 * 2 * (4096 + 4 * 2880 + 32 + 8 * 2880) + 8192 * 4 * 16


def test_a_dense_layer_after_a_moe_layer_runs_beside_the_workspace():
    spec = spec_from_config({**QWEN3_30B_A3B, "mlp_only_layers": [47]}, "qwen3-moe-dense-last")
    shape = ProfileShape(tokens=8192, seqs=1024)
    peak = profile_run_peak(spec, shape)
    assert [p.name for p in peak.phases][1:] == ["prefill moe", "prefill mlp", "prefill attention", "sampler"]
    assert peak.phase_bytes("prefill mlp") == (dense_mlp_phase(spec, shape).live + moe_workspace_bytes(spec, shape)
                                               + CUBLAS)


@pytest.mark.parametrize("preset, gib", [("llama-3.1-8b", 1.88), ("qwen3-30b-a3b", 2.67), ("gemma-3-27b", 3.99),
                                         ("gpt-oss-20b", 2.87), ("deepseek-v2-lite", 1.93)])
def test_issue_12_presets_at_tp1_on_an_h100(preset, gib):
    term = plan_memory(preset, tp=1, gpu="h100-sxm").term("activation")
    assert round(term.bytes / GIB, 2) == gib and "peak in sampler" in term.how
