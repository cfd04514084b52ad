"""Parameter counts and the bytes of weights one tensor-parallel shard holds.

Every weight is described once as a `Tensor` with how TP splits it, so the published parameter count
and the per-GPU shard bytes come from the same list:

- ``col``: column-parallel (output features split over TP: q/k/v, gate/up, expert up-projections)
- ``row``: row-parallel (input features split: o_proj, down_proj)
- ``kv``: the K/V projections: split by KV head, replicated when tp > num_kv_heads
- ``vocab``: vocab-parallel embedding / LM head (rows padded to a multiple of 64, then split)
- ``rep``: replicated on every rank (norms, the MoE router, MLA's down-projections, row biases)

The shard bytes are what vLLM 0.19 allocates while loading (its "Model loading took X GiB",
``gpu_model_runner.py load_model``: torch bytes allocated after ``load_model`` minus before): the weights
as vLLM lays them out (merged qkv / gate_up hold the same bytes as their parts; MXFP4 experts in the
Hopper kernel's layout, `kvpool.plan.quant`), a multimodal checkpoint's vision tower (`kvpool.plan.vision`)
and the rotary cos/sin caches (`kvpool.plan.rope_cache`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .dtypes import dtype_bytes
from .quant import mxfp4_expert_bytes, mxfp4_expert_intermediate, quantized_bytes

# vLLM vocab_parallel_embedding.py DEFAULT_VOCAB_PADDING_SIZE: VocabParallelEmbedding and ParallelLMHead pad
# the vocabulary to a multiple of 64, then give each TP rank 1/tp of the padded rows
VOCAB_PADDING = 64


@dataclass(frozen=True)
class Tensor:
    name: str
    rows: int  # output features (or vocab for embeddings)
    cols: int  # input features (1 for vectors)
    count: int  # how many copies across the model (layers x experts)
    split: str  # col | row | kv | vocab | rep
    linear: bool  # a matmul weight that quantization applies to
    part: str  # embedding | attention | mlp | experts | router | norm | lm_head | mtp

    @property
    def params(self) -> int:
        return self.rows * self.cols * self.count


def _attention(spec, n: int) -> list[Tensor]:
    h, nh = spec.hidden_size, spec.num_attention_heads
    out = []
    if spec.is_mla:
        qk = spec.qk_nope_head_dim + spec.qk_rope_head_dim
        if spec.q_lora_rank:
            out += [Tensor("q_a_proj", spec.q_lora_rank, h, n, "rep", True, "attention"),
                    Tensor("q_a_layernorm", spec.q_lora_rank, 1, n, "rep", False, "norm"),
                    Tensor("q_b_proj", nh * qk, spec.q_lora_rank, n, "col", True, "attention")]
        else:
            out.append(Tensor("q_proj", nh * qk, h, n, "col", True, "attention"))
        out += [Tensor("kv_a_proj_with_mqa", spec.kv_lora_rank + spec.qk_rope_head_dim, h, n, "rep", True, "attention"),
                Tensor("kv_a_layernorm", spec.kv_lora_rank, 1, n, "rep", False, "norm"),
                Tensor("kv_b_proj", nh * (spec.qk_nope_head_dim + spec.v_head_dim), spec.kv_lora_rank, n, "col", True, "attention"),
                Tensor("o_proj", h, nh * spec.v_head_dim, n, "row", True, "attention")]
        return out
    q, kv = nh * spec.head_dim, spec.num_kv_heads * spec.head_dim
    out += [Tensor("q_proj", q, h, n, "col", True, "attention"),
            Tensor("k_proj", kv, h, n, "kv", True, "attention"),
            Tensor("v_proj", spec.num_kv_heads * spec.v_head_dim, h, n, "kv", True, "attention"),
            Tensor("o_proj", h, nh * spec.v_head_dim, n, "row", True, "attention")]
    if spec.qkv_bias:
        out += [Tensor("q_bias", q, 1, n, "col", False, "attention"),
                Tensor("kv_bias", kv + spec.num_kv_heads * spec.v_head_dim, 1, n, "kv", False, "attention")]
    if spec.o_bias:
        out.append(Tensor("o_bias", h, 1, n, "rep", False, "attention"))
    if spec.qk_norm:  # q_norm and k_norm over one head (replicated)
        out.append(Tensor("qk_norms", spec.head_dim, 1, 2 * n, "rep", False, "norm"))
    if spec.attention_sinks:  # gpt-oss: self.sinks of num_heads // tp values per rank
        out.append(Tensor("sinks", nh, 1, n, "col", False, "attention"))
    return out


def _gated_mlp(name: str, h: int, inter: int, n: int, part: str, bias: bool) -> list[Tensor]:
    out = [Tensor(f"{name}.gate_up_proj", 2 * inter, h, n, "col", True, part),
           Tensor(f"{name}.down_proj", h, inter, n, "row", True, part)]
    if bias:
        out += [Tensor(f"{name}.gate_up_bias", 2 * inter, 1, n, "col", False, part),
                Tensor(f"{name}.down_bias", h, 1, n, "rep", False, part)]
    return out


def _layers(spec, n_dense: int, n_moe: int) -> list[Tensor]:
    h = spec.hidden_size
    n = n_dense + n_moe
    out = _attention(spec, n)
    out.append(Tensor("layer_norms", h, 1, n * spec.norms_per_layer, "rep", False, "norm"))
    if n_dense:
        out += _gated_mlp("mlp", h, spec.intermediate_size, n_dense, "mlp", spec.mlp_bias)
    if n_moe:
        e, mi = spec.num_experts, spec.moe_intermediate_size
        out += _gated_mlp("experts", h, mi, n_moe * e, "experts", spec.expert_bias)
        out.append(Tensor("router", e, h, n_moe, "rep", False, "router"))
        if spec.router_bias:
            out.append(Tensor("router_bias", e, 1, n_moe, "rep", False, "router"))
        if spec.num_shared_experts:
            out += _gated_mlp("shared_experts", h, mi * spec.num_shared_experts, n_moe, "experts", False)
        if spec.shared_expert_intermediate_size:
            out += _gated_mlp("shared_expert", h, spec.shared_expert_intermediate_size, n_moe, "experts", False)
            out.append(Tensor("shared_expert_gate", 1, h, n_moe, "rep", False, "router"))
    return out


def _vision(tower) -> list[Tensor]:
    """A SigLIP tower as vLLM's siglip.py builds it: qkv / fc1 column-parallel with their biases, out_proj /
    fc2 row-parallel (biases replicated), patch and position embeddings and LayerNorms replicated; plus
    Gemma-3's projector (gemma3_mm.py: a replicated vision x text matrix and an RMS norm)."""
    e, i, n, p = tower.hidden_size, tower.intermediate_size, tower.num_layers, tower.patch_size
    out = [Tensor("vision.patch_embedding", e, tower.num_channels * p * p + 1, 1, "rep", False, "vision"),
           Tensor("vision.position_embedding", tower.num_patches, e, 1, "rep", False, "vision"),
           Tensor("vision.qkv_proj", 3 * e, e + 1, n, "col", False, "vision"),
           Tensor("vision.out_proj", e, e, n, "row", False, "vision"),
           Tensor("vision.fc1", i, e + 1, n, "col", False, "vision"),
           Tensor("vision.fc2", e, i, n, "row", False, "vision"),
           Tensor("vision.row_biases", e, 1, 2 * n, "rep", False, "vision"),
           Tensor("vision.layer_norms", 2 * e, 1, 2 * n + 1, "rep", False, "vision")]  # weight + bias each
    if tower.projector == "gemma3":
        out += [Tensor("vision.mm_input_projection", tower.text_hidden_size, e, 1, "rep", False, "vision"),
                Tensor("vision.mm_soft_emb_norm", e, 1, 1, "rep", False, "vision")]
    return out


