"""Backend choice and argument checks shared by the four kernels.

Backend: the Triton kernels run on CUDA tensors, the torch references (``reference.py``) on
everything else. ``KVPOOL_KERNELS=triton`` forces Triton (on CPU tensors only together with
``TRITON_INTERPRET=1``, Triton's interpreter), ``KVPOOL_KERNELS=torch`` forces the references.

``KVPOOL_DEBUG=1`` turns on range checks of block ids, slots and sequence lengths. They read the
index tensors back to the host (one synchronisation per call), so they are off by default; without
them an out-of-range id makes a kernel read or write out of bounds.

The cheap checks (shapes, dtypes, devices, strides) always run: they cost no synchronisation.
"""
from __future__ import annotations

import functools
import os

import torch

from ..errors import BlockIndexError, KernelError
from .proof_cache import env_value

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn value
CACHE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, FP8_DTYPE)
COMPUTE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)


def interpreting() -> bool:
    """True when Triton runs its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return env_value("TRITON_INTERPRET") == "1"


def debug_checks() -> bool:
    """True when ``KVPOOL_DEBUG=1``: range-check ids and slots before launching."""
    return (env_value("KVPOOL_DEBUG") or "0") not in ("", "0")


def use_triton(*tensors: torch.Tensor) -> bool:
    """Decide the backend for one call from ``KVPOOL_KERNELS`` and the tensors' device.

    Raises
    ------
    KernelError
        ``KVPOOL_KERNELS`` holds an unknown value, or Triton is forced on CPU tensors without
        ``TRITON_INTERPRET=1``.
    MissingDependencyError
        Triton is chosen but not installed (``pip install "kvpool[gpu]"``).
    """
    choice = os.environ.get("KVPOOL_KERNELS", "").strip().lower()
    on_cuda = all(t.is_cuda for t in tensors)
    if choice in ("", "auto"):
        return on_cuda and _require_triton()
    if choice == "torch":
        return False
    if choice == "triton":
        if not on_cuda and not interpreting():
            raise KernelError(
                "KVPOOL_KERNELS=triton with CPU tensors needs Triton's interpreter: set "
                "TRITON_INTERPRET=1 before triton is imported, or move the tensors to a CUDA device")
        return _require_triton()
    raise KernelError(f"KVPOOL_KERNELS={choice!r} is not a backend: use 'triton', 'torch' or leave it unset")


@functools.cache  # a success is remembered: one dict lookup per kernel call after the first
def _require_triton() -> bool:
    """True, or MissingDependencyError naming the ``gpu`` extra when triton is not installed."""
    from .._optional_deps import require  # noqa: PLC0415

    require("triton", "kvpool's Triton kernels (CUDA tensors, or KVPOOL_KERNELS=triton)", extra="gpu")
    return True


def scale_launch_args(k_cache, v_cache, k_scale, v_scale):
    """fp8 scale arguments of a kernel launch: ``(SCALE_MODE, k_scale, v_scale, (stride_b, stride_t, stride_h))``.

    SCALE_MODE is 0 (no scales: the cache tensors stand in for the unused pointers), 1 (per head,
    ``[kv_heads]``) or 2 (per token and head, ``[num_blocks, block_size, kv_heads]``). The scales may
    be strided views (``check_scales`` makes k and v share strides): head ``h`` is at ``h * stride_h``.
    """
    if k_cache.dtype != FP8_DTYPE:
        return 0, k_cache, v_cache, (0, 0, 0)
    if k_scale.dim() == 1:
        return 1, k_scale, v_scale, (0, 0, k_scale.stride(0))
    return 2, k_scale, v_scale, k_scale.stride()


def same_device(name_to_tensor: dict) -> None:
    """All tensors on one device, else :class:`KernelError` naming them."""
    devices = {name: t.device for name, t in name_to_tensor.items() if t is not None}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise KernelError(f"tensors must share one device, got {listing}: move them with .to(device)")


def check_cache_pair(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    """Check two page tensors ``[num_blocks, block_size, kv_heads, head_dim]``.

    Any strides are accepted as long as ``head_dim`` is contiguous (stride 1): an HND page tensor
    ``[num_blocks, kv_heads, block_size, head_dim]`` is passed as ``cache.permute(0, 2, 1, 3)``.
    """
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor):
            raise KernelError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise KernelError(
                f"{name} must be [num_blocks, block_size, kv_heads, head_dim] (4-D), got shape "
                f"{tuple(t.shape)}")
        if t.dtype not in CACHE_DTYPES:
            raise KernelError(f"{name} dtype {t.dtype} is not supported: use float32, float16, bfloat16 or "
                              "float8_e4m3fn")
        if t.stride(-1) != 1:
            raise KernelError(f"{name} must be contiguous along head_dim (stride 1), got strides {t.stride()}: "
                              "pass a view whose last dimension is contiguous")
    if k_cache.shape != v_cache.shape or k_cache.dtype != v_cache.dtype:
        raise KernelError(f"k_cache {tuple(k_cache.shape)} {k_cache.dtype} and v_cache {tuple(v_cache.shape)} "
                          f"{v_cache.dtype} must have the same shape and dtype")
    if k_cache.stride() != v_cache.stride():
        raise KernelError(f"k_cache strides {k_cache.stride()} and v_cache strides {v_cache.stride()} differ: "
                          "K and V pages must share one layout")
    same_device({"k_cache": k_cache, "v_cache": v_cache})


def check_scales(k_cache: torch.Tensor, k_scale, v_scale) -> str | None:
    """Check the fp8 scales of a page tensor; return ``None``, ``"head"`` or ``"token_head"``.

    fp8 caches need both ``k_scale`` and ``v_scale``, float32, either ``[kv_heads]`` (one scale per
    head) or ``[num_blocks, block_size, kv_heads]`` (one scale per token and head). Other dtypes take
    no scales.
    """
    is_fp8 = k_cache.dtype == FP8_DTYPE
    if not is_fp8:
        if k_scale is not None or v_scale is not None:
            raise KernelError(f"k_scale/v_scale are only for float8_e4m3fn caches, the cache is {k_cache.dtype}: "
                              "drop the scales")
        return None
    if k_scale is None or v_scale is None:
        raise KernelError("a float8_e4m3fn cache needs k_scale and v_scale (float32 [kv_heads] or "
                          "[num_blocks, block_size, kv_heads])")
    num_blocks, block_size, kv_heads, _ = k_cache.shape
    kinds = []
    for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
        if not isinstance(s, torch.Tensor) or s.dtype != torch.float32:
            raise KernelError(f"{name} must be a float32 tensor, got "
                              f"{getattr(s, 'dtype', type(s).__name__)}")
        if tuple(s.shape) == (kv_heads,):
            kinds.append("head")
        elif tuple(s.shape) == (num_blocks, block_size, kv_heads):
            kinds.append("token_head")
        else:
            raise KernelError(f"{name} shape {tuple(s.shape)} fits neither [kv_heads]=({kv_heads},) nor "
                              f"[num_blocks, block_size, kv_heads]=({num_blocks}, {block_size}, {kv_heads})")
        if s.device != k_cache.device:
            raise KernelError(f"{name} is on {s.device} but the cache is on {k_cache.device}")
    if kinds[0] != kinds[1] or k_scale.stride() != v_scale.stride():
        raise KernelError(f"k_scale {tuple(k_scale.shape)} and v_scale {tuple(v_scale.shape)} must have the "
                          "same shape and strides")
    return kinds[0]


def check_sinks(sinks, q_heads: int, device: torch.device) -> None:
    """Attention sinks: None, or a float32 ``[q_heads]`` tensor on the queries' device (any stride).

    Values are checked (no NaN, no +inf; ``-inf`` is "no sink") where that costs no sync: CPU tensors, or
    any tensor with ``KVPOOL_DEBUG=1``.
    """
    if sinks is None:
        return
    if not isinstance(sinks, torch.Tensor):
        raise KernelError(f"sinks must be a float32 tensor [q_heads]=[{q_heads}] or None, got "
                          f"{type(sinks).__name__}: pass torch.as_tensor(sinks, dtype=torch.float32)")
    if tuple(sinks.shape) != (q_heads,):
        raise KernelError(f"sinks shape {tuple(sinks.shape)} must be [q_heads]=({q_heads},): one logit per query "
                          "head of this shard (slice the model's sinks to the heads this rank holds)")
    if sinks.dtype != torch.float32:
        raise KernelError(f"sinks dtype {sinks.dtype} must be float32: pass sinks.float()")
    if sinks.device != device:
        raise KernelError(f"sinks is on {sinks.device} but q is on {device}: move it with sinks.to(q.device)")
    if (sinks.device.type == "cpu" or debug_checks()) and bool((torch.isnan(sinks) | (sinks == float("inf"))).any()):
        bad = int((torch.isnan(sinks) | (sinks == float("inf"))).nonzero()[0, 0])
        raise KernelError(f"sinks[{bad}]={float(sinks[bad])} is not a logit: sinks must be finite or -inf (no sink)")


def check_index(name: str, t, dim: int) -> None:
    """An index tensor (block table, slots, lengths) of ``dim`` dims, int32/int64, innermost contiguous."""
    if not isinstance(t, torch.Tensor):
        raise KernelError(f"{name} must be a torch.Tensor of int32, got {type(t).__name__}")
    if t.dim() != dim:
        raise KernelError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    if t.dtype not in INDEX_DTYPES:
        raise KernelError(f"{name} must be int32 or int64, got {t.dtype}")
    if t.numel() and t.stride(-1) != 1:
        raise KernelError(f"{name} must be contiguous along its last dimension, got strides {t.stride()}")


def check_block_table(block_table: torch.Tensor, seq_lens: torch.Tensor, num_blocks: int,
                      block_size: int) -> None:
    """Shapes always; with ``KVPOOL_DEBUG=1`` also lengths and the used block ids' range."""
    check_index("block_table", block_table, 2)
    check_index("seq_lens", seq_lens, 1)
    if block_table.shape[0] != seq_lens.shape[0]:
        raise KernelError(f"block_table has {block_table.shape[0]} rows but seq_lens has {seq_lens.shape[0]}: "
                          "one row per sequence")
    if not debug_checks() or seq_lens.numel() == 0:
        return
    max_blocks = block_table.shape[1]
    lens = seq_lens.to(torch.int64)
    bad = (lens < 0) | (lens > max_blocks * block_size)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise BlockIndexError(f"seq_lens[{i}]={int(lens[i])} is outside [0, {max_blocks * block_size}] "
                              f"(block_table holds {max_blocks} blocks of {block_size} tokens)")
    used = torch.arange(max_blocks, device=block_table.device)[None, :] < (
        (lens + block_size - 1) // block_size)[:, None]
    ids = block_table.to(torch.int64)
    bad = used & ((ids < 0) | (ids >= num_blocks))
    if bool(bad.any()):
        b, j = (int(x) for x in bad.nonzero()[0])
        raise BlockIndexError(f"block_table[{b}, {j}]={int(ids[b, j])} is outside [0, {num_blocks}) "
                              f"(sequence {b} has {int(lens[b])} tokens): the table names a block the cache lacks")


def check_slots(slot_mapping: torch.Tensor, num_slots: int) -> None:
    """With ``KVPOOL_DEBUG=1``: every slot is -1 (skip) or in ``[0, num_slots)``."""
    if not debug_checks() or slot_mapping.numel() == 0:
        return
    s = slot_mapping.to(torch.int64)
    bad = (s < -1) | (s >= num_slots)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise BlockIndexError(f"slot_mapping[{i}]={int(s[i])} is outside [-1, {num_slots}) "
                              "(slot = block_id * block_size + offset, -1 skips a padding token)")
