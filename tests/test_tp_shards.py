"""TP shards: a model's KV heads split over tp caches that share one allocator and one block table.

The concatenation over heads of the shards' decode outputs must equal the unsharded decode.
"""
import os
import sys

import numpy as np
import pytest
import torch

from kvpool.allocator import BlockAllocator
from kvpool.block_table import BlockTables
from kvpool.cache import PagedKVCache
from kvpool.kernels import copy_blocks, paged_decode, write_kv
from kvpool.plan import load_model_spec

# A small Llama-style model (16 query heads, 4 KV heads, head_dim 32), as a Hugging Face config dict.
CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 512,
    "num_attention_heads": 16, "num_key_value_heads": 4, "num_hidden_layers": 2, "intermediate_size": 1024,
    "vocab_size": 1000, "torch_dtype": "float32", "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
}
NUM_BLOCKS, BLOCK_SIZE = 24, 8


def _write(caches, key, value, slots):
    """Write all-head ``key``/``value`` ``[tokens, 4, 32]`` into every cache, each keeping its own heads."""
    for cache in caches:
        heads = torch.tensor(cache.kv_head_ids, device=key.device)
        for layer in range(cache.num_layers):
            k, v, ks, vs = cache.layer(layer)
            write_kv(key[layer][:, heads], value[layer][:, heads], k, v, slots, ks, vs)


def _run(tp, kv_dtype, sliding_window, soft_cap, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    spec = load_model_spec(CONFIG)
    dtype = torch.float32 if kv_dtype == "fp32" else torch.bfloat16
    kwargs = dict(device=device, dtype=dtype, kv_dtype=kv_dtype)
    full = PagedKVCache.for_shard(spec, NUM_BLOCKS, BLOCK_SIZE, 0, 1, **kwargs)
    shards = [PagedKVCache.for_shard(spec, NUM_BLOCKS, BLOCK_SIZE, r, tp, **kwargs) for r in range(tp)]
    every = [full, *shards]
    alloc = BlockAllocator(NUM_BLOCKS, block_size=BLOCK_SIZE)  # one allocator, one table for all ranks
    tables = BlockTables(alloc, BLOCK_SIZE, device, max_seqs=8)

    def random_kv(n):
        shape = (spec.num_layers, n, spec.num_kv_heads, spec.head_dim)
        return tuple(torch.randn(shape, generator=gen).to(device, dtype) for _ in range(2))

    # ragged prompts: 1 token, a multiple of the block size, one past it; random non-contiguous blocks
    alloc.allocate(5)  # hold some blocks so the sequences' ids are not 0, 1, 2, ...
    for seq, n in (("a", 1), ("b", 2 * BLOCK_SIZE), ("c", 2 * BLOCK_SIZE + 1)):
        tables.add(seq, np.arange(n) + 100 * ord(seq))
    batch = tables.batch(["a", "b", "c"])
    _write(every, *random_kv(batch.num_new_tokens), batch.slot_mapping)
    tables.mark_computed(batch)
    tables.fork("c", "d")  # "d" shares c's partial last block; appends copy it
    seqs = ["a", "b", "c", "d"]
    for step in range(3):
        for s in seqs:
            tables.append(s)
        src, dst = tables.pop_copies()
        for cache in every:
            copy_blocks(cache.block_tensors(), src, dst)
        batch = tables.decode_batch(seqs)
        _write(every, *random_kv(len(seqs)), batch.slot_mapping)
        tables.mark_computed(batch)
        q = torch.randn(len(seqs), spec.num_attention_heads, spec.head_dim, generator=gen).to(device, dtype)
        for layer in range(spec.num_layers):
            args = dict(scale=spec.head_dim ** -0.5, sliding_window=sliding_window, logit_soft_cap=soft_cap)
            k, v, ks, vs = full.layer(layer)
            want = paged_decode(q, k, v, batch.block_table, batch.seq_lens, k_scale=ks, v_scale=vs, **args)
            per_rank = spec.num_attention_heads // tp  # q heads of rank r: r*per_rank ... (r+1)*per_rank-1
            outs = []
            for r, shard in enumerate(shards):
                k, v, ks, vs = shard.layer(layer)
                outs.append(paged_decode(q[:, r * per_rank:(r + 1) * per_rank].contiguous(), k, v,
                                         batch.block_table, batch.seq_lens, k_scale=ks, v_scale=vs, **args))
            got = torch.cat(outs, dim=1)
            assert got.shape == want.shape == q.shape
            tol = 1e-5 if dtype == torch.float32 else 1e-2
            torch.testing.assert_close(got, want, atol=tol, rtol=tol)
        assert step < 1 or not torch.equal(want[2], want[3])  # c and d diverged after the fork
    return shards


@pytest.mark.parametrize("tp,kv_dtype,sliding_window,soft_cap", [
    (2, "fp32", None, None),
    (4, "fp32", 5, 30.0),
    (8, "fp32", None, None),   # tp > KV heads: each head replicated on two ranks
    (4, "fp8", None, None),
])
def test_sharded_decode_equals_unsharded(tp, kv_dtype, sliding_window, soft_cap):
    shards = _run(tp, kv_dtype, sliding_window, soft_cap)
    heads = [h for s in shards for h in s.kv_head_ids]
    assert sorted(set(heads)) == [0, 1, 2, 3]
    assert len(heads) == max(tp, 4)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="needs Triton's interpreter (conftest sets TRITON_INTERPRET=1 when CUDA is absent)")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy deprecations inside triton's interpreter
def test_sharded_decode_under_triton_interpreter(monkeypatch):
    """The same check with the Triton kernels, run on CPU by Triton's interpreter."""
    from kvpool.kernels import backend
    monkeypatch.setenv("KVPOOL_KERNELS", "triton")
    assert backend.use_triton(torch.empty(1))
    monkeypatch.setattr(sys.modules[__name__], "NUM_BLOCKS", 16)
    _run(2, "fp32", None, None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("tp,kv_dtype", [(2, "fp32"), (4, "bf16"), (8, "fp8")])
def test_sharded_decode_on_cuda(tp, kv_dtype):
    """Triton kernels on the GPU, pinned non-blocking batch copies."""
    _run(tp, kv_dtype, 5 if tp == 4 else None, None, device="cuda")
