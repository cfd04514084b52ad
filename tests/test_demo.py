"""kvpool.demo end to end on CPU (fp32): every request's greedy tokens equal transformers' exactly,
under continuous batching, prefix hits and preemption; bad and oversized requests are refused alone;
no block leaks under a seeded arrival fuzz."""
import random

import pytest
import torch

from demo_util import assert_matches_hf, hf, one_thread, weights  # noqa: F401 (fixtures)

from kvpool.demo.hf_reference import hf_logits
from kvpool.demo.launch import DemoOptions, run_rank
from kvpool.demo.model import TinyLlama, check_tp_fits, dense_causal_attention, tiny_llama_config
from kvpool.demo.requests import Request, make_workload
from kvpool.errors import ConfigError, InvalidArgumentError

SEED = 0
BYTES_PER_BLOCK_TP1 = 4 * 2 * (32 + 32) * 4 * 16  # layers x kv heads x (K + V dims) x fp32 x block_size


@pytest.fixture(scope="module")
def config():
    return tiny_llama_config()


def kv_mib(num_blocks: int) -> float:
    return num_blocks * BYTES_PER_BLOCK_TP1 / 2**20


def serve(requests, num_blocks=64, **kw):
    opts = DemoOptions(requests=requests, seed=SEED, kv_mib=kv_mib(num_blocks), progress=False, **kw)
    report = run_rank(0, opts)
    assert report.num_blocks == num_blocks
    return report



def test_model_logits_equal_transformers_on_a_dense_cache(config, weights, hf):
    model = TinyLlama(config, weights)
    prompt = torch.randint(0, config["vocab_size"], (37,), generator=torch.Generator().manual_seed(3))

    def attention(layer, q, k, v):
        return dense_causal_attention(q, k, v, model.scale)

    logits = model.forward(prompt, torch.arange(37), attention, torch.arange(37))
    ref = hf_logits(hf, prompt.tolist())
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)
    top2 = ref.topk(2, dim=-1).values
    assert (top2[:, 0] - top2[:, 1]).min() > 1e-4  # clear argmax winners: exact token equality is meaningful


def test_tp_split_must_divide_the_heads(config):
    with pytest.raises(ConfigError, match="num_key_value_heads=2 does not split over tp=4"):
        check_tp_fits(config, 4)


def test_continuous_batching_with_prefix_hits_matches_transformers(config, hf):
    requests = make_workload(14, config["vocab_size"], seed=1, mean_gap=1.0)
    report = serve(requests, num_blocks=64)
    s = report.summary
    assert_matches_hf(hf, requests, report)
    assert s.max_batch_seqs > 1 and s.mixed_steps > 0  # batched, prefills and decodes in one step
    assert s.prefix_hit_rate > 0.2
    assert report.num_free_blocks == report.num_blocks  # finished requests freed everything


def test_prefix_hit_prefill_reads_the_cached_prefix_from_the_pages(config, hf, monkeypatch):
    """Prompts go through paged_attention's tiled paged_prefill path (never gather_kv): the second prompt's 10
    new tokens attend over its 32 cached + 10 new positions straight from the pages."""
    import kvpool.kernels as kernels
    from kvpool.kernels import mixed_batch, prefill_api

    def no_gather(*a, **kw):
        raise AssertionError("the demo's prompt path must not gather_kv")

    prefills, decodes, calls = [], [], []
    real_attention, real_prefill, real_decode = kernels.paged_attention, prefill_api.paged_prefill, \
        mixed_batch.paged_decode

    def counting_attention(q, k_cache, v_cache, table, qsl, seq_lens, *a, **kw):
        calls.append(1)
        return real_attention(q, k_cache, v_cache, table, qsl, seq_lens, *a, **kw)

    def counting_prefill(q, k_cache, v_cache, table, qsl, seq_lens, *a, **kw):
        prefills.append(list(zip(torch.diff(qsl).tolist(), seq_lens.tolist())))
        return real_prefill(q, k_cache, v_cache, table, qsl, seq_lens, *a, **kw)

    def counting_decode(q, *a, **kw):
        decodes.append(q.shape[0])
        return real_decode(q, *a, **kw)

    monkeypatch.setattr(kernels, "gather_kv", no_gather)
    monkeypatch.setattr(kernels, "paged_attention", counting_attention)
    monkeypatch.setattr(prefill_api, "paged_prefill", counting_prefill)
    monkeypatch.setattr(mixed_batch, "paged_decode", counting_decode)
    rng = random.Random(5)
    prefix = [rng.randrange(512) for _ in range(40)]
    requests = [Request(0, prefix + [7, 8, 9], 6, 0), Request(1, prefix + [1, 2], 6, 10)]
    report = serve(requests)
    assert report.summary.results[1].num_cached_prompt_tokens == 32  # two full 16-token blocks reused
    assert [(10, 42)] in prefills  # 10 new tokens over 42 positions: 32 read from the cached pages + 10 new
    assert len(prefills) == 4 * 2  # 4 layers x 2 prompt steps; the 10 decode-only steps take split-K decode
    assert len(decodes) == 4 * 10 and len(calls) == 4 * 12  # one attention call per layer and step
    assert_matches_hf(hf, requests, report)


