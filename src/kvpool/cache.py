"""The KV pages of one tensor-parallel shard, carved out of a single allocation.

Every rank of a TP group builds its own `PagedKVCache` with the same ``num_blocks`` and block
size: block ids (from the group's one `BlockAllocator`) mean the same thing on every rank, while each
rank's pages hold only its own KV heads (`kv_head_ids`). Shapes and byte counts come from the
planner's `kv_shard_layout`, so `memory_bytes` is exactly the planner's
``pool_bytes_per_block(block_size) * num_blocks`` (``bytes_per_block_per_gpu * num_blocks`` of a
single-group model's plan).

Memory layout of the one flat ``uint8`` buffer (no padding anywhere, so the byte count is exact):
first the page tensors of every slot, ``K_0, V_0, K_1, V_1, ...`` (all in the KV dtype), then, for
fp8 with per-token scales, the float32 scale tensors ``Ks_0, Vs_0, Ks_1, ...``. Grouping by dtype
keeps every view's offset a multiple of its element size; the scale group starts after a whole
number of pages, a multiple of 4 bytes for any block size >= 2 or even head_dim (checked).

A slot is a page tensor shared by one layer of each KV-cache group (`kvpool.plan.kv_groups`): a model
with one attention kind has one slot per layer (slot i = layer i); a hybrid model has ``group_size``
slots, and layer i reads and writes the slot ``kv_groups.slot_of(i)`` names. A block id is owned by one
group at a time (the one allocator hands it out), so layers sharing a slot never touch the same block.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch

from ._arrays import as_int, check_geometry
from ._device_check import checked_device
from .errors import InvalidArgumentError
from .plan.dtypes import DTYPES, KV_DTYPE_NAMES, SERVING_DTYPE_NAMES, find_dtype

#: The torch dtype of each KV dtype name of kvpool's one dtype table (``kvpool.plan.dtypes``).
KV_DTYPES = {name: getattr(torch, d.torch_name) for name, d in DTYPES.items()}
LAYOUTS = ("NHD", "HND")  # page layouts: a block's tokens before its heads, or heads first
FP8_SCALES = ("per_token_head", "per_head", "per_tensor")
_SCALE_DTYPE = torch.float32


def dtype_name(dtype, what: str = "dtype", allow_fp8: bool = True) -> str:
    """The table's name (fp32/fp16/bf16/fp8) of a torch dtype or any spelling (``"bfloat16"``, ``torch.bfloat16``)."""
    allowed = KV_DTYPE_NAMES if allow_fp8 else SERVING_DTYPE_NAMES
    name = find_dtype(dtype)
    if name not in allowed:
        raise InvalidArgumentError(f"{what}={dtype!r} is not supported; use one of {', '.join(allowed)}")
    return name


# ----------------------------------------------------------------------------- the checks
@dataclasses.dataclass(frozen=True)
class _Shard:
    """``for_shard``'s arguments checked, with what the planner lays out for this shard.

    ``page_layout`` is "NHD" or "HND" (the order of a block's dims); ``shard_layout`` is the planner's
    ``KVShardLayout`` of the heads this rank holds (``kv_head_ids``); ``fp8_scales`` is ``None`` unless fp8.
    """

    num_blocks: int
    block_size: int
    tp_rank: int
    tp_size: int
    device: torch.device
    page_layout: str
    compute_dtype: torch.dtype
    page_dtype: torch.dtype
    fp8_scales: Optional[str]
    shard_layout: Any
    kv_head_ids: list
    is_mla: bool

    @property
    def kv_groups(self):
        """The shard's KV-cache groups (KVGroups); one group of every layer for a single-kind model."""
        from .plan.kv_groups import kv_groups  # noqa: PLC0415

        lay = self.shard_layout
        return lay.kv_groups if lay.kv_groups is not None else kv_groups([None] * lay.num_layers)

    def page_shape(self, dim: int) -> tuple[int, int, int, int]:
        heads = self.shard_layout.kv_heads
        if self.page_layout == "NHD":
            return (self.num_blocks, self.block_size, heads, dim)
        return (self.num_blocks, heads, self.block_size, dim)


