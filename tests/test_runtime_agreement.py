"""size_kv_pool over a real 2-process gloo group: equal settings agree, one-sided failures fail everywhere.

Issue 9, items 11 and 12: the same settings written differently on two ranks (``headroom=0`` vs ``0.0``,
``"FP8"`` vs ``"fp8"``, numpy integers) must not be a mismatch; a failure on one rank (an absurd
argument, a ``KeyboardInterrupt`` in ``profile_fn``) must reach every rank as the same ``KVPoolError``
instead of a hang or a raw gloo error; duplicate or missing ``tp_rank`` values are an error on every
rank. Three groups are spawned, so that one hang or broken group cannot hide another's results.
"""
from __future__ import annotations

import contextlib

import pytest
from gloo_util import run_group

pytestmark = pytest.mark.slow

GiB = 1024**3
WORLD = 2
BASE = dict(spec="llama-3.1-8b", device_memory_bytes=24 * GiB, in_use_bytes=15 * GiB, activation_bytes=GiB)


def _settings_scenarios(rank: int, world: int):
    """Scenarios whose outcome does not depend on the group surviving a one-sided failure (except the last)."""
    import numpy as np

    yield "headroom_int_vs_float", dict(BASE, headroom=0 if rank == 0 else 0.0)
    yield "kv_dtype_case", dict(BASE, kv_dtype="FP8" if rank == 0 else "fp8")
    yield "kv_dtype_auto_vs_named", dict(BASE, kv_dtype="auto" if rank == 0 else "bf16")
    numpy_ints = dict(block_size=np.int64(16), max_batched_tokens=np.int32(8192), max_seqs=np.uint16(256),
                      tp_size=np.int64(world), tp_rank=np.int8(rank), device_memory_bytes=np.int64(24 * GiB))
    yield "numpy_ints_on_one_rank", dict(BASE, **(numpy_ints if rank == 1 else {}))
    yield "headroom_nan_on_one_rank", dict(BASE, headroom=float("nan") if rank == 1 else 0)
    yield "duplicate_tp_rank", dict(BASE, tp_rank=0)
    yield "missing_tp_ranks", dict(BASE, tp_size=4)  # ranks 0 and 1 hold tp_rank 0 and 1 of 4
    yield "two_replicas_of_tp1", dict(BASE, tp_size=1)  # tp_rank 0 twice: one pool per replica, allowed
    yield "key_a", dict(BASE)
    yield "key_b", dict(BASE)
    yield "huge_memory_on_one_rank", dict(BASE, device_memory_bytes=2**90 if rank == 1 else 24 * GiB)
    yield "after_huge_memory", dict(BASE)


def _interrupt_scenarios(rank: int, world: int):
    def interrupted():
        raise KeyboardInterrupt

    yield "interrupt_in_profile_fn", dict(BASE, profile_fn=interrupted if rank == 1 else (lambda: None))
    yield "after_interrupt", dict(BASE)


class _NoMemoryTorch:
    """``torch`` for kvpool.runtime.measure on a rank whose device is full: every ``zeros`` fails."""

    def __getattr__(self, name):
        import torch

        return getattr(torch, name)

    @staticmethod
    def zeros(*args, **kwargs):
        import torch

        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 MiB (pretend)")


@contextlib.contextmanager
def _pretend_nccl(full: bool):
    """The group reports the NCCL backend (its tensors stay on the CPU), so the warm-up all-reduce runs."""
    import dataclasses

    import kvpool.runtime.group as group
    import kvpool.runtime.measure as measure

    real_resolve, real_torch = group.resolve_group, measure.torch
    group.resolve_group = lambda g=None: dataclasses.replace(real_resolve(g), backend="nccl")
    measure.torch = _NoMemoryTorch() if full else real_torch
    try:
        yield
    finally:
        group.resolve_group, measure.torch = real_resolve, real_torch


def _warm_up_scenarios(rank: int, world: int):
    small = dict(BASE, max_batched_tokens=64)  # a 512 KiB warm-up message
    with _pretend_nccl(full=False):
        yield "warm_up_runs", dict(small)
    with _pretend_nccl(full=rank == 1):
        yield "warm_up_message_does_not_fit_on_one_rank", dict(small)
    yield "after_warm_up_failure", dict(small)


@pytest.fixture(scope="module")
def settings_results(tmp_path_factory):
    return run_group(WORLD, tmp_path_factory.mktemp("agree"), _settings_scenarios)


