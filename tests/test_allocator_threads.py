"""Several Python threads share one allocator (the C++ core releases the GIL and locks a mutex).

Each thread allocates, caches, matches, increfs and frees its own blocks for a bounded time; at the
end every block must be accounted for and the counters must add up.
"""
import threading
import time

import numpy as np

from kvpool import BlockAllocator, OutOfBlocksError, hash_block_tokens

NUM_BLOCKS = 256
THREADS = 4
SECONDS = 1.0


def worker(alloc, seed, totals, errors):
    rng = np.random.default_rng(seed)
    held = []  # arrays of ids, one reference each
    allocated = hits = 0
    deadline = time.monotonic() + SECONDS
    try:
        while time.monotonic() < deadline:
            op = rng.integers(0, 4)
            if op == 0:
                n = int(rng.integers(1, 24))
                try:
                    ids = alloc.allocate(n)
                except OutOfBlocksError as e:
                    assert e.requested == n and e.available < n
                    continue
                allocated += n
                # a few shared prompts, so threads hit each other's cached blocks
                prompt = np.full(16 * n, rng.integers(0, 3), dtype=np.int32)
                alloc.cache_blocks(ids, hash_block_tokens(prompt, 16))
                held.append(ids)
            elif op == 1 and held:
                alloc.free(held.pop(int(rng.integers(0, len(held)))))
            elif op == 2:
                prompt = np.full(16 * int(rng.integers(1, 8)), rng.integers(0, 3), dtype=np.int32)
                hit = alloc.match_prefix(hash_block_tokens(prompt, 16))
                hits += len(hit)
                held.append(hit)
            elif op == 3 and held:
                shared = held[int(rng.integers(0, len(held)))]
                alloc.incref(shared)
                held.append(shared.copy())
        for ids in held:
            alloc.free(ids)
        totals.append((allocated, hits))
    except BaseException as e:  # surfaced by the main thread
        errors.append(e)


def test_threads_keep_every_block_accounted_for():
    alloc = BlockAllocator(NUM_BLOCKS, block_size=16)
    totals, errors = [], []
    threads = [threading.Thread(target=worker, args=(alloc, seed, totals, errors)) for seed in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors, errors
    assert len(totals) == THREADS
    alloc.check_invariants()
    assert alloc.num_free_blocks == NUM_BLOCKS
    assert alloc.refcounts(np.arange(NUM_BLOCKS, dtype=np.int32)).tolist() == [0] * NUM_BLOCKS
    stats = alloc.stats()
    assert stats["allocations"] == sum(a for a, _ in totals) > 0
    assert stats["prefix_hit_blocks"] == sum(h for _, h in totals) > 0
    assert stats["used_blocks"] == 0 and stats["high_water_mark"] <= NUM_BLOCKS
    assert stats["num_blocks"] - stats["free_blocks"] == 0


def test_gil_is_released_inside_the_cpp_work():
    # While one thread is inside a long C++ call, the main thread must get to run Python code.
    # Were the GIL held, the main thread could resume only after the call had returned.
    tokens = np.zeros(32 << 20, dtype=np.int32)  # 32 M tokens: tens of ms of hashing
    started = threading.Event()
    call = {}

    def hash_in_thread():
        started.set()
        call["start"] = time.perf_counter()
        hash_block_tokens(tokens, 16)
        call["end"] = time.perf_counter()

    worker_thread = threading.Thread(target=hash_in_thread)
    worker_thread.start()
    started.wait()
    main_resumed = time.perf_counter()
    worker_thread.join()
    assert main_resumed < call["end"], (
        f"main thread resumed {1e3 * (main_resumed - call['end']):.1f} ms after the C++ call returned")
