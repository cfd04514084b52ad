"""The vocabulary of the activation model: what sizes vLLM's profile run, and one phase of it.

vLLM 0.19 measures ``torch_peak_increase`` (``vllm/v1/worker/gpu_worker.py: determine_available_memory``):
the peak of torch-allocated bytes during ``GPUModelRunner.profile_run()`` above what was allocated before it.
The run is a sequence of phases (encoder profile, dummy prefill, sampler warm-up); each has a moment of
largest use, and some leave buffers behind that stay allocated for the rest of the run (a workspace, the
encoder cache). A `Phase` carries both, so the peak is the max over phases of what earlier phases keep plus
the phase's own largest moment.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ProfileShape:
    """What sizes one rank's profile run (vLLM's engine arguments and the card).

    Attributes
    ----------
    tokens : int
        ``max_num_batched_tokens``: the dummy prefill runs this many tokens through the model at once.
    seqs : int
        ``max_num_seqs``; the sampler warm-up has ``min(seqs, tokens)`` rows (``_dummy_run``'s ``num_reqs``).
    tp : int
        Tensor-parallel degree (heads, intermediate sizes and the vocabulary are split by it).
    dtype_bytes : int
        Bytes of the serving dtype (activations, logits before the float32 copy).
    sm_count : int
        Streaming multiprocessors of the card: the sampler's Triton top-k/top-p keeps one float32 vocabulary
        row per program, up to one program per SM.
    max_model_len : int
        Sizes MLA's profile-time stand-in for the decompressed K/V (0: unknown, taken as long).
    block_size : int
        KV block size (MLA's chunked-prefill workspace keeps at least one block per sequence).
    last_stage : bool
        Whether this rank holds the LM head (only the last pipeline stage runs the sampler warm-up).
    cublas_workspace : int
        torch's cuBLAS workspace, allocated through its caching allocator at the run's first GEMM (32 MiB on
        SM90). The defaults describe an H100.
    """

    tokens: int
    seqs: int
    tp: int = 1
    dtype_bytes: int = 2
    sm_count: int = 132
    max_model_len: int = 0
    block_size: int = 16
    last_stage: bool = True
    cublas_workspace: int = 32 << 20

    @property
    def sampler_rows(self) -> int:
        """Rows of the sampler warm-up: ``num_reqs = min(max_num_seqs, max_num_tokens)`` (``_dummy_run``)."""
        return min(self.seqs, self.tokens)


@dataclass(frozen=True)
class Phase:
    """One phase of the profile run, in bytes.

    Attributes
    ----------
    name : str
        "cublas workspace", "encoder", "prefill mlp", "prefill moe", "prefill attention" or "sampler".
    live : int
        Bytes allocated at the phase's largest moment, not counting what earlier phases keep.
    kept : int
        Of ``live``, the bytes that stay allocated until the run ends (workspaces, caches, inputs).
    moment : str
        What is live at that moment, in words (the plan's ``how`` line names it when it sets the peak).
    """

    name: str
    live: int
    kept: int = 0
    moment: str = ""


__all__ = ["ProfileShape", "Phase"]
