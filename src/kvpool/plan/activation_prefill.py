"""The dummy prefill of vLLM's profile run: the largest moment of one decoder layer, by kind of layer.

``profile_run`` calls ``_dummy_run(max_num_tokens, is_profile=True)`` (vllm/v1/worker/gpu_model_runner.py):
``T = max_num_batched_tokens`` tokens through the whole model in one step, with no CUDA graph and
**no attention metadata** (``force_attention`` is False), so the attention kernels return at once
(``FlashAttentionImpl.forward``: "Profiling run", ``output.fill_(0)``) and no ``T x T`` scores or KV
writes exist. The model runs as vLLM's piecewise ``torch.compile`` graph (default ``-O2``,
``custom_ops=["none"]``: RMSNorm, SiLU-and-mul and rotary are Inductor-generated), split at each attention
op: a piece runs ``o_proj -> add + norm -> MLP/MoE -> add + norm -> qkv -> rope -> output buffer``, and its
inputs (the previous attention's output and the residual) stay referenced by the outer graph until the
piece returns. Inside a piece Inductor frees each buffer after its last use. So a layer's largest moment is

- **dense MLP** (T x, per rank, in units of the serving dtype): the piece's inputs ``q_out + h``, the
  residual after the attention add ``h``, then the larger of the gate/up GEMM (``+ h`` normed input
  ``+ 2I``) and the activation (``+ 2I`` gate/up ``+ I`` its output); at tp > 1 the out-of-place all-reduce
  of the down projection (``q_out + 4h``);
- **attention** (standard): the piece's end, ``q_out + 2h`` + fused qkv + rotated q and k (new buffers;
  the v view keeps qkv alive) + the output buffer; MLA: see `mla_attention_moment`;
- **MoE**: see `moe_phase` (vLLM's modular fused-MoE with its persistent workspace, or gpt-oss's MXFP4
  Triton path).

Layers run one after another, so one layer's moment is the phase's; what a phase keeps (the MoE
workspace) stays for every later phase. Figures are derived from reading the vLLM 0.19 source (no GPU run
measured them); Inductor's exact buffer reuse is not modelled beyond "freed after last use".
"""
from __future__ import annotations

from .activation_phase import Phase, ProfileShape

# vllm/model_executor/layers/attention/mla_attention.py: determine_chunked_prefill_workspace_size caps the
# profile-time stand-in for the decompressed context K/V at 64K tokens ("limiting it to 64k tokens").
MLA_WORKSPACE_MAX_TOKENS = 64 * 1024
# vllm/v1/worker/workspace.py: WorkspaceManager.get_simultaneous rounds each view up to 256 bytes.
WORKSPACE_ALIGN = 256
# vllm/model_executor/layers/fused_moe/fused_moe.py: fused_topk returns float32 weights, int32 ids and
# int32 token_expert_indices: 12 bytes per routed (token, expert) pair.
TOPK_BYTES_PER_PAIR = 12
# gpt-oss's routing (fused_moe/gpt_oss_triton_kernels_moe.py: legacy_routing): gather and scatter indices,
# int32 source and destination each, per routed pair (the bitmatrix and expert histograms are under 1 MiB).
MXFP4_ROUTING_BYTES_PER_PAIR = 16


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _round_up(a: int, b: int) -> int:
    return _ceil_div(a, b) * b


def _attention_out(spec, tp: int) -> int:
    """Width of one rank's attention output per token (heads / tp x V head size)."""
    return spec.num_attention_heads // tp * spec.v_head_dim


def dense_mlp_phase(spec, shape: ProfileShape) -> Phase:
    """The gated MLP's largest moment (vLLM's ``MergedColumnParallelLinear`` gate/up, fused act-and-mul).

    >>> from kvpool.plan.model import load_model_spec
    >>> phase = dense_mlp_phase(load_model_spec("llama-3.1-8b"), ProfileShape(tokens=8192, seqs=1024))
    >>> # 8,192 tokens x 2 B x (4,096 attn out + 2 x 4,096 residuals + 3 x 14,336 gate/up + act)
    >>> phase.live == 8192 * 2 * (4096 + 2 * 4096 + 3 * 14336) == 905_969_664
    True
    """
    h, tp = spec.hidden_size, shape.tp
    inter = _ceil_div(spec.intermediate_size, tp)
    base = _attention_out(spec, tp) + 2 * h  # piece inputs (attention output, residual) + residual after the add
    moments = {"gate/up GEMM": base + h + 2 * inter, "act-and-mul": base + 2 * inter + inter}
    if tp > 1:
        moments["down all-reduce"] = base + 2 * h
    name, width = max(moments.items(), key=lambda kv: kv[1])
    return Phase("prefill mlp", shape.tokens * width * shape.dtype_bytes,
                 moment=f"dense MLP {name} (intermediate {inter:,}/rank)")