def test_preemption_by_recompute_matches_transformers(config, hf):
    requests = make_workload(10, config["vocab_size"], seed=2, mean_gap=0.5)
    report = serve(requests, num_blocks=8)
    assert report.summary.preemptions > 0
    assert report.summary.peak_used_blocks == 8
    assert_matches_hf(hf, requests, report)
    assert report.num_free_blocks == report.num_blocks
    assert "kvpool_preemptions_total" in report.metrics_text


def test_bad_and_oversized_requests_are_refused_alone(config, hf):
    good = make_workload(4, config["vocab_size"], seed=3)
    opts = DemoOptions(requests=good, seed=SEED, kv_mib=kv_mib(16), progress=False, bad_requests=True)
    report = run_rank(0, opts)
    results = report.summary.results
    errors = {rid: r.error for rid, r in results.items() if r.error is not None}
    assert sorted(errors) == [4, 5, 6]
    assert "prompt is empty" in errors[4]
    assert "token id 519 is outside the vocabulary [0, 512)" in errors[5]
    assert "need 97 KV blocks but the whole pool holds 16" in errors[6] and "can never run" in errors[6]
    assert all(results[i].output == [] for i in errors)
    assert_matches_hf(hf, good, report)
    assert report.num_free_blocks == report.num_blocks
    assert "kvpool_requests_rejected_total 3.0" in report.metrics_text


def test_seeded_arrival_fuzz_never_leaks_a_block(config):
    rng = random.Random(1234)
    preemptions = rejections = 0
    for trial in range(6):
        requests = make_workload(rng.randint(4, 14), config["vocab_size"], seed=rng.randrange(10**6),
                                 prefix_len=(8, 40), suffix_len=(1, 30), new_tokens=(1, 20),
                                 mean_gap=rng.choice([0.0, 0.5, 2.0]))
        num_blocks = rng.choice([4, 6, 10, 32])
        report = serve(requests, num_blocks=num_blocks, max_running=rng.choice([2, 4, 16]),
                       max_batch_tokens=rng.choice([32, 256]))
        capacity = num_blocks * 16
        for r in requests:
            res = report.summary.results[r.req_id]
            if len(r.prompt) + r.max_new_tokens - 1 > capacity:
                assert res.error is not None and "can never run" in res.error
            else:
                assert res.error is None and len(res.output) == r.max_new_tokens, (trial, r.req_id, res.error)
        assert report.num_free_blocks == report.num_blocks, f"trial {trial} leaked blocks"
        preemptions += report.summary.preemptions
        rejections += report.summary.rejected
    assert preemptions > 0 and rejections > 0  # the fuzz reached the pool's hard paths


def test_cli_prints_the_summary(capsys):
    from kvpool.demo.__main__ import main

    assert main(["--requests", "6", "--no-progress", "--bad-requests", "--metrics-port", "0"]) == 0
    out = capsys.readouterr().out
    assert "6 finished, 3 refused" in out
    assert "tok/s" in out and "pool peak" in out and "prefix cache" in out and "preemptions" in out
    assert "metrics       were served on http://127.0.0.1:" in out


@pytest.mark.parametrize("salted", [True, False])
def test_tenants_share_cached_blocks_only_when_unsalted(config, hf, salted):
    prompt = list(range(40))  # two full blocks of 16 can be served from the cache
    salt = (lambda t: f"tenant-{t}") if salted else (lambda t: None)
    requests = [Request(0, prompt, 4, 0, salt(0)), Request(1, prompt, 4, 8, salt(1)),
                Request(2, prompt, 4, 16, salt(0))]
    report = serve(requests)
    cached = [report.summary.results[i].num_cached_prompt_tokens for i in range(3)]
    assert cached == ([0, 0, 32] if salted else [0, 32, 32])  # tenant 1 never reads tenant 0's KV
    assert_matches_hf(hf, requests, report)


def test_cli_prints_hits_per_tenant(capsys):
    from kvpool.demo.__main__ import main

    assert main(["--requests", "8", "--no-progress", "--tenants", "2"]) == 0
    assert "tenants       2, each with its own cache salt" in capsys.readouterr().out


@pytest.mark.parametrize("device, backend, gpus, want", [
    ("cpu", None, 0, "gloo"),
    ("cuda", None, 2, "nccl"),
    ("cuda", None, 1, "gloo"),  # two ranks on the one GPU: NCCL would refuse, gloo carries the tensors
    ("cuda", "gloo", 2, "gloo"),
    ("cuda", "nccl", 1, InvalidArgumentError),
    ("cpu", "nccl", 0, InvalidArgumentError),
    ("cpu", "mpi", 0, InvalidArgumentError),
])
def test_process_group_backend(device, backend, gpus, want):
    from kvpool.demo.launch import process_group_backend

    opts = DemoOptions(tp=2, device=device, backend=backend)
    if isinstance(want, str):
        assert process_group_backend(opts, gpus) == want
    else:
        with pytest.raises(want, match="backend"):
            process_group_backend(opts, gpus)


def test_cli_refuses_a_tp_that_does_not_split_the_model(capsys):
    from kvpool.demo.__main__ import main

    assert main(["--tp", "3", "--no-progress"]) == 2
    assert "does not split over tp=3" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (Triton kernels, CUDA pages)")
def test_cuda_triton_path_matches_transformers(config, hf):
    requests = make_workload(12, config["vocab_size"], seed=4, mean_gap=0.5)
    report = serve(requests, num_blocks=8, device="cuda")
    assert report.summary.preemptions > 0
    assert_matches_hf(hf, requests, report)
    assert report.num_free_blocks == report.num_blocks
