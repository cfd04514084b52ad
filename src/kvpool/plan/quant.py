"""Bytes of one quantized linear weight, packing as the checkpoint formats store it.

- fp8 (e4m3): 1 byte per weight + float32 scales, one per ``weight_block_size`` block (DeepSeek-V3:
  128 x 128) or one per tensor.
- int8 (w8a8): 1 byte per weight + one float32 scale per output channel.
- AWQ / GPTQ (2-8 bit): packed bits per weight + per group of ``group_size`` input features one fp16
  scale and one packed zero point per output channel; GPTQ also stores ``g_idx`` (one int32 per input feature).
- MXFP4 (gpt-oss): the MoE experts only (vLLM 0.19's ``Mxfp4Config`` leaves every linear layer, attention,
  router, embedding and LM head unquantized); see `mxfp4_expert_bytes` for what vLLM holds on a Hopper GPU.
"""
from __future__ import annotations

import math

# vLLM 0.19, fused_moe/oracle/mxfp4.py mxfp4_round_up_hidden_size_and_intermediate_size: the Triton backend
# (the one select_mxfp4_moe_backend picks on SM90) rounds each rank's expert intermediate size up to 64
MXFP4_INTERMEDIATE_ALIGN = 64
MXFP4_BLOCK = 32  # elements per e8m0 scale
# triton_kernels (bundled with vLLM 0.19) tensor_details/layout_details: HopperMXValueLayout.swizzle_data pads
# both dims of the packed [out, in / 2] uint8 values to 64; HopperMXScaleLayout (num_warps 8) pads the scales'
# rows to 2 * 8 * 2 * 8 = 256 and their columns to 2
_VALUE_ALIGN, _SCALE_ROW_ALIGN, _SCALE_COL_ALIGN = 64, 256, 2


def _round_up(value: int, align: int) -> int:
    return -(-value // align) * align


def mxfp4_expert_intermediate(intermediate: int, tp: int) -> int:
    """One rank's expert intermediate size as vLLM allocates it: ``intermediate // tp`` rounded up to 64.

    >>> mxfp4_expert_intermediate(2880, 2)  # gpt-oss at tp 2: 1,440 -> 1,472
    1472
    """
    return _round_up(intermediate // tp, MXFP4_INTERMEDIATE_ALIGN)


def mxfp4_expert_bytes(rows: int, cols: int) -> int:
    """Bytes vLLM 0.19 holds on a Hopper GPU for one expert's ``[rows, cols]`` (out x in) MXFP4 weight.

    The checkpoint's ``rows x cols / 2`` bytes of packed 4-bit values and ``rows x cols / 32`` uint8 (e8m0)
    scales are loaded, then ``Mxfp4MoEMethod.process_weights_after_loading`` (``quantization/mxfp4.py``)
    swizzles both for the Triton kernel (``_swizzle_mxfp4``): the values are replaced by their swizzled copy,
    padded (see ``_VALUE_ALIGN``), while the loaded scale parameter stays registered beside its swizzled,
    padded copy (the Triton branch of ``_setup_kernel`` only keeps the copy in a ``PrecisionConfig``). So:
    ``pad64(rows) x pad64(cols / 2) + pad256(rows) x pad2(cols / 32) + rows x cols / 32``.

    >>> mxfp4_expert_bytes(5760, 2880)  # gpt-oss gate_up at tp 1: 5,760 x 1,472 + 5,888 x 90 + 5,760 x 90
    9527040
    """
    values = _round_up(rows, _VALUE_ALIGN) * _round_up(cols // 2, _VALUE_ALIGN)
    swizzled_scales = _round_up(rows, _SCALE_ROW_ALIGN) * _round_up(cols // MXFP4_BLOCK, _SCALE_COL_ALIGN)
    return values + swizzled_scales + rows * (cols // MXFP4_BLOCK)


def quantized_bytes(spec, rows: int, cols: int) -> int:
    """Bytes of a ``[rows, cols]`` (out x in) linear weight quantized as ``spec.quant_method`` says."""
    method, bits = spec.quant_method, spec.weight_bits
    if method == "fp8":
        if spec.quant_block_size:
            b_out, b_in = spec.quant_block_size
            return rows * cols + math.ceil(rows / b_out) * math.ceil(cols / b_in) * 4
        return rows * cols + 4
    if method == "int8":
        return rows * cols + rows * 4
    if method in ("awq", "gptq", "int4"):
        group = spec.quant_group_size if spec.quant_group_size and spec.quant_group_size > 0 else cols
        groups = math.ceil(cols / group)
        packed = math.ceil(rows * cols * bits / 8)
        scales = groups * rows * 2
        zeros = math.ceil(groups * rows * bits / 8) if spec.quant_zero_point else 0
        g_idx = cols * 4 if method == "gptq" else 0
        return packed + scales + zeros + g_idx
    raise ValueError(f"unknown quantization method {method!r}")