def mla_workspace_tokens(shape: ProfileShape) -> int:
    """Tokens of MLA's chunked-prefill workspace (``determine_chunked_prefill_workspace_size``).

    min(max(8 x max_model_len, 4 x max_num_seqs x block_size), 64K), but at least one block per sequence.

    >>> mla_workspace_tokens(ProfileShape(tokens=8192, seqs=1024, max_model_len=163840))
    65536
    """
    model_len = shape.max_model_len or MLA_WORKSPACE_MAX_TOKENS
    size = min(max(8 * model_len, 4 * shape.seqs * shape.block_size), MLA_WORKSPACE_MAX_TOKENS)
    return max(size, shape.seqs * shape.block_size)


def mla_attention_moment(spec, shape: ProfileShape) -> tuple[int, str]:
    """MLA (DeepSeek-V2/V3): bytes at the attention op, and what they are.

    During the profile ``MLAAttention.forward_impl`` sees no metadata and, "to simulate the worst case
    output size for ``self.kv_b_proj(kv_c_normed)``", allocates ``[workspace tokens, heads / tp,
    qk_nope + v]`` in the model dtype before returning (vllm/model_executor/layers/attention/
    mla_attention.py). Live beside it: the residual, q, the normed latent, the rotated k_pe and the output.
    The piece's end (before the op: its inputs, the a-projection and the q-LoRA latent still held) is the
    other candidate.
    """
    h, tp, b, t = spec.hidden_size, shape.tp, shape.dtype_bytes, shape.tokens
    heads = spec.num_attention_heads // tp
    nope, rope, lora, q_lora = spec.qk_nope_head_dim, spec.qk_rope_head_dim, spec.kv_lora_rank, spec.q_lora_rank
    q, out = heads * (nope + rope), heads * spec.v_head_dim
    a_proj = lora + rope + q_lora  # fused_qkv_a_proj (q_lora_rank set) or kv_a_proj_with_mqa output
    piece_end = out + 2 * h + a_proj + q_lora + q + lora + rope + out
    kv_b = mla_workspace_tokens(shape) * heads * (nope + spec.v_head_dim) * b
    at_op = (h + q + lora + rope + out) * t * b + kv_b
    if at_op >= piece_end * t * b:
        return at_op, f"MLA's stand-in decompressed K/V of {mla_workspace_tokens(shape):,} tokens ({kv_b / 2**30:.2f} GiB)"
    return piece_end * t * b, "MLA q, latent, k_pe and output"


def attention_phase(spec, shape: ProfileShape) -> Phase:
    """Attention's largest moment: the qkv GEMM or the piece's end (q, k rotated; output allocated).

    >>> from kvpool.plan.model import load_model_spec
    >>> phase = attention_phase(load_model_spec("llama-3.1-8b"), ProfileShape(tokens=8192, seqs=1024))
    >>> # 2 x 4,096 attn outs + 2 x 4,096 residuals + 6,144 qkv + 4,096 q + 1,024 k rotated
    >>> phase.live == 8192 * 2 * (2 * 4096 + 2 * 4096 + 6144 + 4096 + 1024)
    True
    """
    if spec.is_mla:
        live, moment = mla_attention_moment(spec, shape)
        return Phase("prefill attention", live, moment=moment)
    h, tp = spec.hidden_size, shape.tp
    heads, kv_heads = spec.num_attention_heads // tp, max(1, spec.num_kv_heads // tp)
    q, k = heads * spec.head_dim, kv_heads * spec.head_dim
    qkv, out = q + k + kv_heads * spec.v_head_dim, _attention_out(spec, tp)
    gemm = out + 3 * h + qkv  # piece inputs + residual + normed input + qkv
    piece_end = out + 2 * h + qkv + q + k + out
    return Phase("prefill attention", shape.tokens * max(gemm, piece_end) * shape.dtype_bytes,
                 moment="qkv, rotated q/k and the output buffer")


