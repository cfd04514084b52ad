"""The KV pages of one tensor-parallel shard, carved out of a single allocation.

Every rank of a TP group builds its own `PagedKVCache` with the same ``num_blocks`` and block
size: block ids (from the group's one `BlockAllocator`) mean the same thing on every rank, while each
rank's pages hold only its own KV heads (`kv_head_ids`). Shapes and byte counts come from the
planner's `kv_shard_layout`, so `memory_bytes` is exactly the planner's
``bytes_per_block_per_gpu * num_blocks``.

Memory layout of the one flat ``uint8`` buffer (no padding anywhere, so the byte count is exact):
first the page tensors of every layer, ``K_0, V_0, K_1, V_1, ...`` (all in the KV dtype), then, for
fp8 with per-token scales, the float32 scale tensors ``Ks_0, Vs_0, Ks_1, ...``. Grouping by dtype
keeps every view's offset a multiple of its element size; the scale group starts after a whole
number of pages, a multiple of 4 bytes for any block size >= 2 or even head_dim (checked).
"""
from __future__ import annotations

import torch

from ._arrays import check_geometry
from ._device_check import checked_device
from .errors import InvalidArgumentError

KV_DTYPES = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "fp8": torch.float8_e4m3fn,
}
_DTYPE_ALIASES = {
    "fp32": "fp32", "float32": "fp32", "float": "fp32",
    "fp16": "fp16", "float16": "fp16", "half": "fp16",
    "bf16": "bf16", "bfloat16": "bf16",
    "fp8": "fp8", "fp8_e4m3": "fp8", "float8_e4m3fn": "fp8",
}
LAYOUTS = ("NHD", "HND")
FP8_SCALES = ("per_token_head", "per_head", "per_tensor")
_SCALE_DTYPE = torch.float32


def dtype_name(dtype, what: str = "dtype", allow_fp8: bool = True) -> str:
    """Normalise a torch dtype or a name (``"bf16"``, ``"bfloat16"``, ``torch.bfloat16``) to fp32/fp16/bf16/fp8."""
    if isinstance(dtype, torch.dtype):
        key = str(dtype).removeprefix("torch.")
    else:
        key = str(dtype).strip().lower()
    name = _DTYPE_ALIASES.get(key)
    if name is None or (name == "fp8" and not allow_fp8):
        allowed = "fp32, fp16, bf16" + (", fp8" if allow_fp8 else "")
        raise InvalidArgumentError(f"{what}={dtype!r} is not supported; use one of {allowed}")
    return name


def _positive_int(value, what: str, fix: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) and not hasattr(value, "__index__"):
        raise InvalidArgumentError(f"{what}={value!r} must be an int; {fix}")
    value = int(value)
    if value <= 0:
        raise InvalidArgumentError(f"{what}={value} must be > 0; {fix}")
    return value


