"""The kernels as torch.library custom ops: opcheck on each, and a compiled layer (fullgraph, no breaks).

Runs on CPU with the torch reference backend (``KVPOOL_KERNELS=torch``): what is tested is the op
registration (schemas, declared mutations, fake implementations) and the public functions' compile path.
"""
import pytest
import torch
from kernels_util import new_cache, random_tables

import kvpool.kernels as K
from kvpool.kernels import ops

HEADS, KV_HEADS, HEAD_DIM, BLOCK, NUM_BLOCKS = 4, 2, 16, 4, 16


@pytest.fixture(autouse=True)
def torch_backend(monkeypatch):
    monkeypatch.setenv("KVPOOL_KERNELS", "torch")
    monkeypatch.delenv("KVPOOL_DEBUG", raising=False)
    torch._dynamo.reset()


def _state(lens=(3, 6)):
    gen = torch.Generator().manual_seed(1)
    k, v, _, _ = new_cache(NUM_BLOCKS, BLOCK, KV_HEADS, HEAD_DIM, torch.float32, None, "cpu", gen)
    table, seq_lens = random_tables(list(lens), BLOCK, NUM_BLOCKS, "cpu", gen)
    # the new token of each sequence is its last position
    slots = torch.tensor([int(table[b, (n - 1) // BLOCK]) * BLOCK + (n - 1) % BLOCK for b, n in enumerate(lens)],
                         dtype=torch.int64)
    return k, v, table, seq_lens, slots


class TinyLayer(torch.nn.Module):
    """One decode step of an attention layer: project, write K/V to the pages, attend over them."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.qkv = torch.nn.Linear(32, (HEADS + 2 * KV_HEADS) * HEAD_DIM)
        self.o = torch.nn.Linear(HEADS * HEAD_DIM, 32)

    def forward(self, x, k_cache, v_cache, table, seq_lens, slots):
        q, k, v = self.qkv(x).split([HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM], dim=-1)
        q = q.reshape(-1, HEADS, HEAD_DIM)
        K.write_kv(k.reshape(-1, KV_HEADS, HEAD_DIM), v.reshape(-1, KV_HEADS, HEAD_DIM), k_cache, v_cache, slots)
        attn = K.paged_decode(q, k_cache, v_cache, table, seq_lens, HEAD_DIM ** -0.5, sliding_window=4)
        out = torch.empty_like(q)
        K.paged_decode(q, k_cache, v_cache, table, seq_lens, HEAD_DIM ** -0.5, out=out)
        return self.o((attn + out).reshape(-1, HEADS * HEAD_DIM))


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_layer_matches_eager_in_one_graph(backend):
    layer, x = TinyLayer(), torch.randn(2, 32)
    k, v, table, lens, slots = _state()
    k2, v2 = k.clone(), v.clone()
    with torch.no_grad():
        expected = layer(x, k, v, table, lens, slots)
        explained = torch._dynamo.explain(layer)(x, k2.clone(), v2.clone(), table, lens, slots)
        assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
        ops_called = {getattr(node.target, "_qualified_op_name", None) for node in explained.graphs[0].graph.nodes}
        assert {"kvpool::write_kv", "kvpool::paged_decode",  # the ops, not their traced insides
                "kvpool::paged_decode_out"} <= ops_called, ops_called
        got = torch.compile(layer, backend=backend, fullgraph=True)(x, k2, v2, table, lens, slots)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(k2, k)  # write_kv's mutation of the pages survives compilation
    torch.testing.assert_close(v2, v)


def test_compiled_gather_copy_and_prefill_match_eager():
    k, v, table, lens, _ = _state()

    def step(k, v):
        K.copy_blocks([k, v], torch.tensor([int(table[0, 0])]), torch.tensor([NUM_BLOCKS - 1]))
        gk, gv, cu = K.gather_kv(k, v, table, lens, total_tokens=9)
        q = gk[:, :1].expand(-1, HEADS // KV_HEADS * 1, -1).repeat(1, KV_HEADS, 1).contiguous()
        return K.prefill_attention(q, gk, gv, cu, cu, 0.25), cu

    k2, v2 = k.clone(), v.clone()
    expected = step(k, v)
    got = torch.compile(step, backend="aot_eager", fullgraph=True)(k2, v2)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(k2, k)


class TinyPrefillLayer(torch.nn.Module):
    """One chunked-prefill step: project the chunk, write its K/V to the pages, attend over prefix + chunk."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.qkv = torch.nn.Linear(32, (HEADS + 2 * KV_HEADS) * HEAD_DIM)

    def forward(self, x, k_cache, v_cache, table, qsl, seq_lens, slots):
        q, k, v = self.qkv(x).split([HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM], dim=-1)
        q = q.reshape(-1, HEADS, HEAD_DIM)
        K.write_kv(k.reshape(-1, KV_HEADS, HEAD_DIM), v.reshape(-1, KV_HEADS, HEAD_DIM), k_cache, v_cache, slots)
        windowed = K.paged_prefill(q, k_cache, v_cache, table, qsl, seq_lens, HEAD_DIM ** -0.5, sliding_window=3)
        out = torch.empty_like(q)
        K.paged_prefill(q, k_cache, v_cache, table, qsl, seq_lens, HEAD_DIM ** -0.5, logit_soft_cap=20.0, out=out)
        mixed = K.paged_attention(q, k_cache, v_cache, table, qsl, seq_lens, HEAD_DIM ** -0.5)
        K.paged_attention(q, k_cache, v_cache, table, qsl, seq_lens, HEAD_DIM ** -0.5, out=out)
        return windowed + out + mixed


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_prefill_layer_matches_eager_in_one_graph(backend):
    k, v, table, lens, _ = _state()
    qsl = torch.tensor([0, 2, 7], dtype=torch.int32)  # the last 2 of 3 and the last 5 of 6 positions are new
    slots = torch.tensor([int(table[b, p // BLOCK]) * BLOCK + p % BLOCK for b, n, new in ((0, 3, 2), (1, 6, 5))
                          for p in range(n - new, n)], dtype=torch.int64)
    layer, x = TinyPrefillLayer(), torch.randn(7, 32)
    k2, v2 = k.clone(), v.clone()
    with torch.no_grad():
        expected = layer(x, k, v, table, qsl, lens, slots)
        explained = torch._dynamo.explain(layer)(x, k2.clone(), v2.clone(), table, qsl, lens, slots)
        assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
        ops_called = {getattr(node.target, "_qualified_op_name", None) for node in explained.graphs[0].graph.nodes}
        assert {"kvpool::write_kv", "kvpool::paged_prefill", "kvpool::paged_prefill_out", "kvpool::paged_attention",
                "kvpool::paged_attention_out"} <= ops_called, ops_called
        got = torch.compile(layer, backend=backend, fullgraph=True)(x, k2, v2, table, qsl, lens, slots)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(k2, k)


def _op_samples():
    k, v, table, lens, slots = _state()
    new = torch.randn(2, KV_HEADS, HEAD_DIM)
    q = torch.randn(2, HEADS, HEAD_DIM)
    cu = torch.tensor([0, 3, 9], dtype=torch.int32)
    packed_q, packed_k = torch.randn(9, HEADS, HEAD_DIM), torch.randn(9, KV_HEADS, HEAD_DIM)
    return [
        (ops.write_kv_op, (new, new.clone(), k.clone(), v.clone(), slots, None, None)),
        (ops.gather_kv_op, (k, v, table, lens, None, None, torch.float32, 9)),
        (ops.gather_kv_out_op, (k, v, table, lens, None, None, torch.empty(9, KV_HEADS, HEAD_DIM),
                                torch.empty(9, KV_HEADS, HEAD_DIM))),
        (ops.copy_blocks_op, ([k.clone(), v.clone()], torch.tensor([1]), torch.tensor([NUM_BLOCKS - 1]))),
        (ops.paged_decode_op, (q, k, v, table, lens, 0.25, 4, 30.0, None, None, torch.zeros(HEADS))),
        (ops.paged_decode_out_op, (q, k, v, table, lens, 0.25, None, None, None, None, None, torch.empty_like(q))),
        (ops.prefill_attention_op, (packed_q, packed_k, packed_k.clone(), cu, cu, 0.25, None, None, None)),
        (ops.paged_prefill_op, (packed_q, k, v, table, cu, lens, 0.25, True, 4, 30.0, None, None, torch.zeros(HEADS))),
        (ops.paged_prefill_out_op, (packed_q, k, v, table, cu, lens, 0.25, False, None, None, None, None, None,
                                    torch.empty_like(packed_q))),
        (ops.paged_attention_op, (packed_q, k, v, table, cu, lens, 0.25, True, None, None, None, None, None)),
        (ops.paged_attention_out_op, (q, k, v, table, torch.tensor([0, 1, 2]), lens, 0.25, True, 2, None, None, None,
                                      None, torch.empty_like(q))),  # a decode step: the split-K path
    ]


OP_NAMES = ["write_kv", "gather_kv", "gather_kv_out", "copy_blocks", "paged_decode", "paged_decode_out",
            "prefill_attention", "paged_prefill", "paged_prefill_out", "paged_attention", "paged_attention_out"]


@pytest.mark.parametrize("index", range(len(OP_NAMES)), ids=OP_NAMES)
def test_opcheck(index):
    op, args = _op_samples()[index]
    torch.library.opcheck(op, args)
