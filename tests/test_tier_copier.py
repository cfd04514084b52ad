"""HostPages + BlockCopier on CPU tensors (#14 items 1, 4): offload then reload returns every block's bytes
exactly (bf16, fp8 with per-token scales, MLA, hybrid), batches larger than the staging buffer go in rounds,
runs of consecutive host ids move in one copy, and bad ids are refused before anything moves."""
import pytest
import torch
from kernels_util import INTERPRET

from kvpool import PagedKVCache
from kvpool.errors import BlockIndexError, InvalidArgumentError
from kvpool.tier import BlockCopier, HostPages
from kvpool.tier.copier import host_runs

LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
         "num_key_value_heads": 2, "num_hidden_layers": 3, "intermediate_size": 128, "vocab_size": 256,
         "torch_dtype": "bfloat16", "max_position_embeddings": 1024, "rms_norm_eps": 1e-6}
MLA = {"architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "hidden_size": 64,
       "first_k_dense_replace": 1, "intermediate_size": 128, "kv_lora_rank": 32, "max_position_embeddings": 1024,
       "moe_intermediate_size": 32, "moe_layer_freq": 1, "n_group": 1, "n_routed_experts": 4, "n_shared_experts": 1,
       "num_attention_heads": 4, "num_experts_per_tok": 2, "num_hidden_layers": 2, "num_key_value_heads": 4,
       "q_lora_rank": None, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "rms_norm_eps": 1e-6,
       "tie_word_embeddings": False, "topk_group": 1, "topk_method": "greedy", "torch_dtype": "bfloat16",
       "v_head_dim": 16, "vocab_size": 256}
HYBRID = {**LLAMA, "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "head_dim": 16, "num_hidden_layers": 5,
          "sliding_window": 32, "use_sliding_window": True,
          "layer_types": ["sliding_attention", "full_attention"] * 2 + ["sliding_attention"]}
CACHES = {  # name -> (model, kv_dtype)
    "bf16": (LLAMA, "auto"), "fp8-token-scales": (LLAMA, "fp8"), "mla": (MLA, "auto"), "mla-fp8": (MLA, "fp8"),
    "hybrid-fp8": (HYBRID, "fp8"),
}
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1"))]


def _cache(name, num_blocks=10, seed=0):
    model, kv_dtype = CACHES[name]
    cache = PagedKVCache.for_shard(model, num_blocks, 4, 0, 1, "cpu", kv_dtype=kv_dtype)
    gen = torch.Generator().manual_seed(seed)
    cache.buffer.copy_(torch.randint(0, 256, cache.buffer.shape, generator=gen, dtype=torch.uint8))
    return cache


def _block_bytes(cache, b) -> torch.Tensor:
    return torch.cat([t[b].reshape(-1).view(torch.uint8) for t in cache.block_tensors()])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CACHES))
def test_offload_then_reload_returns_the_same_bytes(monkeypatch, name, backend):
    monkeypatch.setenv("KVPOOL_KERNELS", backend)
    cache = _cache(name)
    host = HostPages(cache, num_host_blocks=8)
    copier = BlockCopier(cache, host, staging_blocks=3)
    gpu, hosts = [7, 2, 9, 0, 4], [5, 1, 6, 2, 0]
    original = {b: _block_bytes(cache, b) for b in range(cache.num_blocks)}

    ticket = copier.offload(gpu, hosts)
    assert ticket.done() and ticket.nbytes == 5 * host.bytes_per_block
    for b, h in zip(gpu, hosts):
        assert torch.equal(host.block(h), original[b])
        for view, t in zip(host.rows(h), cache.block_tensors()):  # rows(h) has each tensor's row shape/dtype
            assert view.dtype == t.dtype and torch.equal(view.view(torch.uint8), t[b].view(torch.uint8))

    cache.buffer.zero_()  # the GPU blocks are gone (evicted and overwritten)
    back = [1, 3, 5, 6, 8]
    ticket = copier.reload(hosts, back)
    ticket.wait()
    assert ticket.done()
    for src, dst in zip(gpu, back):
        assert torch.equal(_block_bytes(cache, dst), original[src])
    for b in set(range(cache.num_blocks)) - set(back):
        assert not _block_bytes(cache, b).any()  # nothing else written


def test_batches_larger_than_staging_go_in_rounds():
    cache = _cache("fp8-token-scales", num_blocks=12)
    host = HostPages(cache, 12)
    copier = BlockCopier(cache, host, staging_blocks=4)
    gpu = list(range(11, 0, -1))
    original = [_block_bytes(cache, b) for b in gpu]
    ticket = copier.offload(gpu, list(range(11)))
    assert (ticket.rounds, ticket.copies) == (3, 3)  # 4 + 4 + 3 blocks, each round one run
    assert all(torch.equal(host.block(h), original[h]) for h in range(11))
    cache.buffer.zero_()
    ticket = copier.reload(list(range(11)), gpu)
    assert ticket.rounds == 3 and all(torch.equal(_block_bytes(cache, b), o) for b, o in zip(gpu, original))


