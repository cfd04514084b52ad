"""A tiny Llama-style decoder in plain torch, split for tensor parallelism.

RMSNorm, rotary position embeddings (the Llama "default" rope), grouped-query attention and a
SwiGLU MLP, with the parameter names and shapes of Hugging Face's ``LlamaForCausalLM`` so the same
random weights load into both (see :mod:`kvpool.demo.hf_reference`). The same class runs a hybrid
``Qwen2ForCausalLM`` (:func:`tiny_hybrid_config`): q/k/v biases, and per-layer attention windows
(``layer_types`` mixing ``sliding_attention`` and ``full_attention``).

The model holds no KV cache. Each layer hands its rotated ``q, k, v`` to an *attention callback*
the engine supplies; the engine writes K/V into kvpool's pages and reads them back through kvpool's
kernels (:mod:`kvpool.demo.engine`). That keeps "what a Llama layer computes" apart from "where
its KV lives".

Tensor parallelism (Megatron-style): rank ``r`` of ``tp`` holds query heads
``[r * Hq/tp, (r+1) * Hq/tp)``, the KV heads :func:`kv_heads_of_rank` names, the matching rows of
``q/k/v_proj`` and columns of ``o_proj``, and a ``1/tp`` slice of the MLP's intermediate dimension.
The partial outputs of ``o_proj`` and ``down_proj`` are summed with ``torch.distributed.all_reduce``.
Embeddings, norms and ``lm_head`` are replicated.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..errors import ConfigError, InvalidArgumentError
from .configs import DEMO_MODELS, demo_config, tiny_hybrid_config, tiny_llama_config  # noqa: F401 (re-export)

# layer index, q [T, Hq_shard, D], k [T, Hkv_shard, D], v [T, Hkv_shard, D] -> [T, Hq_shard, D]
AttentionFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def random_llama_weights(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Full (unsharded) fp32 weights from ``seed``, keyed by ``LlamaForCausalLM``'s state-dict names.

    Projections are N(0, 0.02) as in Llama's init; the embedding and ``lm_head`` are wider
    (N(0, 1) and N(0, 0.1)) so logits are spread out and greedy argmax ties do not happen in practice
    (exact token equality with transformers needs a clear winner at every step). A config with q/k/v
    biases (Qwen2, ``attention_bias``) also gets ``self_attn.{q,k,v}_proj.bias``, N(0, 0.1).
    """
    gen = torch.Generator().manual_seed(seed)
    hidden, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or hidden // heads

    def normal(*shape, std=0.02):
        return torch.randn(*shape, generator=gen, dtype=torch.float32) * std

    bias = has_qkv_bias(config)
    weights = {"model.embed_tokens.weight": normal(vocab, hidden, std=1.0)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        weights[p + "input_layernorm.weight"] = 1.0 + normal(hidden, std=0.1)
        weights[p + "self_attn.q_proj.weight"] = normal(heads * head_dim, hidden, std=0.08)
        weights[p + "self_attn.k_proj.weight"] = normal(kv_heads * head_dim, hidden, std=0.08)
        weights[p + "self_attn.v_proj.weight"] = normal(kv_heads * head_dim, hidden)
        if bias:
            for name, rows in (("q", heads), ("k", kv_heads), ("v", kv_heads)):
                weights[p + f"self_attn.{name}_proj.bias"] = normal(rows * head_dim, std=0.1)
        weights[p + "self_attn.o_proj.weight"] = normal(hidden, heads * head_dim)
        weights[p + "post_attention_layernorm.weight"] = 1.0 + normal(hidden, std=0.1)
        weights[p + "mlp.gate_proj.weight"] = normal(inter, hidden)
        weights[p + "mlp.up_proj.weight"] = normal(inter, hidden)
        weights[p + "mlp.down_proj.weight"] = normal(hidden, inter)
    weights["model.norm.weight"] = 1.0 + normal(hidden, std=0.1)
    weights["lm_head.weight"] = normal(vocab, hidden, std=0.1)
    return weights


def has_qkv_bias(config: dict) -> bool:
    """Whether q/k/v projections carry a bias (Qwen2 always; Llama when ``attention_bias``)."""
    return _spec(config).qkv_bias


def layer_windows(config: dict) -> tuple:
    """Each layer's attention window in tokens (None: full attention), as kvpool's planner reads it
    (the same rule that sizes the KV-cache groups, so the model and its pages agree)."""
    return tuple(_spec(config).layer_sliding_windows)


def _spec(config: dict):
    from ..plan import load_model_spec

    return load_model_spec(config)


def kv_heads_of_rank(num_kv_heads: int, tp_size: int, tp_rank: int) -> list[int]:
    """Global KV head ids rank ``tp_rank`` holds: a contiguous ``num_kv_heads // tp_size`` slice."""
    per = num_kv_heads // tp_size
    return list(range(tp_rank * per, (tp_rank + 1) * per))


def check_tp_fits(config: dict, tp_size: int) -> None:
    """Raise :class:`ConfigError` unless heads, KV heads and the MLP split evenly over ``tp_size``."""
    for key in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        if tp_size < 1 or config[key] % tp_size:
            raise ConfigError(
                f"{key}={config[key]} does not split over tp={tp_size}; "
                f"the demo model needs {key} divisible by tp (use tp=1 or 2 with the tiny config)"
            )


class RotaryEmbedding:
    """Llama's default rope: ``inv_freq[i] = theta ** (-2i / head_dim)``, halves rotated."""

    def __init__(self, head_dim: int, theta: float, device):
        exponent = torch.arange(0, head_dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float32)
        self.inv_freq = 1.0 / (theta ** (exponent / head_dim))  # [head_dim / 2] fp32

    def __call__(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate ``x`` [T, heads, head_dim] fp32 at ``positions`` [T] int64."""
        freqs = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]  # [T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos()[:, None, :], emb.sin()[:, None, :]  # [T, 1, D]
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * x / sqrt(mean(x^2) + eps)`` over the last dim, in fp32 as Llama does."""
    variance = x.pow(2).mean(-1, keepdim=True)
    return weight * (x * torch.rsqrt(variance + eps))


class TinyLlama:
    """One tensor-parallel shard of a Llama (or hybrid Qwen2) decoder (inference only, no autograd).

    ``layer_windows[i]`` is layer ``i``'s attention window (None: full); the attention callback
    applies it (the model only hands over q, k, v).

    Parameters
    ----------
    config : dict
        Hugging Face Llama or Qwen2 ``config.json`` dict (see :func:`tiny_llama_config`,
        :func:`tiny_hybrid_config`).
    weights : dict[str, torch.Tensor]
        Full fp32 weights by ``LlamaForCausalLM`` names (see :func:`random_llama_weights`);
        this shard slices what it holds.
    tp_rank, tp_size : int
        This rank and the TP group size; ``tp_size > 1`` needs an initialised torch.distributed group.
    group : torch.distributed.ProcessGroup, optional
        Group for the all-reduces (default: the world group).
    device : str or torch.device
    """

    def __init__(self, config: dict, weights: dict, tp_rank: int = 0, tp_size: int = 1, group=None, device="cpu"):
        check_tp_fits(config, tp_size)
        self.config = config
        self.tp_rank, self.tp_size, self.group = tp_rank, tp_size, group
        self.device = torch.device(device)
        self.num_layers = config["num_hidden_layers"]
        self.vocab_size = config["vocab_size"]
        self.eps = config["rms_norm_eps"]
        heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
        self.head_dim = config.get("head_dim") or config["hidden_size"] // heads
        self.q_heads = heads // tp_size
        self.kv_head_ids = kv_heads_of_rank(kv_heads, tp_size, tp_rank)
        self.kv_heads = len(self.kv_head_ids)
        self.scale = self.head_dim ** -0.5
        theta = config.get("rope_theta") or config.get("rope_parameters", {}).get("rope_theta", 10000.0)
        self.rope = RotaryEmbedding(self.head_dim, theta, self.device)
        self.layer_windows = layer_windows(config)
        bias = has_qkv_bias(config)

        d = self.head_dim
        q_rows = slice(tp_rank * self.q_heads * d, (tp_rank + 1) * self.q_heads * d)
        kv_rows = slice(self.kv_head_ids[0] * d, (self.kv_head_ids[-1] + 1) * d)
        inter = config["intermediate_size"] // tp_size
        ffn = slice(tp_rank * inter, (tp_rank + 1) * inter)

        def take(name, rows=slice(None), cols=None):
            w = weights[name][rows] if cols is None else weights[name][:, cols]
            return w.contiguous().to(self.device, torch.float32)

        self.embed = take("model.embed_tokens.weight")
        self.final_norm = take("model.norm.weight")
        self.lm_head = take("lm_head.weight")
        self.layers = []
        for i in range(self.num_layers):
            p = f"model.layers.{i}."
            self.layers.append({
                "in_norm": take(p + "input_layernorm.weight"),
                # q, k and v stacked into one matmul: [(Hq_s + 2 Hkv_s) * D, hidden]
                "qkv": torch.cat([take(p + "self_attn.q_proj.weight", q_rows),
                                  take(p + "self_attn.k_proj.weight", kv_rows),
                                  take(p + "self_attn.v_proj.weight", kv_rows)]),
                # [(Hq_s + 2 Hkv_s) * D] (None: no q/k/v biases)
                "qkv_bias": torch.cat([take(p + "self_attn.q_proj.bias", q_rows),
                                       take(p + "self_attn.k_proj.bias", kv_rows),
                                       take(p + "self_attn.v_proj.bias", kv_rows)]) if bias else None,
                "o": take(p + "self_attn.o_proj.weight", cols=q_rows),
                "post_norm": take(p + "post_attention_layernorm.weight"),
                "gate_up": torch.cat([take(p + "mlp.gate_proj.weight", ffn), take(p + "mlp.up_proj.weight", ffn)]),
                "down": take(p + "mlp.down_proj.weight", cols=ffn),
            })

    def _all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size > 1:
            import torch.distributed as dist

            dist.all_reduce(x, group=self.group)
        return x

    @torch.inference_mode()
    def forward(self, token_ids: torch.Tensor, positions: torch.Tensor, attention: AttentionFn,
                logit_rows: torch.Tensor) -> torch.Tensor:
        """Run the new tokens of a batch through the decoder.

        Parameters
        ----------
        token_ids : [T] int64
            The new tokens of every sequence in the step, concatenated.
        positions : [T] int64
            Their positions in their sequences (rope angles).
        attention : callable
            ``attention(layer, q, k, v) -> out`` with q ``[T, Hq_shard, D]``, k/v ``[T, Hkv_shard, D]``
            fp32 (rope applied), out ``[T, Hq_shard, D]`` fp32; the engine's paged attention, which
            applies ``layer_windows[layer]``.
        logit_rows : [B] int64
            Rows of ``token_ids`` whose next-token logits are wanted (each sequence's last new token).

        Returns
        -------
        logits : [B, vocab] fp32
        """
        if token_ids.numel() and (int(token_ids.min()) < 0 or int(token_ids.max()) >= self.vocab_size):
            raise InvalidArgumentError(
                f"token ids must lie in [0, {self.vocab_size}); got min {int(token_ids.min())}, "
                f"max {int(token_ids.max())}: drop the request or map its tokens into the vocabulary"
            )
        T, d = token_ids.shape[0], self.head_dim
        h = self.embed[token_ids]  # [T, hidden]
        for i, w in enumerate(self.layers):
            x = rms_norm(h, w["in_norm"], self.eps)
            qkv = x @ w["qkv"].T
            if w["qkv_bias"] is not None:
                qkv = qkv + w["qkv_bias"]
            q, k, v = qkv.split([self.q_heads * d, self.kv_heads * d, self.kv_heads * d], dim=-1)
            q = self.rope(q.reshape(T, self.q_heads, d), positions)
            k = self.rope(k.reshape(T, self.kv_heads, d), positions)
            v = v.reshape(T, self.kv_heads, d)
            attn = attention(i, q, k, v).reshape(T, self.q_heads * d)
            h = h + self._all_reduce(attn @ w["o"].T)
            x = rms_norm(h, w["post_norm"], self.eps)
            gate, up = (x @ w["gate_up"].T).chunk(2, dim=-1)
            h = h + self._all_reduce((torch.nn.functional.silu(gate) * up) @ w["down"].T)
        h = rms_norm(h[logit_rows], self.final_norm, self.eps)
        return h @ self.lm_head.T


def dense_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                           q_start: int = 0, window: int | None = None) -> torch.Tensor:
    """Causal GQA attention of one sequence over contiguous K/V, optionally windowed.

    Parameters
    ----------
    q : [n_q, Hq, D] fp32
        Queries at positions ``q_start .. q_start + n_q - 1``.
    k, v : [n_kv, Hkv, D] fp32
        Keys/values at positions ``0 .. n_kv - 1`` (``n_kv >= q_start + n_q``).
    scale : float
    window : int, optional
        The query at position ``p`` attends to keys ``t`` with ``p - window < t <= p``: the last
        ``window`` tokens, its own included (transformers' ``sliding_window_overlay``, kvpool's
        kernels). Keys before the first query's window are never read, so rows a windowed KV-cache
        group released (padding in the gathered K/V) cannot reach the result, not even as 0 * NaN.

    Returns
    -------
    out : [n_q, Hq, D] fp32

    Examples
    --------
    >>> # window 32, queries at 40..44: keys 9..44 are read (9 = 40 - 32 + 1), query 44 sees 13..44
    """
    first = 0 if window is None else max(0, q_start - window + 1)
    k, v = k[first:], v[first:]
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale  # [Hq, n_q, n_kv - first]
    q_pos = torch.arange(q_start, q_start + q.shape[0], device=q.device)[:, None]
    k_pos = torch.arange(first, first + k.shape[0], device=q.device)[None, :]
    hidden = k_pos > q_pos
    if window is not None:
        hidden |= k_pos <= q_pos - window
    scores = scores.masked_fill(hidden, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, v)