def model_tensors(spec, layers: range | None = None, embed: bool = True, head: bool = True) -> list[Tensor]:
    """The weights of the layers in ``layers`` (default: all), plus embedding and LM head when asked, plus a
    multimodal checkpoint's vision tower (vLLM builds it on every pipeline stage)."""
    layers = range(spec.num_layers) if layers is None else layers
    n_moe = sum(1 for i in layers if spec.is_moe_layer(i))
    n_dense = len(layers) - n_moe
    h, v = spec.hidden_size, spec.vocab_size
    out = _layers(spec, n_dense, n_moe) if len(layers) else []
    if embed:
        out.append(Tensor("embed_tokens", v, h, 1, "vocab", False, "embedding"))
    if head:
        out.append(Tensor("final_norm", h, 1, 1, "rep", False, "norm"))
        if not spec.tie_word_embeddings or not embed:
            # a tied head on a different PP stage than the embedding still needs its own copy
            out.append(Tensor("lm_head", v, h, 1, "vocab", False, "lm_head"))
    if spec.vision is not None:
        out += _vision(spec.vision)
    return out


def parameter_counts(spec) -> dict:
    """Parameters by part; ``total`` is the main model (multi-token-prediction layers in ``mtp`` only)."""
    counts: dict[str, int] = {}
    for t in model_tensors(spec):
        counts[t.part] = counts.get(t.part, 0) + t.params
    counts["total"] = sum(counts.values())
    if spec.num_mtp_layers:
        # DeepSeek-V3 MTP module: one more decoder layer + enorm, hnorm, eh_proj (2h -> h) + shared_head norm
        h = spec.hidden_size
        extra = _layers(spec, 0, spec.num_mtp_layers) if spec.is_moe else _layers(spec, spec.num_mtp_layers, 0)
        counts["mtp"] = sum(t.params for t in extra) + spec.num_mtp_layers * (2 * h * h + 3 * h)
    counts["active"] = counts["total"] - counts.get("vision", 0) - (
        sum(t.params for t in model_tensors(spec) if t.name.startswith("experts."))
        * (spec.num_experts - spec.num_experts_per_tok) // spec.num_experts
        if spec.is_moe else 0
    )
    return counts