@dataclasses.dataclass(frozen=True)
class _Bytes:
    """Bytes of the one allocation: one slot's K pages, V pages and per-token scales (K or V, 0 unless fp8
    with ``per_token_head``), all slots' pages, and the whole buffer (the pages, then the scales).

    >>> # Llama-3.1-8B at tp=2, fp8, 1 block of 16 tokens: 4 KV heads x 128 dims x 1 B per token
    >>> # k = v = 16 x 4 x 128 x 1 = 8,192; scales = 16 x 4 x 4 = 256; pages = 32 x 16,384 = 524,288
    >>> # total = 524,288 + 32 slots x 2 tensors x 256 = 540,672 = the planner's bytes_per_block(16)
    """

    k: int
    v: int
    scales: int
    pages: int
    total: int

    @classmethod
    def of(cls, shard: _Shard) -> "_Bytes":
        lay = shard.shard_layout
        rows = shard.num_blocks * shard.block_size * lay.kv_heads  # (token, head) rows per layer and tensor
        k, v = rows * lay.head_dim * lay.dtype_bytes, rows * lay.v_head_dim * lay.dtype_bytes
        scales = rows * lay.scale_bytes
        pages = lay.slots * (k + v)
        return cls(k, v, scales, pages, pages + lay.slots * (2 if v else 1) * scales)


def _check_counts(num_blocks, block_size, tp_rank, tp_size) -> tuple[int, int, int, int]:
    """Plain ints: a pool whose slot ids fit int32, a power-of-two block, ``tp_rank`` in ``[0, tp_size)``."""
    num_blocks, block_size = check_geometry(num_blocks, block_size, "PagedKVCache")
    if block_size & (block_size - 1):
        raise InvalidArgumentError(f"block_size={block_size} is not a power of two; use 8, 16, 32, ...")
    tp_size = as_int(tp_size, "tp_size")
    if tp_size <= 0:
        raise InvalidArgumentError(f"tp_size={tp_size} must be > 0; pass the tensor-parallel degree (1 without TP)")
    if isinstance(tp_rank, bool) or not hasattr(tp_rank, "__index__") or not 0 <= int(tp_rank) < tp_size:
        raise InvalidArgumentError(f"tp_rank={tp_rank!r} must be an int in [0, {tp_size}) for tp_size={tp_size}")
    return num_blocks, block_size, int(tp_rank), tp_size


def _check_choices(page_layout, fp8_scales) -> None:
    if page_layout not in LAYOUTS:
        raise InvalidArgumentError(f"layout={page_layout!r} is not supported; use 'NHD' or 'HND'")
    if fp8_scales not in FP8_SCALES:
        raise InvalidArgumentError(f"fp8_scales={fp8_scales!r} is not supported; use 'per_token_head', 'per_head' "
                                   "or 'per_tensor'")


