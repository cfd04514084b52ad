"""Bytes of one quantized linear weight, packing as the checkpoint formats store it.

- fp8 (e4m3): 1 byte per weight + float32 scales, one per ``weight_block_size`` block (DeepSeek-V3:
  128 x 128) or one per tensor.
- int8 (w8a8): 1 byte per weight + one float32 scale per output channel.
- AWQ / GPTQ (2-8 bit): packed bits per weight + per group of ``group_size`` input features one fp16
  scale and one packed zero point per output channel; GPTQ also stores ``g_idx`` (one int32 per input feature).
"""
from __future__ import annotations

import math


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
