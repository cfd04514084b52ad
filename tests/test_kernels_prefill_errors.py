"""paged_prefill / paged_attention reject bad arguments with a KernelError (BlockIndexError for index values)
that names the value and the fix, before touching ``out``; what a window never reads may be padding."""
import pytest
import torch
from kernels_util import FP8, new_cache, random_tables

from kvpool import BlockIndexError, KernelError
from kvpool.kernels import paged_prefill

BS, KVH, HEADS, D = 4, 2, 4, 16


def _args(lens=(6, 9), qlens=(6, 2)):
    gen = torch.Generator().manual_seed(0)
    k, v, _, _ = new_cache(16, BS, KVH, D, torch.float32, None, "cpu", gen)
    table, seq_lens = random_tables(list(lens), BS, 16, "cpu", gen)
    qsl = torch.tensor([0, *torch.tensor(qlens).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(int(qsl[-1]), HEADS, D, generator=gen)
    return {"q": q, "k_cache": k, "v_cache": v, "block_table": table, "query_start_loc": qsl, "seq_lens": seq_lens,
            "scale": 0.25}


def _with(**changes):
    def make():
        args = _args()
        for name, change in changes.items():
            args[name] = change(args) if callable(change) else change
        return args
    return make


# (id, arguments, error class, words the message must hold)
BAD = [
    ("q-2d", _with(q=lambda a: a["q"][:, 0]), KernelError, "[num_new_tokens, q_heads, head_dim]"),
    ("q-head-dim", _with(q=lambda a: a["q"][..., :8]), KernelError, "head_dim must be 16"),
    ("q-heads", _with(q=lambda a: a["q"][:, :3]), KernelError, "multiple of kv_heads=2"),
    ("q-dtype", _with(q=lambda a: a["q"].half()), KernelError, "cast q to the cache dtype"),
    ("qsl-length", _with(query_start_loc=lambda a: a["query_start_loc"][:-1]), KernelError, "batch + 1 = 3"),
    ("qsl-float", _with(query_start_loc=lambda a: a["query_start_loc"].float()), KernelError, "int32 or int64"),
    ("qsl-start", _with(query_start_loc=torch.tensor([1, 6, 8], dtype=torch.int32)), KernelError, "start at 0"),
    ("qsl-end", _with(query_start_loc=torch.tensor([0, 6, 7], dtype=torch.int32)), KernelError, "8 rows"),
    ("qsl-decreasing", _with(query_start_loc=torch.tensor([0, 9, 8], dtype=torch.int32)), KernelError,
     "never decrease"),
    ("q-len-over-seq-len", _with(seq_lens=torch.tensor([5, 9], dtype=torch.int32)), BlockIndexError,
     "6 new tokens, seq_lens[0]=5"),
    ("seq-len-over-capacity", _with(seq_lens=torch.tensor([6, 17], dtype=torch.int32)), BlockIndexError,
     "capacity 16"),
    ("block-id", _with(block_table=lambda a: a["block_table"].index_put_((torch.tensor(1), torch.tensor(1)),
                                                                          torch.tensor(16, dtype=torch.int32))),
     BlockIndexError, "block_table[1, 1]=16 is outside [0, 16)"),
    ("table-rows", _with(block_table=lambda a: a["block_table"][:1]), KernelError, "one row per sequence"),
    ("window-bidirectional", _with(causal=False, sliding_window=4), KernelError, "needs causal=True"),
    ("causal-not-bool", _with(causal=1), KernelError, "causal must be True or False"),
    ("scale-nan", _with(scale=float("nan")), KernelError, "scale must be a finite float"),
    ("window-zero", _with(sliding_window=0), KernelError, "sliding_window must be a positive int"),
    ("fp8-no-scales", _with(k_cache=lambda a: a["k_cache"].to(FP8), v_cache=lambda a: a["v_cache"].to(FP8),
                            q=lambda a: a["q"].bfloat16()), KernelError, "needs k_scale and v_scale"),
    ("sinks-shape", _with(sinks=torch.zeros(3)), KernelError, "[q_heads]=(4,)"),
]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("make,error,words", [pytest.param(*case[1:], id=case[0]) for case in BAD])
def test_paged_prefill_rejects(monkeypatch, backend, make, error, words):
    if backend == "triton" and not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # the checks run before any launch either way
    monkeypatch.setenv("KVPOOL_KERNELS", backend)
    args = make()
    out = torch.full_like(args["q"], float("nan"))
    with pytest.raises(error) as info:
        paged_prefill(**args, out=out if out.shape == args["q"].shape else None)
    assert words in str(info.value), str(info.value)
    assert torch.isnan(out).all()  # nothing written


def test_out_must_fit_q(monkeypatch):
    monkeypatch.setenv("KVPOOL_KERNELS", "torch")
    args = _args()
    for out, words in ((torch.empty(3, HEADS, D), "(8, 4, 16) torch.float32"),
                       (torch.empty(1, HEADS, D).expand(8, HEADS, D), "stride 0")):
        with pytest.raises(KernelError) as info:
            paged_prefill(**args, out=out)
        assert words in str(info.value)


def test_positions_outside_the_window_may_be_padding(monkeypatch):
    """A windowed group's released blocks (-1 in `blocks()`) are never read, so they are not range-checked."""
    monkeypatch.setenv("KVPOOL_KERNELS", "torch")
    args = _args(lens=(6, 30), qlens=(6, 2))
    args["block_table"][1, :5] = -1  # positions 0..19; the query at 28 with window 8 reads 21..28
    paged_prefill(**args, sliding_window=8)
    with pytest.raises(BlockIndexError, match=r"block_table\[1, 0\]=-1"):
        paged_prefill(**args)


def test_paged_attention_decode_step_needs_one_token_each(monkeypatch):
    """2 new tokens for 2 sequences split 0 + 2 is no decode step: KernelError pointing at paged_prefill."""
    from kvpool.kernels import paged_attention
    monkeypatch.setenv("KVPOOL_KERNELS", "torch")
    args = _args(lens=(6, 9), qlens=(0, 2))
    with pytest.raises(KernelError, match=r"query_start_loc=\[0, 0, 2\].*call paged_prefill"):
        paged_attention(**args)
    paged_prefill(**args)  # the same batch is fine there


def test_index_values_are_checked_on_every_cpu_call(monkeypatch):
    """The value checks read the tensors, so they are never remembered: the same tensors changed in place
    between two calls are checked again."""
    monkeypatch.setenv("KVPOOL_KERNELS", "torch")
    args = _args()
    paged_prefill(**args)
    args["seq_lens"][0] = 5  # now fewer positions than the sequence's 6 new tokens
    with pytest.raises(BlockIndexError, match=r"6 new tokens, seq_lens\[0\]=5"):
        paged_prefill(**args)