def _checked_shard(spec, num_blocks, block_size, tp_rank, tp_size, device, dtype, kv_dtype, page_layout,
                   fp8_scales) -> tuple[_Shard, _Bytes]:
    """Every check of ``for_shard``, in order; the planner's layout of the shard and its byte counts.

    Bad input raises ``InvalidArgumentError``; the asserts state what the planner and the cache agree on.
    """
    from .plan.dtypes import serving_dtype  # noqa: PLC0415 (keeps `import kvpool.cache` light)
    from .plan.kv import kv_shard_layout, shard_kv_heads  # noqa: PLC0415
    from .plan.parallel import check_kv_head_split  # noqa: PLC0415

    num_blocks, block_size, tp_rank, tp_size = _check_counts(num_blocks, block_size, tp_rank, tp_size)
    _check_choices(page_layout, fp8_scales)
    if not spec.is_mla:  # the planner's rule, in this call's words (its own check_tp also checks query heads)
        check_kv_head_split(int(spec.num_kv_heads), tp_size, model=spec.name, tp_name="tp_size",
                            error=InvalidArgumentError)
    compute = dtype_name(serving_dtype(spec) if dtype is None else dtype, "dtype", allow_fp8=False)
    kv_name = compute if str(kv_dtype).lower() == "auto" else dtype_name(kv_dtype, "kv_dtype")
    shard_layout = kv_shard_layout(spec, tp=tp_size, kv_dtype=kv_name, fp8_scales=fp8_scales)
    head_ids = [int(h) for h in shard_kv_heads(1 if spec.is_mla else int(spec.num_kv_heads), tp_size, tp_rank)]
    assert len(head_ids) == shard_layout.kv_heads, (head_ids, shard_layout)
    shard = _Shard(
        num_blocks, block_size, tp_rank, tp_size, checked_device(device), page_layout, KV_DTYPES[compute],
        KV_DTYPES[kv_name], fp8_scales if kv_name == "fp8" else None, shard_layout, head_ids, bool(spec.is_mla),
    )
    assert shard.page_dtype.itemsize == shard_layout.dtype_bytes, (shard.page_dtype, shard_layout)
    assert shard_layout.scale_bytes in (0, _SCALE_DTYPE.itemsize), shard_layout  # one float32 per token and head
    nbytes = _Bytes.of(shard)
    assert nbytes.total == shard_layout.pool_bytes_per_block(block_size) * num_blocks, (nbytes, shard_layout)
    if nbytes.scales and nbytes.pages % _SCALE_DTYPE.itemsize:
        raise InvalidArgumentError(
            f"fp8 pages take {nbytes.pages} bytes, not a multiple of 4, so the float32 scales that follow "
            f"would be misaligned; use a block_size >= 4")
    return shard, nbytes


# ----------------------------------------------------------------------------- the carving
class _Carver:
    """Hands out consecutive views of the one ``uint8`` buffer."""

    def __init__(self, buffer: torch.Tensor):
        self.buffer, self.offset = buffer, 0

    def take(self, nbytes: int, dtype: torch.dtype, shape: tuple) -> torch.Tensor:
        view = self.buffer.narrow(0, self.offset, nbytes).view(dtype).view(shape)
        self.offset += nbytes
        return view


def _carve_pages(carver: _Carver, shard: _Shard, nbytes: _Bytes) -> tuple[list, list]:
    """Each slot's ``K_s, V_s`` in the page dtype (MLA: ``K_s``, the latent, and V ``None``), in slot order."""
    lay = shard.shard_layout
    k_slots, v_slots = [], []
    for _ in range(lay.slots):
        k_slots.append(carver.take(nbytes.k, shard.page_dtype, shard.page_shape(lay.head_dim)))
        v_slots.append(carver.take(nbytes.v, shard.page_dtype, shard.page_shape(lay.v_head_dim))
                       if lay.v_head_dim else None)
    return k_slots, v_slots


def _layer_slots(groups) -> list[int]:
    """The slot of each layer: ``[groups.slot_of(i)[1] for i in layers]`` (slot i = layer i for one group)."""
    slots = [0] * groups.num_layers
    for group in groups.groups:
        for slot, layer in enumerate(group.layers):
            slots[layer] = slot
    return slots


