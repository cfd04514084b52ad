"""Parameter counts and the bytes of weights one tensor-parallel shard holds.

Every weight is described once as a `Tensor` with how TP splits it, so the published parameter count
and the per-GPU shard bytes come from the same list:

- ``col``: column-parallel (output features split over TP: q/k/v, gate/up, expert up-projections)
- ``row``: row-parallel (input features split: o_proj, down_proj)
- ``kv``: the K/V projections: split by KV head, replicated when tp > num_kv_heads
- ``vocab``: vocab-parallel embedding / LM head (rows split, the last shard padded)
- ``rep``: replicated on every rank (norms, the MoE router, MLA's down-projections, row biases)
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .dtypes import dtype_bytes
from .quant import quantized_bytes


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
        out += _gated_mlp("experts", h, mi, n_moe * e, "experts", False)
        out.append(Tensor("router", e, h, n_moe, "rep", False, "router"))
        if spec.router_bias:
            out.append(Tensor("router_bias", e, 1, n_moe, "rep", False, "router"))
        if spec.num_shared_experts:
            out += _gated_mlp("shared_experts", h, mi * spec.num_shared_experts, n_moe, "experts", False)
        if spec.shared_expert_intermediate_size:
            out += _gated_mlp("shared_expert", h, spec.shared_expert_intermediate_size, n_moe, "experts", False)
            out.append(Tensor("shared_expert_gate", 1, h, n_moe, "rep", False, "router"))
    return out


def model_tensors(spec, layers: range | None = None, embed: bool = True, head: bool = True) -> list[Tensor]:
    """The weights of the layers in ``layers`` (default: all), plus embedding and LM head when asked."""
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
    counts["active"] = counts["total"] - (
        sum(t.params for t in model_tensors(spec) if t.name.startswith("experts."))
        * (spec.num_experts - spec.num_experts_per_tok) // spec.num_experts
        if spec.is_moe else 0
    )
    return counts


def shard_rows(t: Tensor, spec, tp: int) -> tuple[int, int]:
    """(rows, cols) of one TP rank's piece of ``t`` (the largest piece where the split is uneven)."""
    if t.split == "col":
        return math.ceil(t.rows / tp), t.cols
    if t.split == "row":
        return (t.rows, math.ceil(t.cols / tp)) if t.cols > 1 else (t.rows, t.cols)
    if t.split == "kv":
        kv = spec.num_kv_heads
        return t.rows * max(1, kv // tp) // kv, t.cols
    if t.split == "vocab":
        return math.ceil(t.rows / tp), t.cols
    return t.rows, t.cols


def shard_weight_bytes(spec, tp: int, dtype: str, layers: range | None = None,
                       embed: bool = True, head: bool = True) -> dict:
    """Bytes of weights on one TP rank holding ``layers`` (and the embedding / head), by part.

    Quantized linear weights use the checkpoint's packing (see `kvpool.plan.quant`); everything else is
    in the serving ``dtype``.
    """
    per_part: dict[str, int] = {}
    elem = dtype_bytes(dtype)
    for t in model_tensors(spec, layers, embed, head):
        rows, cols = shard_rows(t, spec, tp)
        if t.linear and spec.quant_method and not _skipped(t.name, spec.modules_not_quantized):
            nbytes = quantized_bytes(spec, rows, cols) * t.count
        else:
            nbytes = rows * cols * t.count * elem
        per_part[t.part] = per_part.get(t.part, 0) + nbytes
    per_part["total"] = sum(per_part.values())
    return per_part


def _skipped(name: str, modules: tuple) -> bool:
    """Whether ``quantization_config`` leaves this weight unquantized (matched on the module's last name)."""
    leaf = name.split(".")[-1]
    aliases = {leaf, "gate_proj", "up_proj"} if leaf == "gate_up_proj" else {leaf}
    group = name.split(".")[0] if "." in name else "self_attn"
    return any(str(m).split(".")[-1] in aliases or str(m).split(".")[-1] == group for m in modules if m)
