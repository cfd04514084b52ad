"""Peak activation memory of one TP rank, derived from the layer shapes.

Assumptions (the ones vLLM's profile run measures):

- one prefill step of ``tokens`` tokens (``--max-batched-tokens``), in inference mode: a layer's
  intermediates are freed before the next layer runs, so the peak is the largest single layer's, on top
  of the residual stream and the layer's input/output hidden states (2 x tokens x hidden);
- attention backend: FlashAttention-style (FlashAttention-2/3 or FlashInfer prefill): no
  ``tokens x tokens`` score matrix, only the output and a float32 log-sum-exp per token and head;
- MLP: gate and up projections fused (``[tokens, 2 x intermediate / tp]``) then SiLU-and-mul;
- MoE: fused-MoE with top-k routing: router logits (float32), top-k weights and ids, and three
  intermediate caches ``[chunk, k, 2I/tp]``, ``[chunk, k, I/tp]``, ``[chunk, k, hidden]``, with tokens
  processed in chunks of ``MOE_CHUNK_TOKENS`` (vLLM's ``VLLM_FUSED_MOE_CHUNK_SIZE``);
- MLA prefill decompresses the latent: q, latent, kv_b output, assembled k, and the output;
- sampler: logits for ``max_seqs`` sequences (one sampled token each) in the model dtype, then
  float32 logits and float32 probabilities over the full vocabulary.

The forward and the sampler run one after the other; the reported peak is the larger of the forward
peak and (the final hidden states + the sampler).
"""
from __future__ import annotations

MOE_CHUNK_TOKENS = 32 * 1024


def _attention_peak(spec, tp: int, t: int, b: int) -> int:
    h = spec.hidden_size
    heads = spec.num_attention_heads // tp
    lse = t * heads * 4
    if spec.is_mla:
        q_dim = spec.qk_nope_head_dim + spec.qk_rope_head_dim
        q_a = t * spec.q_lora_rank * b if spec.q_lora_rank else 0
        q = t * heads * q_dim * b
        latent = t * (spec.kv_lora_rank + spec.qk_rope_head_dim) * b
        kv = t * heads * (spec.qk_nope_head_dim + spec.v_head_dim) * b
        k = t * heads * q_dim * b
        out = t * heads * spec.v_head_dim * b
        return max(t * h * b + q_a + latent, q + latent + kv + k + out + lse, out + t * h * b)
    kv_heads = max(1, spec.num_kv_heads // tp)
    normed = t * h * b
    qkv = t * (heads * spec.head_dim + kv_heads * (spec.head_dim + spec.v_head_dim)) * b
    out = t * heads * spec.v_head_dim * b
    o = t * h * b
    return max(normed + qkv, qkv + out + lse, out + o)


def _mlp_peak(h: int, inter_shard: int, t: int, b: int) -> int:
    gate_up, act, down, normed = t * 2 * inter_shard * b, t * inter_shard * b, t * h * b, t * h * b
    return max(normed + gate_up, gate_up + act, act + down)


def _moe_peak(spec, tp: int, t: int, b: int) -> int:
    h, e, k = spec.hidden_size, spec.num_experts, spec.num_experts_per_tok
    inter = -(-spec.moe_intermediate_size // tp)
    chunk = min(t, MOE_CHUNK_TOKENS)
    router = t * e * 4 + t * k * 8  # float32 logits, float32 weights + int32 ids
    caches = chunk * k * (2 * inter + inter + h) * b
    out = t * h * b
    shared_inter = spec.moe_intermediate_size * spec.num_shared_experts + spec.shared_expert_intermediate_size
    shared = _mlp_peak(h, -(-shared_inter // tp), t, b) if shared_inter else 0
    return t * h * b + router + max(caches + out, shared + out)


def forward_peak_bytes(spec, tp: int, tokens: int, dtype_bytes: int) -> dict:
    """Peak bytes of a forward pass over ``tokens`` tokens on one TP rank, by phase."""
    t, b, h = tokens, dtype_bytes, spec.hidden_size
    residual = 2 * t * h * b  # residual stream + current hidden states
    attn = _attention_peak(spec, tp, t, b)
    mlp = _mlp_peak(h, -(-spec.intermediate_size // tp), t, b) if spec.num_layers > spec.num_moe_layers else 0
    moe = _moe_peak(spec, tp, t, b) if spec.is_moe else 0
    return {"residual": residual, "attention": attn, "mlp": mlp, "moe": moe,
            "peak": residual + max(attn, mlp, moe)}


def sampler_bytes(spec, max_seqs: int, dtype_bytes: int) -> int:
    """Logits of ``max_seqs`` sampled rows: model-dtype logits, float32 logits, float32 probabilities."""
    return max_seqs * spec.vocab_size * (dtype_bytes + 4 + 4)


def activation_bytes(spec, tp: int, tokens: int, max_seqs: int, dtype_bytes: int, last_stage: bool = True) -> dict:
    """Activation peak of one rank: max(forward peak, final hidden + sampler) for the last PP stage."""
    fwd = forward_peak_bytes(spec, tp, tokens, dtype_bytes)
    sampler = sampler_bytes(spec, min(max_seqs, tokens), dtype_bytes) if last_stage else 0
    after = tokens * spec.hidden_size * dtype_bytes + sampler
    return {**{f"forward_{k}": v for k, v in fwd.items()}, "sampler": sampler,
            "peak": max(fwd["peak"], after)}