def shard_rows(t: Tensor, spec, tp: int) -> tuple[int, int]:
    """(rows, cols) of one TP rank's piece of ``t`` (the largest piece where the split is uneven)."""
    if spec.quant_method == "mxfp4" and t.name.startswith("experts.") and t.split in ("col", "row") and t.cols > 1:
        inter = mxfp4_expert_intermediate(spec.moe_intermediate_size, tp)  # vLLM pads it to 64 per rank
        return (2 * inter, t.cols) if t.split == "col" else (t.rows, inter)
    if spec.quant_method == "mxfp4" and t.name == "experts.gate_up_bias":
        return 2 * mxfp4_expert_intermediate(spec.moe_intermediate_size, tp), 1
    if t.split == "col":
        return math.ceil(t.rows / tp), t.cols
    if t.split == "row":
        return (t.rows, math.ceil(t.cols / tp)) if t.cols > 1 else (t.rows, t.cols)
    if t.split == "kv":
        kv = spec.num_kv_heads
        return t.rows * max(1, kv // tp) // kv, t.cols
    if t.split == "vocab":
        return math.ceil(math.ceil(t.rows / VOCAB_PADDING) * VOCAB_PADDING / tp), t.cols
    return t.rows, t.cols


def shard_weight_bytes(spec, tp: int, dtype: str, layers: range | None = None,
                       embed: bool = True, head: bool = True) -> dict:
    """Bytes vLLM allocates on one TP rank holding ``layers`` (and the embedding / head) while loading, by
    part: the weights, ``rope_cache`` (the rotary cos/sin caches) and, for a quantized MLA checkpoint,
    the 16-bit copy of ``kv_b_proj`` MLA's ``process_weights_after_loading`` keeps (``W_UK_T``, ``W_UV``).

    Quantized linear weights use the checkpoint's packing (see `kvpool.plan.quant`); everything else is
    in the serving ``dtype``.
    """
    per_part: dict[str, int] = {}
    elem = dtype_bytes(dtype)
    for t in model_tensors(spec, layers, embed, head):
        rows, cols = shard_rows(t, spec, tp)
        nbytes = _shard_bytes(t, spec, rows, cols, elem) * t.count
        if t.name == "kv_b_proj" and spec.quant_method:
            nbytes += rows * cols * elem * t.count  # mla_attention.py: dequantized W_UK / W_UV
        per_part[t.part] = per_part.get(t.part, 0) + nbytes
    per_part["rope_cache"] = rope_cache_bytes(spec, dtype)
    per_part["total"] = sum(per_part.values())
    return per_part


def _shard_bytes(t: Tensor, spec, rows: int, cols: int, elem: int) -> int:
    """Bytes of one copy of ``t``'s ``[rows, cols]`` shard."""
    if spec.quant_method == "mxfp4":  # only the routed experts; their biases become float32 (Triton backend)
        if t.name.startswith("experts."):
            return mxfp4_expert_bytes(rows, cols) if t.linear else rows * cols * 4
        return rows * cols * elem
    if t.linear and spec.quant_method and not _skipped(t.name, spec.modules_not_quantized):
        return quantized_bytes(spec, rows, cols)
    return rows * cols * elem


def rope_cache_bytes(spec, dtype: str) -> int:
    """Bytes of vLLM's rotary cos/sin caches (one per distinct rope; see `kvpool.plan.rope_cache`)."""
    return sum(rows * dim * (4 if kind == "fp32" else dtype_bytes(dtype)) for rows, dim, kind in spec.rope_caches)


def _skipped(name: str, modules: tuple) -> bool:
    """Whether ``quantization_config`` leaves this weight unquantized (matched on the module's last name)."""
    leaf = name.split(".")[-1]
    aliases = {leaf, "gate_proj", "up_proj"} if leaf == "gate_up_proj" else {leaf}
    group = name.split(".")[0] if "." in name else "self_attn"
    return any(str(m).split(".")[-1] in aliases or str(m).split(".")[-1] == group for m in modules if m)


def weights_assumptions(spec) -> list[str]:
    """What the weights term assumes where vLLM's figure depends on more than the config (one line each)."""
    out = []
    if spec.quant_method == "mxfp4":
        out.append("weights: MXFP4 experts in vLLM 0.19's Hopper layout (Triton backend: values padded to 64, "
                   "swizzled scales kept beside the loaded ones, fp32 expert biases); Blackwell's TRT-LLM layout "
                   "pads to 256 (about +0.6% on gpt-oss-20b), A100's Marlin repacks")
    if spec.vision is not None:
        out.append(f"weights: the {spec.vision.model_type} vision tower and projector are counted (vLLM builds them "
                   "unless --limit-mm-per-prompt sets every image limit to 0)")
    if spec.vision_uncounted:
        out.append(f"weights: the {spec.vision_uncounted} vision tower is not counted (no model of its layers); "
                   "add its weights with --weights-gib")
    return out
