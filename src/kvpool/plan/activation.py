"""The activation term: vLLM 0.19's ``torch_peak_increase``, phase by phase.

vLLM subtracts from the KV budget the peak of torch-allocated bytes during ``GPUModelRunner.profile_run()``
above what was allocated before it (vllm/v1/worker/gpu_worker.py: ``determine_available_memory``;
vllm/utils/mem_utils.py: ``memory_profiling`` resets the peak statistics first). ``profile_run`` runs,
in order, on each rank:

0. torch's cuBLAS workspace, allocated at the first GEMM and kept (``cublas_workspace_bytes``);
1. ``encoder`` (multimodal models): a batch of dummy images through the vision tower, outputs kept in
   ``encoder_cache`` until the end (`kvpool.plan.activation_encoder`);
2. the dummy prefill of ``max_num_batched_tokens`` tokens: ``prefill mlp`` (dense layers, which run
   first where a MoE model has them), ``prefill moe`` (it leaves the fused-MoE workspace allocated),
   ``prefill attention`` (`kvpool.plan.activation_prefill`);
3. ``sampler``: the sampler warm-up of ``min(max_num_seqs, max_num_batched_tokens)`` rows over the full
   vocabulary, on the last pipeline stage (`kvpool.plan.activation_sampler`).

The peak is the max over phases of what the earlier phases keep plus the phase's own largest moment.
Worked example, Llama-3.1-8B at tp 1, 8,192 tokens, 1,024 sequences, bf16, on an H100: torch's cuBLAS
workspace 32 MiB (kept), prefill 0.84 GiB (the MLP's act-and-mul), sampler 1.85 GiB (1,024 x 128,256
logits: bf16 + three float32 tensors, the Triton top-k buffer of 132 rows and the held hidden states), so
the sampler sets the peak at 1.88 GiB:

>>> from kvpool.plan.model import load_model_spec
>>> peak = profile_run_peak(load_model_spec("llama-3.1-8b"), ProfileShape(tokens=8192, seqs=1024))
>>> peak.deciding.name, peak.bytes == 32 * 2**20 + 1_990_283_264, round(peak.bytes / 2**30, 2)
('sampler', True, 1.88)
"""
from __future__ import annotations

from dataclasses import dataclass

from .activation_encoder import encoder_phase, profiled_items
from .activation_phase import Phase, ProfileShape
from .activation_prefill import attention_phase, dense_mlp_phase, mla_workspace_tokens, moe_phase
from .activation_sampler import TRITON_TOPK_MIN_ROWS, sampler_phase, topk_buffer_rows
from .dtypes import DTYPES
from .hardware import capability, sm_count


@dataclass(frozen=True)
class ActivationPeak:
    """The profile run's phases in order and the peak they reach.

    ``at[i]`` is the bytes allocated at phase i's largest moment: what phases 0..i-1 keep plus its ``live``.
    """

    phases: tuple[Phase, ...]
    at: tuple[int, ...]

    @property
    def bytes(self) -> int:
        return max(self.at)

    @property
    def deciding(self) -> Phase:
        return self.phases[self.at.index(self.bytes)]

    def phase_bytes(self, name: str) -> int:
        """Bytes at the named phase's largest moment (0 when the run has no such phase)."""
        return next((a for p, a in zip(self.phases, self.at) if p.name == name), 0)


def _dense_after_moe(spec) -> bool:
    """Whether a dense-MLP layer runs after the first MoE layer (Qwen-MoE ``mlp_only_layers``), i.e. beside
    the fused-MoE workspace; DeepSeek's dense layers come first."""
    kinds = [spec.is_moe_layer(i) for i in range(spec.num_layers)]
    return True in kinds and False in kinds[kinds.index(True):]


# torch's cuBLAS workspace (aten/src/ATen/cuda/CublasHandlePool.cpp: parseChosenWorkspaceSize, getNewWorkspace):
# ":4096:8" = 32 MiB on SM90, ":4096:2:16:8" = 8.125 MiB elsewhere (CUBLAS_WORKSPACE_CONFIG unset), allocated by
# the caching allocator at the first GEMM of a (handle, stream) and kept: vLLM's torch peak counts it.
CUBLAS_WORKSPACE_SM90 = 4096 * 1024 * 8
CUBLAS_WORKSPACE_OTHER = 4096 * 1024 * 2 + 16 * 1024 * 8


def cublas_workspace_bytes(gpu) -> int:
    """torch's default cuBLAS workspace on this card."""
    return CUBLAS_WORKSPACE_SM90 if capability(gpu) == (9, 0) else CUBLAS_WORKSPACE_OTHER


def profile_phases(spec, shape: ProfileShape) -> tuple[Phase, ...]:
    """The phases of vLLM's ``profile_run`` for this model and shape, in the order they run."""
    # no GEMM runs between vLLM's peak reset and the profile run for an unquantized checkpoint
    phases = [Phase("cublas workspace", shape.cublas_workspace, kept=shape.cublas_workspace,
                    moment="torch's cuBLAS workspace")]
    if getattr(spec, "vision", None) is not None:
        phases.append(encoder_phase(spec.vision, shape))
    dense = dense_mlp_phase(spec, shape) if spec.num_layers > spec.num_moe_layers else None
    if dense and not _dense_after_moe(spec):
        phases.append(dense)
    if spec.is_moe:
        phases.append(moe_phase(spec, shape))
    if dense and _dense_after_moe(spec):
        phases.append(dense)
    phases.append(attention_phase(spec, shape))  # after MoE: later layers' attention runs beside its workspace
    if shape.last_stage:
        phases.append(sampler_phase(spec, shape))
    return tuple(phases)