@pytest.mark.parametrize("hosts,staging,copies", [
    ([3, 4, 5, 9, 10], 8, 2),         # two runs
    ([5, 3, 10, 4, 9], 8, 2),         # the same runs in any order: pairs are sorted by host id
    ([0, 2, 4, 6], 8, 4),             # no run
    ([0, 1, 2, 3, 4, 5], 4, 2),       # one run cut by the round boundary
    ([7], 1, 1),
])
def test_consecutive_host_ids_move_in_one_copy(monkeypatch, hosts, staging, copies):
    cache = _cache("bf16", num_blocks=12)
    host = HostPages(cache, 12)
    copier = BlockCopier(cache, host, staging_blocks=staging)
    calls = []
    real_copy = torch.Tensor.copy_

    def counting_copy(dst, src, *args, **kwargs):
        if dst.data_ptr() >= host.buffer.data_ptr() and dst.data_ptr() < host.buffer.data_ptr() + host.memory_bytes():
            calls.append(dst.shape[0])
        return real_copy(dst, src, *args, **kwargs)

    gpu = list(range(len(hosts)))
    original = [_block_bytes(cache, b) for b in gpu]
    monkeypatch.setattr(torch.Tensor, "copy_", counting_copy)
    ticket = copier.offload(gpu, hosts)
    monkeypatch.undo()
    assert ticket.copies == len(calls) == copies and sum(calls) == len(hosts)
    assert all(torch.equal(host.block(h), o) for h, o in zip(hosts, original))


def test_host_runs():
    assert host_runs([4, 5, 6, 9, 10, 2]) == [(0, 4, 3), (3, 9, 2), (5, 2, 1)]
    assert host_runs([]) == []


@pytest.mark.parametrize("call,gpu,hosts,error,fragment", [
    ("offload", [0, 10], [1, 2], BlockIndexError, "gpu_ids[1]=10 is outside [0, 10)"),
    ("offload", [0, 1], [1, 8], BlockIndexError, "host_ids[1]=8 is outside [0, 8)"),
    ("offload", [0, -1], [1, 2], BlockIndexError, "gpu_ids[1]=-1"),
    ("offload", [0, 1], [3, 3], BlockIndexError, "host_ids names block 3 twice"),
    ("offload", [0, 1], [3], InvalidArgumentError, "2 gpu_ids but 1 host_ids"),
    ("offload", [0.0], [3], InvalidArgumentError, "gpu_ids[0]=0.0 is not an integer"),
    ("offload", [True], [3], InvalidArgumentError, "not an integer"),
    ("reload", [4, 4], [1, 2], BlockIndexError, "gpu_ids names block 4 twice"),
    ("reload", [4], [9], BlockIndexError, "host_ids[0]=9 is outside [0, 8)"),
    ("reload", torch.tensor([[1]]), [1], InvalidArgumentError, "1-D int32/int64 CPU tensor"),
    ("reload", 3, [1], InvalidArgumentError, "sequence of block ids"),
])
def test_bad_ids_refused_with_state_unchanged(call, gpu, hosts, error, fragment):
    cache = _cache("fp8-token-scales")
    host = HostPages(cache, 8)
    host.buffer.fill_(5)
    copier = BlockCopier(cache, host, staging_blocks=2)
    cache_before, host_before = cache.buffer.clone(), host.buffer.clone()
    with pytest.raises(error) as err:
        copier.offload(gpu, hosts) if call == "offload" else copier.reload(hosts, gpu)
    assert fragment in str(err.value)
    assert torch.equal(cache.buffer, cache_before) and torch.equal(host.buffer, host_before)


def test_empty_batch_is_a_done_ticket():
    cache = _cache("bf16")
    copier = BlockCopier(cache, HostPages(cache, 2))
    ticket = copier.offload([], [])
    assert ticket.done() and (ticket.num_blocks, ticket.rounds, ticket.copies) == (0, 0, 0)


def test_host_pages_geometry_and_errors():
    cache = _cache("mla-fp8")
    host = HostPages(cache, 3)
    rows = [t[0].numel() * t.element_size() for t in cache.block_tensors()]
    assert host.bytes_per_block == sum(rows) == cache.memory_bytes() // cache.num_blocks
    assert host.buffer.shape == (3, sum(rows)) and host.buffer.dtype == torch.uint8 and not host.pinned
    assert host.memory_bytes() == 3 * sum(rows) and "3 blocks" in repr(host)
    with pytest.raises(BlockIndexError, match=r"host block 3 is outside \[0, 3\)"):
        host.block(3)
    for bad in (0, -2, 1.5, True):
        with pytest.raises(InvalidArgumentError, match="num_host_blocks"):
            HostPages(cache, bad)
    with pytest.raises(InvalidArgumentError, match="staging_blocks=0"):
        BlockCopier(cache, host, staging_blocks=0)
    with pytest.raises(InvalidArgumentError, match="build HostPages"):
        BlockCopier(_cache("bf16"), host)


class _Event:
    def __init__(self, done):
        self._done = done

    def query(self):
        return self._done


