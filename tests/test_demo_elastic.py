"""kvpool.demo --elastic (#16 item 5): the pool starts at a quarter of its size, grows under load, shrinks when
idle (held blocks moved down), and every request's greedy tokens still equal transformers' exactly."""
import pytest

from demo_util import assert_matches_hf, hf, one_thread, weights  # noqa: F401 (fixtures)

from kvpool.demo.__main__ import format_summary, main
from kvpool.demo.launch import DemoOptions, run_demo, run_rank
from kvpool.demo.model import tiny_llama_config
from kvpool.demo.requests import make_workload

SEED = 0
BYTES_PER_BLOCK_TP1 = 4 * 2 * (32 + 32) * 4 * 16  # layers x kv heads x (K + V dims) x fp32 x block_size
BYTES_PER_BLOCK_TP2 = BYTES_PER_BLOCK_TP1 // 2


@pytest.fixture(scope="module")
def config():
    return tiny_llama_config()


def _workload(config):
    # bursts with idle gaps: the pool grows for a burst and shrinks while later requests still run
    return make_workload(12, config["vocab_size"], seed=1, mean_gap=2.0)


def test_elastic_pool_grows_under_load_shrinks_when_idle_and_tokens_stay_exact(config, hf):
    requests = _workload(config)
    opts = DemoOptions(requests=requests, seed=SEED, kv_mib=16 * BYTES_PER_BLOCK_TP1 / 2**20, progress=False,
                       elastic=True)
    report = run_rank(0, opts)
    stats = report.summary.elastic
    assert report.summary.num_blocks == stats.max_blocks == 16
    assert stats.grows > 0 and stats.peak_blocks > 4  # started at 4 blocks, grew under load
    assert stats.shrinks > 0 and stats.blocks_moved > 0  # shrank with sequences running: blocks moved
    assert stats.final_blocks == report.num_blocks == report.num_free_blocks == 4  # back to the start, no leak
    assert_matches_hf(hf, requests, report)
    assert "elastic pool  grew" in format_summary(report, opts)


@pytest.mark.slow
def test_elastic_tp2_ranks_resize_together_and_match_transformers(config, hf):
    requests = _workload(config)
    opts = DemoOptions(tp=2, requests=requests, seed=SEED, kv_mib=16 * BYTES_PER_BLOCK_TP2 / 2**20,
                       progress=False, elastic=True)
    r0, r1 = run_demo(opts, timeout_s=180)
    assert r0.summary.elastic == r1.summary.elastic and r0.summary.elastic.blocks_moved > 0
    assert r0.summary.block_digests == r1.summary.block_digests  # the same block ids on both ranks
    for r in requests:
        assert r0.summary.results[r.req_id].output == r1.summary.results[r.req_id].output
    assert_matches_hf(hf, requests, r0)


def test_the_cli_flag(capsys):
    assert main(["--elastic", "--requests", "6", "--no-progress", "--kv-mib", "1"]) == 0
    assert "elastic pool  grew" in capsys.readouterr().out


def test_elastic_with_a_host_tier_is_refused_in_one_line(capsys):
    assert main(["--elastic", "--host-kv-mib", "1", "--requests", "2", "--no-progress"]) == 2
    assert "--elastic with --host-kv-mib is not supported yet" in capsys.readouterr().err