def moe_workspace_bytes(spec, shape: ProfileShape) -> int:
    """vLLM's modular fused-MoE workspace, allocated at the first MoE layer and kept (never freed).

    ``FusedMoEKernelModularImpl._allocate_buffers`` asks the ``WorkspaceManager`` for
    ``TritonExperts.workspace_shapes`` at ``M = T`` tokens (no chunking in 0.19): workspace13
    ``[M, top_k, max(I/tp, hidden)]`` (shared with the ``[M, hidden]`` output) and workspace2
    ``[M, top_k, max(2 I/tp, hidden)]``, in the activation dtype.

    >>> from kvpool.plan.model import ModelSpec
    >>> # Qwen3-30B-A3B: 8,192 x 8 x max(768, 2,048) x 2 B twice = 2 x 256 MiB
    >>> moe_workspace_bytes(ModelSpec("q", 48, 2048, 32, 4, 128, 6144, 151936, False, "bfloat16", 40960, 1e-6,
    ...     1e6, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768),
    ...     ProfileShape(tokens=8192, seqs=1024)) == 2 * 8192 * 8 * 2048 * 2
    True
    """
    m, k, h = shape.tokens, spec.num_experts_per_tok, spec.hidden_size
    inter = _ceil_div(spec.moe_intermediate_size, shape.tp)
    ws13 = m * k * max(inter, h) * shape.dtype_bytes
    ws2 = m * k * max(2 * inter, h) * shape.dtype_bytes
    return _round_up(ws13, WORKSPACE_ALIGN) + _round_up(ws2, WORKSPACE_ALIGN)


def _shared_width(spec, tp: int) -> int:
    shared = spec.moe_intermediate_size * spec.num_shared_experts + spec.shared_expert_intermediate_size
    return _ceil_div(shared, tp)


def _mxfp4_moe_moment(spec, shape: ProfileShape, base: int) -> int:
    """gpt-oss on SM90: ``OAITritonMxfp4ExpertsMonolithic`` -> ``triton_kernel_moe_forward`` (no workspace).

    Output ``empty_like(hidden)``, the SwiGLU'd intermediate ``[T x top_k, I/tp rounded up to 64]``
    (``mxfp4_round_up_hidden_size_and_intermediate_size``) and, for the second ``matmul_ogs`` with a
    scatter over top_k > 1 experts, its scratchpad ``[T x top_k, hidden]`` (triton_kernels/matmul_ogs.py:
    ``init_allocation``), all live at once.
    """
    t, k, h, b = shape.tokens, spec.num_experts_per_tok, spec.hidden_size, shape.dtype_bytes
    inter = _round_up(_ceil_div(spec.moe_intermediate_size or spec.intermediate_size, shape.tp), 64)
    width = base + h + k * inter + k * h
    return t * width * b + t * k * MXFP4_ROUTING_BYTES_PER_PAIR


def moe_phase(spec, shape: ProfileShape) -> Phase:
    """A MoE layer's largest moment, with the workspace it keeps.

    The router GEMM (``[T, experts]`` in the serving dtype) and ``fused_topk``'s ids and weights are live
    while the ``moe_forward`` custom op runs (eagerly: Inductor sees an opaque op). torch >= 2.9 disables
    in-place fused MoE (``fused_moe/utils.py: disable_inplace``), so the routed output is a new
    ``[T, hidden]``. Shared experts (DeepSeek, Qwen2-MoE) run first, eagerly, as a gated MLP whose native
    SiLU-and-mul holds gate/up, the SiLU result and the product at once (``4 x I_shared``); their output
    stays live through the routed experts.
    """
    h, tp, t, b = spec.hidden_size, shape.tp, shape.tokens, shape.dtype_bytes
    k, experts = spec.num_experts_per_tok, spec.num_experts
    base = _attention_out(spec, tp) + 3 * h + experts  # piece inputs, residual, normed input, router logits
    if spec.quant_method == "mxfp4":
        live = _mxfp4_moe_moment(spec, shape, base)
        return Phase("prefill moe", live, moment="MXFP4 Triton MoE intermediate + matmul scratchpad")
    workspace = moe_workspace_bytes(spec, shape)
    shared = _shared_width(spec, tp)
    topk = t * k * TOPK_BYTES_PER_PAIR
    moments = {"routed experts": (base + h + (h if shared else 0)) * t * b + topk}
    if shared:
        moments["shared experts"] = (base + 4 * shared) * t * b
    if tp > 1:
        # after the op: the routed (and shared) output and the out-of-place all-reduce's result
        moments["MoE all-reduce"] = (base - experts + h + (h if shared else 0)) * t * b
    name, live = max(moments.items(), key=lambda kv: kv[1])
    return Phase("prefill moe", live + workspace, kept=workspace,
                 moment=f"{name} + fused-MoE workspace {workspace / 2**30:.2f} GiB (kept)")


__all__ = ["dense_mlp_phase", "attention_phase", "moe_phase", "moe_workspace_bytes", "mla_workspace_tokens",
           "mla_attention_moment", "MLA_WORKSPACE_MAX_TOKENS", "TOPK_BYTES_PER_PAIR"]