class _Stream:
    def __init__(self):
        self.waited = []

    def wait_event(self, event):
        self.waited.append(event)


def test_in_flight_conflicts_are_waited_for_on_the_device():
    """The CUDA ordering rule, checked with stand-in events: a new batch waits for pending batches that share
    its staging buffer, write what it touches, or read what it writes; finished ones are dropped."""
    from kvpool.tier.copier import CopyTicket
    cache = _cache("bf16")
    copier = BlockCopier(cache, HostPages(cache, 8))
    offload = CopyTicket("offload", (1, 2), (5, 6), 0, event=_Event(False))   # reads gpu 1, 2; writes host 5, 6
    reload = CopyTicket("reload", (7,), (3,), 0, event=_Event(False))         # reads host 3; writes gpu 7
    finished = CopyTicket("offload", (4,), (3,), 0, event=_Event(True))
    cases = [  # (new ticket, events it must wait for)
        (CopyTicket("reload", (8,), (5,), 0), [offload.event, reload.event]),  # host 5 still being written
        (CopyTicket("reload", (2,), (0,), 0), [offload.event, reload.event]),  # gpu 2 still being read
        (CopyTicket("offload", (7,), (0,), 0), [offload.event, reload.event]),  # gpu 7 still being written
        (CopyTicket("offload", (0,), (3,), 0), [offload.event, reload.event]),  # host 3 still being read
        (CopyTicket("reload", (9,), (4,), 0), [reload.event]),                  # same staging only
    ]
    for ticket, expected in cases:
        copier._pending = [offload, reload, finished]
        stream = _Stream()
        copier._wait_for_conflicts(ticket, stream)
        assert stream.waited == expected, ticket
        assert finished not in copier._pending


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["bf16", "fp8-token-scales", "mla-fp8", "hybrid-fp8"])
def test_cuda_offload_is_ordered_after_the_writing_step_and_reload_before_the_reader(name):
    model, kv_dtype = CACHES[name]
    cache = PagedKVCache.for_shard(model, 64, 16, 0, 1, "cuda", kv_dtype=kv_dtype)
    host = HostPages(cache, 64)
    assert host.pinned and host.buffer.is_pinned()
    copier = BlockCopier(cache, host, staging_blocks=8)
    gpu = list(range(20, 40))
    torch.cuda._sleep(50_000_000)  # a long "step" on the compute stream ...
    cache.buffer.random_(0, 256)   # ... that writes the blocks
    expect = {b: _block_bytes(cache, b).cpu() for b in gpu}  # (syncs; the offload below is checked alone)
    torch.cuda._sleep(50_000_000)
    cache.buffer.add_(1)  # the step the offload must wait for
    expect = {b: (v + 1) for b, v in expect.items()}
    ticket = copier.offload(gpu, list(range(10, 30)))
    ticket.wait()
    assert ticket.rounds == 3 and ticket.copies == 3
    for b, h in zip(gpu, range(10, 30)):
        assert torch.equal(host.block(h), expect[b])
    cache.buffer.zero_()
    ticket = copier.reload(list(range(10, 30)), list(range(40, 60)))
    got = {b: _block_bytes(cache, b) for b in range(40, 60)}  # enqueued after the reload on the same stream
    torch.cuda.synchronize()
    assert ticket.done()
    for src, dst in zip(gpu, range(40, 60)):
        assert torch.equal(got[dst].cpu(), expect[src])


def test_copier_feeds_the_host_tier_metrics():
    from prometheus_client.parser import text_string_to_metric_families

    from kvpool.metrics import HostTierMetrics
    cache = _cache("fp8-token-scales")
    metrics = HostTierMetrics()
    copier = BlockCopier(cache, HostPages(cache, 8), staging_blocks=2, metrics=metrics)
    copier.offload([1, 2, 3], [0, 1, 2])
    copier.reload([0, 1], [5, 6])
    with pytest.raises(BlockIndexError):
        copier.reload([0], [99])  # refused: not counted
    text = metrics.exposition().decode()
    s = {x.name: x.value for fam in text_string_to_metric_families(text) for x in fam.samples}
    width = copier.bytes_per_block
    assert (s["kvpool_host_offloaded_blocks_total"], s["kvpool_host_offloaded_bytes_total"]) == (3, 3 * width)
    assert (s["kvpool_host_reloaded_blocks_total"], s["kvpool_host_reloaded_bytes_total"]) == (2, 2 * width)
    assert copier.staging_bytes == 2 * 2 * width


def test_numpy_ids_as_pop_transfers_gives_them():
    import numpy as np
    cache = _cache("bf16")
    host = HostPages(cache, 4)
    copier = BlockCopier(cache, host)
    original = _block_bytes(cache, 6)
    ticket = copier.offload(np.array([6], dtype=np.int32), np.array([3], dtype=np.int32))
    assert ticket.gpu_ids == (6,) and torch.equal(host.block(3), original)
    with pytest.raises(InvalidArgumentError, match="1-D integer array"):
        copier.offload(np.array([6.0]), np.array([3]))