@pytest.fixture(scope="module")
def interrupt_results(tmp_path_factory):
    return run_group(WORLD, tmp_path_factory.mktemp("interrupt"), _interrupt_scenarios)


@pytest.fixture(scope="module")
def warm_up_results(tmp_path_factory):
    return run_group(WORLD, tmp_path_factory.mktemp("warm_up"), _warm_up_scenarios)


def _same_pool_everywhere(results, name) -> dict:
    got = [r[name] for r in results]
    assert all("ok" in g for g in got), (name, got)
    assert all(g == got[0] for g in got), name
    return got[0]["ok"]


@pytest.mark.parametrize("name, kv_dtype", [
    ("headroom_int_vs_float", "bf16"),
    ("kv_dtype_case", "fp8"),
    ("kv_dtype_auto_vs_named", "bf16"),
    ("numpy_ints_on_one_rank", "bf16"),
])
def test_the_same_settings_written_differently_agree(settings_results, name, kv_dtype):
    size = _same_pool_everywhere(settings_results, name)
    assert size["kv_dtype"] == kv_dtype and size["block_size"] == 16 and size["num_blocks"] > 0
    assert isinstance(size["num_blocks"], int)


def test_nan_headroom_on_one_rank_is_an_argument_error_on_every_rank(settings_results):
    for res in settings_results:
        got = res["headroom_nan_on_one_rank"]
        assert got.get("error") == "InvalidArgumentError", got
        assert "rank 1: InvalidArgumentError: headroom must be finite, got nan" in got["message"]


def test_two_ranks_with_the_same_tp_rank_fail_on_every_rank(settings_results):
    for res in settings_results:
        got = res["duplicate_tp_rank"]
        assert got.get("error") == "InvalidArgumentError", got
        assert "tp_rank 0 is held by ranks 0 and 1" in got["message"]
        assert "no rank holds tp_rank 1" in got["message"]


def test_missing_tp_ranks_fail_on_every_rank(settings_results):
    for res in settings_results:
        got = res["missing_tp_ranks"]
        assert got.get("error") == "InvalidArgumentError", got
        assert "tp_size=4" in got["message"] and "no rank holds tp_rank 2 and 3" in got["message"]


def test_replicas_holding_each_tp_rank_equally_often_are_allowed(settings_results):
    size = _same_pool_everywhere(settings_results, "two_replicas_of_tp1")
    assert size["tp_size"] == 1 and [r["tp_rank"] for r in size["ranks"]] == [0, 0]


def test_every_rank_gets_the_same_hash_key_and_each_call_a_new_one(settings_results):
    keys = [[r[name]["hash_key"] for r in settings_results] for name in ("key_a", "key_b")]
    for per_rank in keys:
        assert isinstance(per_rank[0], int) and 0 <= per_rank[0] < 2**128
        assert per_rank == [per_rank[0]] * WORLD
    assert keys[0][0] != keys[1][0]


def test_an_absurd_memory_size_on_one_rank_fails_on_every_rank_without_a_hang(settings_results):
    for res in settings_results:
        got = res["huge_memory_on_one_rank"]
        assert got.get("error") == "InvalidArgumentError", got
        assert f"rank 1: InvalidArgumentError: device_memory_bytes={2**90}" in got["message"]
    _same_pool_everywhere(settings_results, "after_huge_memory")


def test_a_keyboard_interrupt_in_profile_fn_reaches_the_other_rank_as_a_profile_error(interrupt_results):
    rank0, rank1 = (r["interrupt_in_profile_fn"] for r in interrupt_results)
    assert rank1["error"] == "KeyboardInterrupt", rank1  # re-raised where it happened, after telling rank 0
    assert rank0.get("error") == "ProfileError", rank0
    assert "rank 1: KeyboardInterrupt: the process was interrupted" in rank0["message"]
    _same_pool_everywhere(interrupt_results, "after_interrupt")  # the group is still in step


def test_the_warm_up_all_reduce_runs_over_the_group(warm_up_results):
    _same_pool_everywhere(warm_up_results, "warm_up_runs")


def test_a_warm_up_message_that_does_not_fit_on_one_rank_fails_on_every_rank_before_the_all_reduce(warm_up_results):
    for res in warm_up_results:
        got = res["warm_up_message_does_not_fit_on_one_rank"]
        assert got.get("error") == "KVPoolError", got
        assert got["message"].startswith("allocating the NCCL warm-up message failed on 1 of 2 rank(s)")
        assert "rank 1: OutOfMemoryError: CUDA out of memory" in got["message"]
    _same_pool_everywhere(warm_up_results, "after_warm_up_failure")