def _carve_scales(carver: _Carver, shard: _Shard, nbytes: _Bytes,
                  layer_slots: list[int]) -> tuple[Optional[list], Optional[list], list]:
    """fp8 scales, all 1.0, per layer, and the per-token scale tensors of each slot (``[]`` unless any).

    Per-token ones are carved after the pages, one per slot (``Ks_0, Vs_0, Ks_1, ...``); per-head and
    per-tensor ones are a small tensor outside the pool, one per layer (each layer has its calibration).
    ``(None, None, [])`` unless fp8.
    """
    if shard.fp8_scales is None:
        return None, None, []
    lay, heads = shard.shard_layout, shard.shard_layout.kv_heads
    n_scaled = 2 if lay.v_head_dim else 1  # MLA scales its latent only
    per_slot = []
    if nbytes.scales:  # left unset here: the caller fills them with 1.0 once their memory is there
        shape = (shard.num_blocks, shard.block_size, heads)
        per_slot = [[carver.take(nbytes.scales, _SCALE_DTYPE, shape) for _ in range(n_scaled)]
                    for _ in range(lay.slots)]
        per_layer = [per_slot[s] for s in layer_slots]
    else:
        # per_tensor (vLLM's k_scale/v_scale): one float32 per layer and tensor, seen as [heads] (stride 0)
        shared = 1 if shard.fp8_scales == "per_tensor" else heads
        ones = torch.ones(lay.num_layers, n_scaled, shared, dtype=_SCALE_DTYPE, device=shard.device)
        per_layer = ones.expand(lay.num_layers, n_scaled, heads)
    k_scales = [per_layer[i][0] for i in range(lay.num_layers)]
    v_scales = [per_layer[i][1] if n_scaled == 2 else None for i in range(lay.num_layers)]
    return k_scales, v_scales, [pair[0] for pair in per_slot] + [pair[1] for pair in per_slot if n_scaled == 2]