def peak_of(phases: tuple[Phase, ...]) -> ActivationPeak:
    """The running peak: each phase's moment on top of what the earlier phases keep.

    >>> peak_of((Phase("a", 10, kept=4), Phase("b", 7), Phase("c", 3, kept=3))).at
    (10, 11, 7)
    """
    at, kept = [], 0
    for phase in phases:
        at.append(kept + phase.live)
        kept += phase.kept
    return ActivationPeak(tuple(phases), tuple(at))


def profile_run_peak(spec, shape: ProfileShape) -> ActivationPeak:
    """vLLM's ``torch_peak_increase`` for ``spec`` on one rank, with its phases."""
    return peak_of(profile_phases(spec, shape))


def profile_shape(req, last: bool) -> ProfileShape:
    """What sizes vLLM's profile run on one rank of a `PlanRequest` (the last stage runs the sampler)."""
    return ProfileShape(tokens=req.max_batched_tokens, seqs=req.max_seqs, tp=req.tp,
                        dtype_bytes=DTYPES[req.serving_dtype].bytes, sm_count=sm_count(req.gpu),
                        max_model_len=req.max_model_len, block_size=req.block_size, last_stage=last,
                        cublas_workspace=cublas_workspace_bytes(req.gpu))


def activation_bytes(spec, tp: int, tokens: int, max_seqs: int, dtype_bytes: int, last_stage: bool = True,
                     sm_count: int = 132) -> dict:
    """The profile-run peak as a dict of bytes: each phase's moment (``at``), ``forward_peak`` (the largest
    prefill phase), ``sampler`` and ``peak``. Kept for callers sizing another batch (the CUDA-graph pool)."""
    shape = ProfileShape(tokens=tokens, seqs=min(max_seqs, tokens), tp=tp, dtype_bytes=dtype_bytes,
                         sm_count=sm_count, last_stage=last_stage)
    return peak_parts(profile_run_peak(spec, shape))


def peak_parts(peak: ActivationPeak) -> dict:
    """``{phase name: bytes at its moment, "forward_peak", "sampler", "kept_<phase>", "peak"}`` (ints)."""
    parts = {p.name.replace(" ", "_"): a for p, a in zip(peak.phases, peak.at)}
    parts.update({f"kept_{p.name.replace(' ', '_')}": p.kept for p in peak.phases if p.kept})
    prefill = [a for p, a in zip(peak.phases, peak.at) if p.name.startswith("prefill")]
    return {**parts, "forward_peak": max(prefill), "sampler": peak.phase_bytes("sampler"), "peak": peak.bytes}


def activation_assumptions(spec, shape: ProfileShape, eager: bool = False) -> list[str]:
    """What the activation term takes as given, and where it stays uncertain, one line each."""
    rows = shape.sampler_rows
    out = [f"activation: vLLM 0.19 profile_run's torch peak: prefill of {shape.tokens:,} tokens through the "
           f"compiled graph with no attention kernel (no KV writes, no TxT scores), then the sampler warm-up of "
           f"{rows:,} rows; derived from vLLM's source, not measured (Inductor's buffer reuse taken as "
           f"freed-after-last-use" + ("; --enforce-eager's custom-op kernels differ by about one [T, hidden]"
                                     if eager else "") + ")"]
    if shape.last_stage:
        out.append("sampler: the default path (FlashInfer sampling is opt-in): fp32 logits, softmax and exponential "
                   + ("in [rows, vocab] + the Triton top-k/top-p buffer of "
                      f"{topk_buffer_rows(rows, shape.sm_count)} rows, kept" if rows >= TRITON_TOPK_MIN_ROWS
                      else "with PyTorch's sort for top-k/top-p (under 8 rows)"))
    if spec.is_moe and spec.quant_method == "mxfp4":
        out.append("MoE: gpt-oss MXFP4 as on SM90 (triton_kernels matmul_ogs, no workspace); Blackwell's "
                   "FlashInfer TRT-LLM and A100's Marlin MoE are not modelled")
    elif spec.is_moe:
        out.append("MoE: vLLM's Triton fused-MoE workspace sized for all tokens, kept after the first MoE layer"
                   + ("; a quantized checkpoint's MoE kernel (DeepGEMM, CUTLASS, Marlin) may size it otherwise"
                      if spec.quant_method else ""))
    if spec.is_mla:
        out.append(f"MLA: the profile's stand-in decompressed K/V of {mla_workspace_tokens(shape):,} tokens "
                   "(chunked-prefill workspace size)")
    if getattr(spec, "vision", None) is not None:
        out.append(f"encoder: {profiled_items(spec.vision, shape)} dummy images through the vision tower, "
                   "eagerly; pixels and outputs kept in encoder_cache until the sampler ends")
    elif getattr(spec, "vision_uncounted", ""):
        out.append(f"encoder: the {spec.vision_uncounted} tower's profile is not modelled (activation too low)")
    return out


__all__ = ["ActivationPeak", "activation_assumptions", "Phase", "ProfileShape", "profile_phases", "profile_run_peak", "peak_of",
           "peak_parts", "profile_shape", "activation_bytes", "cublas_workspace_bytes"]