class PagedKVCache:
    """Page tensors of one TP shard: a K and a V tensor per layer, views of ONE allocation.

    Build it with `for_shard`. Attributes
    ----------
    k_caches, v_caches : list of torch.Tensor
        Per layer, ``[num_blocks, block_size, kv_heads, head_dim]`` (NHD) or
        ``[num_blocks, kv_heads, block_size, head_dim]`` (HND) in the KV dtype. MLA models keep one
        latent per token (``kv_heads = 1``, ``head_dim = kv_lora_rank + qk_rope_head_dim``) in
        ``k_caches``; their ``v_caches[layer]`` is ``None``.
    k_scales, v_scales : list of torch.Tensor or None
        fp8 only, else ``None``. ``fp8_scales="per_token_head"``: ``[num_blocks, block_size, kv_heads]``
        float32 inside the pool, written by ``write_kv`` (amax / 448 per token and head).
        ``fp8_scales="per_head"``: ``[kv_heads]`` float32, a tiny tensor outside the pool, initialised
        to 1.0; set it from calibration (``cache.k_scales[layer].copy_(...)``) before writing.
        ``fp8_scales="per_tensor"``: one float32 per layer and tensor (vLLM's ``k_scale``), outside the
        pool, seen as ``[kv_heads]`` with stride 0; set it with ``cache.k_scales[layer][:1].fill_(s)``.
        MLA: ``v_scales[layer]`` is ``None``.
    kv_head_ids : list of int
        Global KV head indices this shard holds (for MLA ``[0]``: the latent is replicated).

    Kernels take NHD page tensors; pass an HND tensor as ``t.permute(0, 2, 1, 3)``.
    """

    def __init__(self, *, layout, buffer, k_caches, v_caches, k_scales, v_scales, kv_head_ids,
                 num_blocks, block_size, page_layout, dtype, kv_dtype, fp8_scales, tp_rank, tp_size,
                 is_mla):
        self.kv_layout = layout  # the planner's KVShardLayout this cache was built from
        self._buffer = buffer
        self.k_caches = k_caches
        self.v_caches = v_caches
        self.k_scales = k_scales
        self.v_scales = v_scales
        self.kv_head_ids = kv_head_ids
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.layout = page_layout
        self.dtype = dtype
        self.kv_dtype = kv_dtype
        self.fp8_scales = fp8_scales
        self.tp_rank = tp_rank
        self.tp_size = tp_size
        self.is_mla = is_mla

    # ----------------------------------------------------------------- construction
    @classmethod
    def for_shard(cls, spec, num_blocks: int, block_size: int, tp_rank: int, tp_size: int, device,
                  dtype=None, kv_dtype="auto", layout: str = "NHD",
                  fp8_scales: str = "per_token_head") -> "PagedKVCache":
        """Allocate the pages of TP rank `tp_rank` of `tp_size`.

        Parameters
        ----------
        spec : ModelSpec, preset name, path or HF config dict
            The model (see ``kvpool.plan.load_model_spec``).
        num_blocks : int
            Blocks in the pool (the same on every rank, e.g. the planner's or ``size_kv_pool``'s figure).
        block_size : int
            Tokens per block, a power of two.
        tp_rank, tp_size : int
            This shard and the tensor-parallel degree. Heads split contiguously; with
            ``tp_size > num_kv_heads`` ranks share (replicate) a head.
        device : str or torch.device
        dtype : torch.dtype or str, optional
            Compute dtype of queries and outputs (default: the serving dtype, the checkpoint's
            ``spec.dtype`` except fp32 checkpoints, served in bf16 as the planner and vLLM do).
        kv_dtype : str
            Page dtype: ``"auto"`` (= `dtype`), ``"fp32"``, ``"fp16"``, ``"bf16"`` or ``"fp8"`` (e4m3).
        layout : str
            ``"NHD"`` or ``"HND"`` page layout.
        fp8_scales : str
            ``"per_token_head"`` (scales in the pool), ``"per_head"`` or ``"per_tensor"`` (scales outside it).

        Raises
        ------
        InvalidArgumentError
            A bad count, rank, dtype, layout, a TP degree that does not split the KV heads, or a
            device that is not there (``"cuda"`` without a visible CUDA device).
        """
        from .plan.model import load_model_spec  # noqa: PLC0415 (keeps `import kvpool.cache` light)
        from .plan.kv import kv_shard_layout, serving_dtype, shard_kv_heads  # noqa: PLC0415

        spec = load_model_spec(spec)
        num_blocks = _positive_int(num_blocks, "num_blocks", "size the pool with at least one block")
        block_size = _positive_int(block_size, "block_size", "use a power of two such as 16")
        if block_size & (block_size - 1):
            raise InvalidArgumentError(f"block_size={block_size} is not a power of two; use 8, 16, 32, ...")
        check_geometry(num_blocks, block_size, "PagedKVCache")  # slot ids must fit in int32
        tp_size = _positive_int(tp_size, "tp_size", "pass the tensor-parallel degree (1 without TP)")
        if isinstance(tp_rank, bool) or not hasattr(tp_rank, "__index__") or not 0 <= int(tp_rank) < tp_size:
            raise InvalidArgumentError(f"tp_rank={tp_rank!r} must be an int in [0, {tp_size}) for tp_size={tp_size}")
        tp_rank = int(tp_rank)
        if layout not in LAYOUTS:
            raise InvalidArgumentError(f"layout={layout!r} is not supported; use 'NHD' or 'HND'")
        if fp8_scales not in FP8_SCALES:
            raise InvalidArgumentError(f"fp8_scales={fp8_scales!r} is not supported; use 'per_token_head', 'per_head' "
                                       "or 'per_tensor'")
        total_heads = 1 if spec.is_mla else int(spec.num_kv_heads)
        if not spec.is_mla:
            if tp_size <= total_heads and total_heads % tp_size:
                raise InvalidArgumentError(
                    f"tp_size={tp_size} does not divide the {total_heads} KV heads of {spec.name}; "
                    f"use a divisor of {total_heads} or a multiple of it")
            if tp_size > total_heads and tp_size % total_heads:
                raise InvalidArgumentError(
                    f"tp_size={tp_size} exceeds the {total_heads} KV heads of {spec.name} but is not a multiple "
                    "of them, so heads cannot be replicated evenly; use a multiple of the head count")

        compute = dtype_name(serving_dtype(spec, None) if dtype is None else dtype, "dtype", allow_fp8=False)
        kv_name = compute if str(kv_dtype).lower() == "auto" else dtype_name(kv_dtype, "kv_dtype")
        plan = kv_shard_layout(spec, tp=tp_size, kv_dtype=kv_name, fp8_scales=fp8_scales)
        head_ids = [int(h) for h in shard_kv_heads(total_heads, tp_size, tp_rank)]
        if len(head_ids) != plan.kv_heads:
            raise InvalidArgumentError(
                f"planner gives {plan.kv_heads} KV heads per shard but shard_kv_heads gives {head_ids} "
                f"for rank {tp_rank} of {tp_size}; the planner's layout and head split disagree")

        device = checked_device(device)  # an absent CUDA device: one clear line, not torch's assert
        page_dtype = KV_DTYPES[kv_name]
        elem = torch.empty(0, dtype=page_dtype).element_size()
        if elem != plan.dtype_bytes:
            raise InvalidArgumentError(f"kv_dtype {kv_name} has {elem}-byte elements, the planner counts "
                                       f"{plan.dtype_bytes}; the planner and the cache disagree")
        heads, hd, vhd, nl = plan.kv_heads, plan.head_dim, plan.v_head_dim, plan.num_layers
        token_scales = plan.scale_bytes > 0
        if token_scales and plan.scale_bytes != _SCALE_DTYPE.itemsize:
            raise InvalidArgumentError(f"planner counts {plan.scale_bytes} scale bytes per token and head; "
                                       "the cache stores one float32 (4 bytes)")

        def page_shape(dim):
            if layout == "NHD":
                return (num_blocks, block_size, heads, dim)
            return (num_blocks, heads, block_size, dim)

        k_bytes = num_blocks * block_size * heads * hd * elem
        v_bytes = num_blocks * block_size * heads * vhd * elem
        s_bytes = num_blocks * block_size * heads * plan.scale_bytes
        n_scaled = 2 if vhd else 1
        pages_total = nl * (k_bytes + v_bytes)
        total = pages_total + (nl * n_scaled * s_bytes if token_scales else 0)
        planned = plan.bytes_per_block(block_size) * num_blocks
        if total != planned:
            raise InvalidArgumentError(f"cache would take {total} bytes but the planner says {planned} "
                                       f"for {num_blocks} blocks of {block_size}; the layouts disagree")
        if token_scales and pages_total % _SCALE_DTYPE.itemsize:
            raise InvalidArgumentError(
                f"fp8 pages take {pages_total} bytes, not a multiple of 4, so the float32 scales that follow "
                f"would be misaligned; use a block_size >= 4")

        buffer = torch.zeros(total, dtype=torch.uint8, device=device)

        def carve(offset, nbytes, dt, shape):
            return buffer.narrow(0, offset, nbytes).view(dt).view(shape)

        k_caches, v_caches, offset = [], [], 0
        for _ in range(nl):
            k_caches.append(carve(offset, k_bytes, page_dtype, page_shape(hd)))
            offset += k_bytes
            if vhd:
                v_caches.append(carve(offset, v_bytes, page_dtype, page_shape(vhd)))
                offset += v_bytes
            else:
                v_caches.append(None)  # MLA: the latent lives in the K pages only
        k_scales = v_scales = None
        if kv_name == "fp8":
            if token_scales:
                buffer.narrow(0, pages_total, total - pages_total).view(_SCALE_DTYPE).fill_(1.0)
                k_scales, v_scales = [], []
                for _ in range(nl):
                    for dest in (k_scales, v_scales)[:n_scaled]:
                        dest.append(carve(offset, s_bytes, _SCALE_DTYPE, (num_blocks, block_size, heads)))
                        offset += s_bytes
            else:
                # per_tensor (vLLM's k_scale/v_scale): one float32 per layer and tensor, seen as [heads] (stride 0)
                shared = 1 if fp8_scales == "per_tensor" else heads
                per_head = torch.ones(nl, n_scaled, shared, dtype=_SCALE_DTYPE, device=device).expand(nl, n_scaled, heads)
                k_scales = [per_head[i, 0] for i in range(nl)]
                v_scales = [per_head[i, 1] for i in range(nl)] if vhd else []
            if not vhd:
                v_scales = [None] * nl
        if offset != total:
            raise InvalidArgumentError(f"carved {offset} of {total} bytes; the carve order is inconsistent")

        return cls(layout=plan, buffer=buffer, k_caches=k_caches, v_caches=v_caches, k_scales=k_scales,
                   v_scales=v_scales, kv_head_ids=head_ids, num_blocks=num_blocks, block_size=block_size,
                   page_layout=layout, dtype=KV_DTYPES[compute], kv_dtype=page_dtype,
                   fp8_scales=fp8_scales if kv_name == "fp8" else None, tp_rank=tp_rank, tp_size=tp_size,
                   is_mla=bool(spec.is_mla))

    # ----------------------------------------------------------------- accessors
    @property
    def num_layers(self) -> int:
        return len(self.k_caches)

    @property
    def kv_heads(self) -> int:
        """KV heads on this shard."""
        return self.kv_layout.kv_heads

    @property
    def head_dim(self) -> int:
        """K head dim (MLA: ``kv_lora_rank + qk_rope_head_dim``)."""
        return self.kv_layout.head_dim

    @property
    def v_head_dim(self) -> int:
        """V head dim (0 for MLA)."""
        return self.kv_layout.v_head_dim

    @property
    def device(self) -> torch.device:
        return self._buffer.device

    @property
    def buffer(self) -> torch.Tensor:
        """``[memory_bytes()] uint8``: the one allocation every page and in-pool scale tensor views."""
        return self._buffer

    def layer(self, i: int):
        """``(k_cache, v_cache, k_scale, v_scale)`` of layer `i` (scales ``None`` unless fp8)."""
        if not -self.num_layers <= i < self.num_layers:
            raise InvalidArgumentError(f"layer {i} out of range for {self.num_layers} layers")
        ks = self.k_scales[i] if self.k_scales is not None else None
        vs = self.v_scales[i] if self.v_scales is not None else None
        return self.k_caches[i], self.v_caches[i], ks, vs

    def block_tensors(self) -> list:
        """Every tensor indexed by block id on dim 0 (pages, per-token scales): ``copy_blocks``'s `caches`."""
        out = [t for t in self.k_caches + self.v_caches if t is not None]
        if self.fp8_scales == "per_token_head":
            out += [t for t in self.k_scales + self.v_scales if t is not None]
        return out

    def memory_bytes(self) -> int:
        """Bytes of the pool: ``bytes_per_block(block_size) * num_blocks`` of the planner, exactly.

        The per-head fp8 scales (``fp8_scales="per_head"``, a few bytes per layer) live outside the pool.
        """
        return self._buffer.numel()

    def __repr__(self) -> str:
        kv = str(self.kv_dtype).removeprefix("torch.")
        scales = f", fp8_scales={self.fp8_scales}" if self.fp8_scales else ""
        return (f"PagedKVCache(rank={self.tp_rank}/{self.tp_size}, layers={self.num_layers}, "
                f"blocks={self.num_blocks}x{self.block_size}, kv_heads={self.kv_head_ids}, head_dim={self.head_dim}"
                f"{'' if self.v_head_dim else ' (MLA latent)'}, layout={self.layout}, kv_dtype={kv}{scales}, "
                f"device={self.device}, {self.memory_bytes() / 2**20:.1f} MiB)")
