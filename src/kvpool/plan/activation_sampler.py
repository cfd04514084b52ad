"""The sampler warm-up of vLLM's profile run: logits and the sampler's tensors for ``max_num_seqs`` rows.

After the dummy prefill, ``profile_run`` calls ``_dummy_sampler_run(last_hidden_states)``
(vllm/v1/worker/gpu_model_runner.py) on the last pipeline stage. What is live, for ``R = min(max_num_seqs,
max_num_batched_tokens)`` rows and vocabulary ``V`` (padded to ``Vp``, a multiple of 64, by
``VocabParallelEmbedding``):

- held by ``profile_run`` and ``_dummy_sampler_run``: the prefill's output ``[T, hidden]``, its last rows
  ``last_hidden_states [R, hidden]`` and their ``torch.rand_like`` copy (serving dtype);
- ``compute_logits`` (model_executor/layers/logits_processor.py): the LM head's ``[R, Vp / tp]``; at tp > 1
  the all-gather's ``[tp, R, Vp / tp]`` output and its reshaped ``[R, Vp]`` copy
  (``DeviceCommunicatorBase.all_gather``); a final-logit soft cap makes one more ``[R, V]`` at a time.
  The result stays referenced by ``_dummy_sampler_run`` through the sampler;
- ``Sampler.forward`` (v1/sample/sampler.py): ``logits.to(torch.float32)`` ``[R, V]``; the dummy metadata
  (temperature 0.5, top_p 0.9, top_k V - 1, not all greedy) takes ``TopKTopPSampler.forward_native``: the
  FlashInfer sampler is opt-in in 0.19 (``VLLM_USE_FLASHINFER_SAMPLER`` unset), and
  ``apply_top_k_top_p`` runs the Triton kernel for R >= 8 rows (``topk_topp_triton.py``: in place on the
  float32 logits, plus a cached float32 ``[min(next_pow2(min(SMs, R)), SMs), V]`` buffer that is never
  freed), else PyTorch's sort (float32 values + int64 indices + softmax + two bool masks);
  then ``softmax`` ``[R, V]`` float32 and ``random_sample``'s exponential ``q`` ``[R, V]`` float32.

Peak (R >= 8): ``R x (Vp x dtype + 12 x V) + buffer`` on top of the held hidden states. Derived from
reading the vLLM 0.19 source, not measured.
"""
from __future__ import annotations

from .activation_phase import Phase, ProfileShape

VOCAB_PADDING = 64  # vllm/model_executor/layers/vocab_parallel_embedding.py: DEFAULT_VOCAB_PADDING_SIZE
TRITON_TOPK_MIN_ROWS = 8  # v1/sample/ops/topk_topp_sampler.py: apply_top_k_top_p uses Triton from 8 rows
FP32 = 4
# PyTorch sort path (apply_top_k_top_p_pytorch), per element at its largest moment: float32 logits (4) +
# sorted values (4) + int64 indices (8) + top-k bool mask (1) + top-p softmax/cumsum (4) + top-p bool mask (1)
SORT_PATH_BYTES = 22


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def topk_buffer_rows(rows: int, sm_count: int) -> int:
    """Rows of the Triton top-k/top-p kernel's cached buffer: one per program, ``min(SMs, rows)`` programs.

    >>> topk_buffer_rows(1024, 132), topk_buffer_rows(100, 132)
    (132, 128)
    """
    programs = min(sm_count, rows)
    return min(_next_pow2(programs), sm_count)


def padded_vocab(vocab: int) -> int:
    """The LM head's rows across all ranks (vocab rounded up to a multiple of 64)."""
    return -(-vocab // VOCAB_PADDING) * VOCAB_PADDING


def _logits_bytes(spec, shape: ProfileShape, rows: int) -> tuple[int, int]:
    """(bytes at compute_logits' largest moment, bytes of the logits the sampler is handed)."""
    b, tp, vocab, vp = shape.dtype_bytes, shape.tp, spec.vocab_size, padded_vocab(spec.vocab_size)
    full = rows * vp * b
    moment = full + (rows * (vp // tp) * b + full if tp > 1 else 0)  # shard + gathered + reshaped copy
    handed = full
    if spec.final_logit_soft_cap:
        moment = max(moment, full + rows * vocab * b)  # `logits / soft_cap` beside the padded logits
        handed = rows * vocab * b
    return moment, handed


def sampler_phase(spec, shape: ProfileShape) -> Phase:
    """The sampler warm-up's largest moment; the Triton buffer it leaves is kept.

    >>> from kvpool.plan.model import load_model_spec
    >>> phase = sampler_phase(load_model_spec("llama-3.1-8b"), ProfileShape(tokens=8192, seqs=1024))
    >>> held = 8192 * 4096 * 2 + 2 * 1024 * 4096 * 2  # prefill output + last rows + rand_like
    >>> # bf16 logits + fp32 logits, probs, q + the Triton buffer of 132 SMs x 128,256 x 4 B
    >>> phase.live == held + 1024 * 128256 * (2 + 12) + 132 * 128256 * 4 == 1_990_283_264
    True
    """
    rows, b, t = shape.sampler_rows, shape.dtype_bytes, shape.tokens
    vocab = spec.vocab_size
    held = (t + 2 * rows) * spec.hidden_size * b
    logits_moment, handed = _logits_bytes(spec, shape, rows)
    if rows >= TRITON_TOPK_MIN_ROWS:
        buffer = topk_buffer_rows(rows, shape.sm_count) * vocab * FP32
        sampling = handed + 3 * rows * vocab * FP32 + buffer  # fp32 logits, probs, exponential q
        how = f"{rows:,} rows × {vocab:,} vocab: logits, fp32 logits, probs, q + top-k buffer"
    else:
        buffer = 0
        sampling = handed + rows * vocab * SORT_PATH_BYTES
        how = f"{rows:,} rows × {vocab:,} vocab: logits + PyTorch sort top-k/top-p"
    return Phase("sampler", held + max(logits_moment, sampling), kept=buffer, moment=how)


__all__ = ["sampler_phase", "topk_buffer_rows", "padded_vocab", "VOCAB_PADDING", "TRITON_TOPK_MIN_ROWS"]
