"""The one dtype table of kvpool: names, spellings, bytes per element and the torch dtype of each.

The planner, the command line, the page cache and the runtime all read dtypes here, so a spelling that
one accepts the others accept too. The torch dtype is a *name* (``getattr(torch, torch_dtype_name(n))``):
the planner never imports torch.

kvpool's fp8 is e4m3 (``torch.float8_e4m3fn``, largest value 448), the format its kernels quantize to;
e5m2 is refused rather than silently stored as e4m3.

>>> resolve_kv_dtype("auto", "bf16"), resolve_kv_dtype("float8_e4m3fn", "bf16"), dtype_bytes("fp8")
('bf16', 'fp8', 1)
>>> serving_dtype("fp32"), torch_dtype_name("bf16")
('bf16', 'bfloat16')
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import InvalidArgumentError


@dataclass(frozen=True)
class DType:
    """One storage dtype: canonical ``name``, bytes per element, torch's name for it, other spellings."""

    name: str
    bytes: int
    torch_name: str
    aliases: tuple[str, ...]
    serving: bool  # activations and unquantized weights may run in it (fp8 is a KV-cache format only)


DTYPES = {d.name: d for d in (
    DType("fp32", 4, "float32", ("float32", "float"), serving=True),
    DType("fp16", 2, "float16", ("float16", "half"), serving=True),
    DType("bf16", 2, "bfloat16", ("bfloat16",), serving=True),
    DType("fp8", 1, "float8_e4m3fn", ("fp8_e4m3", "float8_e4m3fn"), serving=False),
)}
KV_DTYPE_NAMES = tuple(DTYPES)  # what the KV pages may hold
SERVING_DTYPE_NAMES = tuple(n for n, d in DTYPES.items() if d.serving)  # what a model may be served in
_SPELLINGS = {spelling: d.name for d in DTYPES.values() for spelling in (d.name, *d.aliases)}


def find_dtype(value) -> str | None:
    """The canonical name of a spelling (``"bfloat16"``, ``"torch.float16"``, ``"HALF"``), or None."""
    return _SPELLINGS.get(str(value).strip().lower().removeprefix("torch."))


def canonical_dtype(value, what: str = "kv_dtype", allowed: tuple[str, ...] = KV_DTYPE_NAMES) -> str:
    """The canonical name of ``value`` among ``allowed``; InvalidArgumentError naming them otherwise."""
    name = find_dtype(value)
    if name not in allowed:
        names = ", ".join(f"{n} (e4m3)" if n == "fp8" else n for n in allowed)
        raise InvalidArgumentError(f"{what} must be one of {names}, got {value!r}")
    return name


def serving_dtype(checkpoint, dtype=None) -> str:
    """The dtype activations and unquantized weights run in: ``dtype``, or for None / ``"auto"`` the
    checkpoint's, with fp32 checkpoints served in bf16 as vLLM does by default (``--dtype auto``).

    ``checkpoint`` is the checkpoint's dtype name, or a `ModelSpec` (its ``dtype``).
    """
    if dtype is None or str(dtype).strip().lower() == "auto":
        name = getattr(checkpoint, "dtype", checkpoint)
        return "bf16" if name == "fp32" else name
    return canonical_dtype(dtype, "dtype", ("auto",) + SERVING_DTYPE_NAMES)


def resolve_kv_dtype(kv_dtype, serving: str) -> str:
    """The canonical KV dtype; ``"auto"`` means ``serving`` (the serving dtype, see `serving_dtype`)."""
    if str(kv_dtype).strip().lower() == "auto":
        return serving
    return canonical_dtype(kv_dtype, "kv_dtype", ("auto",) + KV_DTYPE_NAMES)


def dtype_bytes(name: str) -> int:
    """Bytes per element of the dtype ``name`` (any spelling)."""
    return DTYPES[canonical_dtype(name, "dtype")].bytes


def torch_dtype_name(name: str) -> str:
    """torch's name of the dtype ``name`` (any spelling): ``getattr(torch, torch_dtype_name("fp8"))``."""
    return DTYPES[canonical_dtype(name, "dtype")].torch_name


__all__ = ["DType", "DTYPES", "KV_DTYPE_NAMES", "SERVING_DTYPE_NAMES", "find_dtype", "canonical_dtype",
           "serving_dtype", "resolve_kv_dtype", "dtype_bytes", "torch_dtype_name"]
