"""size_kv_pool over real gloo groups of 2 and 4 processes (torch.multiprocessing, spawn).

Each world size is spawned once (module fixture, harness in gloo_util.py); every rank runs all scenarios
in order on the same group and writes what each returned or raised to a JSON file, which the tests below
check. A rank that hangs or dies fails the fixture after a bounded wait instead of blocking the suite.
Item 11/12 failures (normalised settings, one-sided errors, tp_rank sets) are in test_runtime_agreement.py.
"""
from __future__ import annotations

import json

import pytest
from gloo_util import run_group

# about 4 s (2 ranks) and 6 s (4 ranks) here, mostly the ranks importing torch
pytestmark = pytest.mark.slow

GiB = 1024**3
# per-rank device memory (GiB) in the "budgets" scenario: the smallest is on the last rank
BUDGETS_GIB = [24, 22, 26, 21]
IN_USE = 15 * GiB  # llama-3.1-8b's bf16 weights, about
ACTIVATION = 1 * GiB


def _llama_dict(**changes) -> dict:
    from kvpool.plan.model import PRESET_DIR

    with open(PRESET_DIR / "llama-3.1-8b.json") as f:
        cfg = json.load(f)
    cfg.update(changes)
    return cfg


def _scenarios(rank: int, world: int):
    """(name, kwargs for size_kv_pool) in the order every rank runs them."""
    last = world - 1

    def boom():
        raise ValueError(f"forward failed on purpose on rank {rank}")

    base = dict(spec="llama-3.1-8b", device_memory_bytes=BUDGETS_GIB[rank] * GiB, in_use_bytes=IN_USE,
                activation_bytes=ACTIVATION)
    yield "budgets", dict(base)
    yield "spec_mismatch", dict(base, spec=_llama_dict(num_hidden_layers=40) if rank == last else _llama_dict())
    yield "block_size_mismatch", dict(base, block_size=32 if rank == 0 else 16)
    yield "profile_error", dict(base, profile_fn=boom if rank == 1 else (lambda: None))
    yield "bad_argument_on_one_rank", dict(base, mem_fraction=1.5 if rank == last else 0.9)
    yield "no_block", dict(base, device_memory_bytes=(16 * GiB) if rank == 1 else base["device_memory_bytes"])
    yield "after_errors", dict(base, kv_dtype="fp8")  # the group still works after every failure above


@pytest.fixture(scope="module", params=[2, 4], ids=["world2", "world4"])
def world_results(request, tmp_path_factory):
    world = request.param
    return world, run_group(world, tmp_path_factory.mktemp(f"gloo{world}"), _scenarios)


def _expected_blocks(total: int, bytes_per_block: int) -> int:
    return (int(0.9 * total) - IN_USE - ACTIVATION) // bytes_per_block


def test_ranks_with_different_budgets_agree_on_the_smallest_block_count(world_results):
    world, results = world_results
    sizes = [r["budgets"]["ok"] for r in results]
    bpb = sizes[0]["bytes_per_block"]
    # layers x KV heads per shard x (K+V) x head_dim x bf16 x block: the pool is laid out for tp = world
    assert bpb == 32 * (8 // world) * 2 * 128 * 2 * 16
    own = [_expected_blocks(BUDGETS_GIB[r] * GiB, bpb) for r in range(world)]
    assert len(set(own)) == world  # the budgets really differ
    deciding = own.index(min(own))
    for size in sizes:
        assert size == sizes[0]  # the same object on every rank
        assert size["num_blocks"] == min(own)
        assert size["deciding_rank"] == deciding == world - 1
        assert [r["num_blocks"] for r in size["ranks"]] == own
        assert [r["total_bytes"] for r in size["ranks"]] == [BUDGETS_GIB[r] * GiB for r in range(world)]
        assert size["total_bytes"] == BUDGETS_GIB[deciding] * GiB
        assert size["num_tokens"] == min(own) * 16
        assert size["kv_bytes"] == min(own) * bpb
        assert size["tp_size"] == world


def test_a_rank_with_another_spec_makes_every_rank_raise(world_results):
    world, results = world_results
    for r, res in enumerate(results):
        got = res["spec_mismatch"]
        assert got.get("error") == "RankMismatchError", (r, got)
        assert f"rank {world - 1} differs from rank 0" in got["message"]
        assert "spec.num_layers: 40 vs 32" in got["message"]
        assert "block_size" not in got["message"].split(" agree.")[0]


def test_a_rank_with_another_block_size_makes_every_rank_raise(world_results):
    world, results = world_results
    for res in results:
        got = res["block_size_mismatch"]
        assert got.get("error") == "RankMismatchError", got
        # rank 0 is the reference: every other rank is named, on block_size only
        for r in range(1, world):
            assert f"rank {r} differs from rank 0 on block_size: 16 vs 32" in got["message"]
        assert "spec." not in got["message"].split(" agree.")[0]


def test_profile_fn_failing_on_one_rank_raises_profile_error_on_all(world_results):
    _, results = world_results
    for res in results:
        got = res["profile_error"]
        assert got.get("error") == "ProfileError", got
        assert "rank 1: ValueError: forward failed on purpose on rank 1" in got["message"]
        assert "1 of" in got["message"]


def test_a_bad_argument_on_one_rank_raises_on_all(world_results):
    world, results = world_results
    for res in results:
        got = res["bad_argument_on_one_rank"]
        assert got.get("error") == "InvalidArgumentError", got
        assert f"rank {world - 1}: InvalidArgumentError: mem_fraction must be in (0, 1], got 1.5" in got["message"]


def test_a_budget_leaving_no_block_on_one_rank_raises_on_all(world_results):
    world, results = world_results
    for res in results:
        got = res["no_block"]
        assert got.get("error") == "PlanError", got
        assert f"no KV block on rank 1 of {world}" in got["message"]
        assert "14.40 GiB budget - 15.00 GiB torch in use" in got["message"]


def test_the_group_keeps_working_after_the_errors(world_results):
    world, results = world_results
    sizes = [r["after_errors"]["ok"] for r in results]
    assert all(s == sizes[0] for s in sizes)
    # fp8 halves the data and adds one float32 scale per token, head and tensor
    assert sizes[0]["bytes_per_block"] == 32 * (8 // world) * 2 * (128 + 4) * 16
    assert sizes[0]["deciding_rank"] == world - 1


def test_every_rank_gets_the_same_fresh_prefix_cache_hash_key(world_results):
    _, results = world_results
    keys = {name: [r[name]["hash_key"] for r in results] for name in ("budgets", "after_errors")}
    for name, per_rank in keys.items():
        assert isinstance(per_rank[0], int) and 0 <= per_rank[0] < 2**128, (name, per_rank[0])
        assert len(set(per_rank)) == 1, (name, per_rank)  # broadcast from TP rank 0
    assert keys["budgets"][0] != keys["after_errors"][0]  # a fresh draw per call
