"""kvpool.demo with a host tier (issue 14 item 6): a shared-prefix workload larger than the GPU pool's cache hits
on the host, computes fewer prompt tokens than without the tier, and every request's greedy tokens still equal
transformers' exactly (reloaded KV is the KV the evicted blocks held)."""
import pytest

from demo_util import assert_matches_hf, hf, one_thread, weights  # noqa: F401 (fixtures)

from kvpool.demo.__main__ import format_summary
from kvpool.demo.launch import DemoOptions, run_rank
from kvpool.demo.model import tiny_llama_config
from kvpool.demo.requests import make_workload
from kvpool.errors import ConfigError

SEED = 0


@pytest.fixture(scope="module")
def config():
    return tiny_llama_config()


def serve(requests, host_kv_mib, **kw):
    opts = DemoOptions(requests=requests, seed=SEED, progress=False, host_kv_mib=host_kv_mib, **kw)
    return opts, run_rank(0, opts)


def test_the_host_tier_removes_recompute_and_keeps_tokens_exact(config, hf):
    requests = make_workload(24, config["vocab_size"], seed=SEED)  # the default run: 12 GPU blocks
    _, off = serve(requests, 0.0)
    opts, on = serve(requests, 1.0)
    tier = on.summary.host_tier
    assert off.summary.host_tier is None
    assert tier["blocks"] == 32 and tier["host_hit_blocks"] > 0 and tier["completed_reloads"] == tier["host_hit_blocks"]
    assert on.summary.computed_prompt_tokens < off.summary.computed_prompt_tokens
    assert on.summary.prefix_hit_rate > off.summary.prefix_hit_rate
    assert_matches_hf(hf, requests, on)
    assert on.num_free_blocks == on.num_blocks  # every copy's hold was released at the end
    assert tier["in_flight_offloads"] == tier["in_flight_reloads"] == 0
    assert "hit on the host and reloaded" in format_summary(on, opts)
    assert f"kvpool_host_hit_blocks_total {float(tier['host_hit_blocks'])}" in on.metrics_text  # rank 0's /metrics


def test_the_host_tier_refuses_a_hybrid_model_and_a_pool_without_prefix_caching(config):
    requests = make_workload(2, config["vocab_size"], seed=SEED)
    with pytest.raises(ConfigError, match="host-kv-mib needs prefix caching"):
        serve(requests, 1.0, prefix_caching=False)
    with pytest.raises(ConfigError, match="less than one block"):
        serve(requests, 0.001)
