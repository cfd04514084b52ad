"""MemoryBudget (#16 item 4): one byte limit shared by pools in one process and by processes on one GPU."""
import multiprocessing as mp
import threading

import pytest

from kvpool.elastic import MemoryBudget
from kvpool.errors import InvalidArgumentError

UNIT = 4096


def test_reserve_and_release_in_one_process():
    budget = MemoryBudget(10 * UNIT)
    assert budget.try_reserve(6 * UNIT) and not budget.try_reserve(5 * UNIT)
    assert (budget.used_bytes, budget.free_bytes) == (6 * UNIT, 4 * UNIT)
    assert budget.reserve_within(lambda free: free // 2) == 2 * UNIT
    budget.release(8 * UNIT)
    assert budget.used_bytes == 0 and budget.try_reserve(10 * UNIT)


@pytest.mark.parametrize("call,match", [
    (lambda b: b.release(UNIT), r"release\(4096\) but this process holds 0 bytes"),
    (lambda b: b.try_reserve(-1), r"nbytes=-1\): nbytes must be >= 0"),
    (lambda b: b.reserve_within(lambda free: free + 1), r"chose 40961 bytes with 40960 free"),
    (lambda b: b.try_reserve(1.5), "nbytes"),
])
def test_bad_calls_are_refused_and_change_nothing(call, match):
    budget = MemoryBudget(10 * UNIT)
    with pytest.raises(InvalidArgumentError, match=match):
        call(budget)
    assert budget.used_bytes == 0


def test_bad_limits(tmp_path):
    with pytest.raises(InvalidArgumentError, match="limit_bytes=-1 must be >= 0"):
        MemoryBudget(-1)
    with pytest.raises(InvalidArgumentError, match="needs limit_bytes"):
        MemoryBudget()
    with pytest.raises(InvalidArgumentError, match="does not exist yet"):
        MemoryBudget(path=tmp_path / "b.json")
    MemoryBudget(UNIT, tmp_path / "b.json")
    with pytest.raises(InvalidArgumentError, match="holds limit 4096 bytes, not limit_bytes=8192"):
        MemoryBudget(2 * UNIT, tmp_path / "b.json")
    assert MemoryBudget(path=tmp_path / "b.json").limit_bytes == UNIT  # adopts the file's limit


def test_threads_never_overdraw():
    budget = MemoryBudget(1000 * UNIT)
    got = [0] * 4

    def grab(i):
        while budget.try_reserve(UNIT):
            got[i] += 1

    threads = [threading.Thread(target=grab, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(got) == 1000 and budget.free_bytes == 0


def _grab_until_full(path, ready, go, out):
    budget = MemoryBudget(path=path)
    ready.set()
    go.wait(30)
    n = 0
    while budget.try_reserve(UNIT):
        n += 1
    out.put(n)


def test_two_processes_share_one_file_without_lost_updates(tmp_path):
    path = tmp_path / "gpu0.json"
    MemoryBudget(300 * UNIT, path)
    ctx = mp.get_context("spawn")
    out, go = ctx.Queue(), ctx.Event()
    readies = [ctx.Event() for _ in range(2)]
    procs = [ctx.Process(target=_grab_until_full, args=(path, r, go, out)) for r in readies]
    for p in procs:
        p.start()
    assert all(r.wait(60) for r in readies)
    go.set()
    counts = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
    assert sum(counts) == 300  # every unit handed out once: the lock serialises read-modify-write
    # both processes have exited: the bytes they held go back at the next access
    assert MemoryBudget(path=path).used_bytes == 0


def _hold_and_report(path, nbytes, out):
    budget = MemoryBudget(path=path)
    out.put(budget.try_reserve(nbytes))


def test_the_bytes_of_a_process_that_died_come_back(tmp_path):
    path = tmp_path / "gpu0.json"
    budget = MemoryBudget(10 * UNIT, path)
    assert budget.try_reserve(3 * UNIT)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    p = ctx.Process(target=_hold_and_report, args=(path, 7 * UNIT, out))
    p.start()
    assert out.get(timeout=60) is True
    p.join(30)
    assert budget.used_bytes == 3 * UNIT and budget.try_reserve(7 * UNIT)  # the exited process holds nothing


def _pool_in_a_process(path, name, steps, out):
    """One process's elastic pool on the shared budget file: run ``steps`` ((wait_for, action, then_set) each)."""
    from elastic_util import make_pool

    import kvpool

    pool = make_pool(num_blocks=32, budget=MemoryBudget(path=path))  # 4 regions x one 2 MiB chunk
    for wait_for, action, then_set in steps:
        if wait_for is not None:
            wait_for.wait(60)
        try:
            result = getattr(pool, action[0])(*action[1:])
        except kvpool.KVPoolError as err:
            result = type(err).__name__
        out.put((name, action[0], result, pool.num_blocks, pool.mapped_bytes))
        if then_set is not None:
            then_set.set()


def test_two_processes_grow_only_into_what_the_other_gave_back(tmp_path):
    path = tmp_path / "gpu0.json"
    MemoryBudget(32 * 2**20, path)  # 16 chunks: 4 for each pool's start, 8 left
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    a_grew, b_refused, a_shrank = ctx.Event(), ctx.Event(), ctx.Event()
    a_steps = [(None, ("grow", 64), a_grew), (b_refused, ("shrink", 64), a_shrank)]
    b_steps = [(a_grew, ("grow", 32), b_refused), (a_shrank, ("grow", 64), None)]
    procs = [ctx.Process(target=_pool_in_a_process, args=(path, n, s, out)) for n, s in (("a", a_steps),
                                                                                           ("b", b_steps))]
    for p in procs:
        p.start()
    seen = [out.get(timeout=120) for _ in range(4)]
    for p in procs:
        p.join(30)
    MiB = 2**20
    # the events order the steps; the queue orders only each process's own reports (a put is sent by a thread)
    assert [r for r in seen if r[0] == "a"] == [("a", "grow", 64, 96, 24 * MiB),  # a takes the 8 free chunks
                                                ("a", "shrink", 64, 32, 8 * MiB)]  # a gives 8 chunks back
    assert [r for r in seen if r[0] == "b"] == [("b", "grow", "OutOfBlocksError", 32, 8 * MiB),  # b refused, unchanged
                                                ("b", "grow", 64, 96, 24 * MiB)]  # b grows into a's chunks
    assert MemoryBudget(path=path).used_bytes == 0  # both exited: their bytes are back