class PagedKVCache:
    """Page tensors of one TP shard: a K and a V tensor per slot, views of ONE allocation.

    Build it with `for_shard`. Attributes
    ----------
    k_caches, v_caches : list of torch.Tensor
        Per layer (the tensor of the layer's slot: layers of different KV-cache groups share one),
        ``[num_blocks, block_size, kv_heads, head_dim]`` (NHD) or
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
    page_layout : str
        "NHD" or "HND": the order of a block's dims (``layout`` is the same).
    shard_layout : KVShardLayout
        The planner's geometry of the heads this rank holds (``kvpool.plan.kv_shard_layout``).
    kv_groups : KVGroups
        The model's KV-cache groups (``kvpool.plan.kv_groups``): ``kv_groups.windows`` is the
        ``group_windows`` of the `BlockTables` whose block ids index these pages; layer ``i`` uses slot
        ``kv_groups.slot_of(i)[1]`` and group `group_of` ``(i)``'s block table.

    Kernels take NHD page tensors; pass an HND tensor as ``t.permute(0, 2, 1, 3)``.
    """

    def __init__(self, shard: _Shard, nbytes: _Bytes):
        """Allocate the one buffer and carve every view of it (build a cache with `for_shard`)."""
        self._buffer = torch.zeros(nbytes.total, dtype=torch.uint8, device=shard.device)
        self._carve(_Carver(self._buffer), shard, nbytes)
        for scales in self._scale_tensors:
            scales.fill_(1.0)

    def _carve(self, carver, shard: _Shard, nbytes: _Bytes) -> None:
        """Take every view from ``carver`` (``take(nbytes, dtype, shape)``) and set the attributes.

        The elastic cache (`kvpool.elastic`) passes a carver that puts each tensor in its own region.
        """
        self.kv_groups = shard.kv_groups
        layer_slots = _layer_slots(self.kv_groups)
        k_slots, v_slots = _carve_pages(carver, shard, nbytes)
        self.k_scales, self.v_scales, scale_slots = _carve_scales(carver, shard, nbytes, layer_slots)
        assert carver.offset == nbytes.total, (carver.offset, nbytes)  # the views tile the buffer exactly
        self.k_caches = [k_slots[s] for s in layer_slots]
        self.v_caches = [v_slots[s] for s in layer_slots]
        self._scale_tensors = scale_slots  # per-token fp8 scales in the pool: 1.0 until written
        self._block_tensors = [t for t in k_slots + v_slots if t is not None] + scale_slots
        self._group_of = {layer: g for g, group in enumerate(self.kv_groups.groups) for layer in group.layers}
        self.shard_layout = shard.shard_layout  # the planner's KVShardLayout of the heads this rank holds
        self.page_layout = shard.page_layout  # "NHD" or "HND"
        self.kv_head_ids = shard.kv_head_ids
        self.num_blocks, self.block_size = shard.num_blocks, shard.block_size
        self.dtype, self.kv_dtype, self.fp8_scales = shard.compute_dtype, shard.page_dtype, shard.fp8_scales
        self.tp_rank, self.tp_size, self.is_mla = shard.tp_rank, shard.tp_size, shard.is_mla

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

        shard, nbytes = _checked_shard(load_model_spec(spec), num_blocks, block_size, tp_rank, tp_size, device,
                                       dtype, kv_dtype, layout, fp8_scales)
        return cls(shard, nbytes)

    # ----------------------------------------------------------------- accessors
    @property
    def layout(self) -> str:
        """The page layout, "NHD" or "HND" (same as ``page_layout``)."""
        return self.page_layout

    @property
    def num_layers(self) -> int:
        return len(self.k_caches)

    @property
    def kv_heads(self) -> int:
        """KV heads on this shard."""
        return self.shard_layout.kv_heads

    @property
    def head_dim(self) -> int:
        """K head dim (MLA: ``kv_lora_rank + qk_rope_head_dim``)."""
        return self.shard_layout.head_dim

    @property
    def v_head_dim(self) -> int:
        """V head dim (0 for MLA)."""
        return self.shard_layout.v_head_dim

    @property
    def device(self) -> torch.device:
        return self._buffer.device

    @property
    def buffer(self) -> torch.Tensor:
        """``[memory_bytes()] uint8``: the one allocation every page and in-pool scale tensor views."""
        return self._buffer

    @property
    def num_slots(self) -> int:
        """Page tensors per K/V: ``num_layers`` for one group, ``kv_groups.group_size`` for a hybrid model."""
        return self.kv_groups.group_size

    def _checked_layer(self, i) -> int:
        if isinstance(i, bool) or not hasattr(i, "__index__") or not -self.num_layers <= int(i) < self.num_layers:
            raise InvalidArgumentError(f"layer {i!r} out of range for {self.num_layers} layers; pass an int in "
                                       f"[{-self.num_layers}, {self.num_layers})")
        return int(i) % self.num_layers

    def layer(self, i: int):
        """``(k_cache, v_cache, k_scale, v_scale)`` of layer `i` (scales ``None`` unless fp8): its slot's views."""
        i = self._checked_layer(i)
        ks = self.k_scales[i] if self.k_scales is not None else None
        vs = self.v_scales[i] if self.v_scales is not None else None
        return self.k_caches[i], self.v_caches[i], ks, vs

    def group_of(self, i: int) -> int:
        """The KV-cache group of layer `i`: the index of its block table (``BlockTables``' ``group=``,
        ``batch.group(g)``). 0 for every layer of a single-group model."""
        return self._group_of[self._checked_layer(i)]

    def block_tensors(self) -> list:
        """Every tensor indexed by block id on dim 0 (each slot's pages and per-token scales, once each):
        ``copy_blocks``'s `caches`."""
        return list(self._block_tensors)

    def memory_bytes(self) -> int:
        """Bytes of the pool: ``pool_bytes_per_block(block_size) * num_blocks`` of the planner, exactly.

        The per-head fp8 scales (``fp8_scales="per_head"``, a few bytes per layer) live outside the pool.
        """
        return self._buffer.numel()

    def __repr__(self) -> str:
        kv = str(self.kv_dtype).removeprefix("torch.")
        scales = f", fp8_scales={self.fp8_scales}" if self.fp8_scales else ""
        slots = f" in {self.num_slots} slots x {len(self.kv_groups.groups)} groups" if self.kv_groups.hybrid else ""
        return (f"PagedKVCache(rank={self.tp_rank}/{self.tp_size}, layers={self.num_layers}{slots}, "
                f"blocks={self.num_blocks}x{self.block_size}, kv_heads={self.kv_head_ids}, head_dim={self.head_dim}"
                f"{'' if self.v_head_dim else ' (MLA latent)'}, layout={self.layout}, kv_dtype={kv}{scales}, "
                f"device={self.device}, {self.memory_bytes() / 2**20:.1f} MiB)")
