"""Issue 17: a prefix-cache hit must never serve another prompt's KV, whatever the hash does.

The oracle is the KV content itself: every block a sequence computes is recorded as the exact token
prefix (and salt) its KV was computed from; a prefix hit must land on a block whose recorded
content is exactly the new prompt's prefix. Hashes are weakened on purpose (8 bits, or constant) so
that collisions are everyday events.
"""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvpool import BlockAllocator, hash_block_tokens
from kvpool._reference import ReferenceBlockAllocator
from kvpool._reference import hash_block_tokens as reference_hash
from kvpool._reference_tables import ReferenceBlockTables
from kvpool.block_table import BlockTables
from kvpool.errors import InvalidArgumentError

ALLOCATORS = {"cpp": BlockAllocator, "reference": ReferenceBlockAllocator}
BS = 4


@pytest.fixture(params=sorted(ALLOCATORS))
def make_allocator(request):
    return ALLOCATORS[request.param]


class WeakReferenceTables(ReferenceBlockTables):
    """The pure-Python twin with block hashes cut to `bits` bits (0 bits: every block collides)."""

    def __init__(self, allocator, bits, **kwargs):
        super().__init__(allocator, BS, **kwargs)
        self.bits = bits

    def _hash(self, tokens, extra):
        return super()._hash(tokens, extra) & np.uint64((1 << self.bits) - 1)


def WeakTables(allocator, bits, **kwargs):  # noqa: N802 (reads as the class it builds)
    """Block tables whose hashes keep only `bits` bits: the C++ ones (their test-only hash mask) or the twin."""
    if isinstance(allocator, BlockAllocator):
        return BlockTables(allocator, BS, _hash_bits=bits, **kwargs)
    return WeakReferenceTables(allocator, bits, **kwargs)


class KVOracle:
    """What each block's KV was computed from: ``(salt, tokens of the whole prefix up to the block)``."""

    def __init__(self, tables):
        self.tables = tables
        self.content = {}
        self.prompts = {}

    def add(self, seq_id, prompt, salt=None):
        hit = self.tables.add(seq_id, prompt, extra=salt)
        blocks = self.tables.blocks(seq_id)
        for i in range(hit // BS):  # every hit block must hold exactly this prompt's prefix
            assert self.content[int(blocks[i])] == (salt, tuple(prompt[: (i + 1) * BS])), (seq_id, i)
        self.prompts[seq_id] = (salt, list(prompt), hit)
        return hit

    def compute(self, seq_id):
        salt, prompt, hit = self.prompts[seq_id]
        blocks = self.tables.blocks(seq_id)
        for i in range(hit // BS, len(prompt) // BS):  # the forward pass writes the blocks it computes
            self.content[int(blocks[i])] = (salt, tuple(prompt[: (i + 1) * BS]))
        self.tables.mark_computed(seq_id)

    def free(self, seq_id):
        self.tables.free(seq_id)
        del self.prompts[seq_id]


def test_a_real_collision_shares_no_block_and_is_counted(make_allocator):
    alloc = make_allocator(16, BS)
    kv = KVOracle(WeakTables(alloc, bits=0))  # every block hashes to 0
    a, b = [1, 2, 3, 4, 5, 6, 7, 8, 9], [9, 9, 9, 9, 5, 6, 7, 8, 9]
    kv.add("a", a)
    kv.compute("a")  # a's second block collides with its first (both hash 0): only the first is cached
    assert alloc.num_cached_blocks == 1 and alloc.stats()["hash_collisions"] == 1
    assert kv.add("b", b) == 0  # same hash, other tokens: a miss, not a's KV
    assert set(kv.tables.blocks("a")).isdisjoint(kv.tables.blocks("b"))
    assert alloc.stats()["hash_collisions"] == 2
    kv.compute("b")  # caching b's first block collides with a's (held): counted, not cached
    assert alloc.stats()["hash_collisions"] == 3 and alloc.num_cached_blocks == 1
    assert kv.add("a2", a) == 4  # the real prefix still hits, verified
    alloc.check_invariants()


@pytest.mark.parametrize("x_still_held", [True, False])
def test_a_block_cached_after_another_incarnation_of_its_prefix_is_not_served(make_allocator, x_still_held):
    """A caches [C, X]; C is evicted while X stays cached; B = [C', X] where C' collides with C
    (injected hashes: block 0 -> 0, block 1 -> 1 for every prompt), so X's hash after C' equals
    X's hash after C. A prompt [C', X] must not get A's X, whose KV was computed after C:
    comparing a block's own tokens is not enough, its cached prefix must be the very same."""
    alloc = make_allocator(6, BS)
    c, c2, x = [1] * BS, [2] * BS, [3] * BS
    hashes = [0, 1]
    a_ids, hits, _ = alloc.allocate_with_prefix(2, hashes, c + x)
    alloc.cache_blocks_verified(a_ids, hashes, c + x)
    block_x = int(a_ids[1])
    alloc.incref([block_x])  # another holder keeps X alive (and cached) ...
    alloc.free(a_ids)  # ... while A's C joins the free list
    alloc.free(alloc.allocate(alloc.num_free_blocks))  # evicts C (and any other cached free block)
    if not x_still_held:
        alloc.free([block_x])  # X is free and cached: B's X may replace its hash entry
    b_ids, hits, _ = alloc.allocate_with_prefix(2, hashes, c2 + x)
    assert hits == 0
    alloc.cache_blocks_verified(b_ids, hashes, c2 + x)
    q_ids, hits, _ = alloc.allocate_with_prefix(2, hashes, c2 + x)
    assert block_x not in q_ids[:hits].tolist()  # never A's X
    assert q_ids[:hits].tolist() == b_ids[:hits].tolist()
    assert hits == (1 if x_still_held else 2)  # B's own X is cached once A's X is evictable
    assert alloc.stats()["hash_collisions"] == 0  # same tokens after another prefix: a plain miss
    alloc.check_invariants()


def test_salted_tenants_share_nothing_unsalted_share(make_allocator):
    alloc = make_allocator(32, BS)
    kv = KVOracle(BlockTables(alloc, BS) if isinstance(alloc, BlockAllocator) else ReferenceBlockTables(alloc, BS))
    prompt = list(range(13))
    kv.add("t1", prompt, salt="tenant-1")
    kv.compute("t1")
    assert kv.add("t2", prompt, salt="tenant-2") == 0
    assert set(kv.tables.blocks("t1")).isdisjoint(kv.tables.blocks("t2"))
    assert kv.add("t1-again", prompt, salt="tenant-1") == 12
    kv.add("u1", prompt)
    kv.compute("u1")
    assert kv.add("u2", prompt) == 12


def test_raw_match_prefix_stays_hash_only(make_allocator):
    alloc = make_allocator(8, BS)
    ids = alloc.allocate(1)
    alloc.cache_blocks(ids, [42])
    assert alloc.match_prefix([42]).tolist() == ids.tolist()  # trusted: the caller verifies
    # a hash-only entry is never a verified hit
    got, hits, _ = alloc.allocate_with_prefix(1, [42], [0] * BS)
    assert hits == 0 and got.tolist() != ids.tolist()


@pytest.mark.parametrize("bits", [0, 2, 8])
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_prompts_with_a_tiny_hash_space_never_share_other_kv(make_allocator, bits, data):
    alloc = make_allocator(10, BS, hash_key=data.draw(st.integers(0, 2**128 - 1)))
    kv = KVOracle(WeakTables(alloc, bits=bits, max_seqs=8))
    prompt = st.lists(st.integers(0, 2), min_size=1, max_size=14)  # 3 tokens: real prefixes recur
    live, next_id = [], 0
    for _ in range(data.draw(st.integers(1, 25))):
        op = data.draw(st.sampled_from(["add", "add", "free", "compute"]))
        if op == "add":
            try:
                kv.add(next_id, data.draw(prompt), salt=data.draw(st.sampled_from([None, None, "s"])))
            except Exception as err:  # noqa: BLE001 - only running out of blocks is expected
                assert type(err).__name__ == "OutOfBlocksError", err
                continue
            live.append(next_id)
            next_id += 1
        elif op == "free" and live:
            kv.free(live.pop(data.draw(st.integers(0, len(live) - 1))))
        elif op == "compute" and live:
            seq = data.draw(st.sampled_from(live))
            if kv.tables.num_computed(seq) < kv.tables.num_tokens(seq):
                kv.compute(seq)
        alloc.check_invariants()


# ---- keyed hashing ------------------------------------------------------------------------------

def test_the_key_changes_every_hash_and_key_0_is_the_public_hash():
    tokens = np.arange(64, dtype=np.int32)
    public = hash_block_tokens(tokens, 16)
    assert hash_block_tokens(tokens, 16, key=0).tolist() == public.tolist()
    keyed = hash_block_tokens(tokens, 16, key=2**100 + 3)
    assert all(x != y for x, y in zip(public, keyed))
    assert hash_block_tokens(tokens, 16, key=(2**100 + 3).to_bytes(16, "little")).tolist() == keyed.tolist()
    assert hash_block_tokens(tokens, 16, key=1).tolist() != hash_block_tokens(tokens, 16, key=1 << 64).tolist()


@pytest.mark.parametrize("key", [0, 1, 2**64, 2**128 - 1, 0x0123456789ABCDEF_FEDCBA9876543210])
@pytest.mark.parametrize("extra", [None, "tenant", 7, b"\x00"])
def test_keyed_cpp_hash_equals_the_reference(key, extra):
    tokens = np.random.default_rng(1).integers(-5, 150_000, size=50, dtype=np.int32)
    want = reference_hash(tokens, 8, extra=extra, key=key)
    assert hash_block_tokens(tokens, 8, extra=extra, key=key).tolist() == want.tolist()


def test_allocators_draw_random_keys_and_hash_with_theirs(make_allocator):
    a, b = make_allocator(4), make_allocator(4)
    assert a.hash_key != b.hash_key and 0 <= a.hash_key < 2**128
    tokens = np.arange(32, dtype=np.int32)
    assert a.hash_tokens(tokens, "x").tolist() == hash_block_tokens(tokens, 16, extra="x", key=a.hash_key).tolist()
    same = make_allocator(4, hash_key=a.hash_key)  # what every TP rank does with PoolSize.hash_key
    assert same.hash_tokens(tokens).tolist() == a.hash_tokens(tokens).tolist()
    assert same.extra_key("x") == a.extra_key("x") != 0 and a.extra_key(None) == 0


def test_verified_calls_check_their_token_counts(make_allocator):
    alloc = make_allocator(8, BS)
    with pytest.raises(InvalidArgumentError, match="token ids"):
        alloc.allocate_with_prefix(2, [1, 2], [0] * (2 * BS - 1))
    ids = alloc.allocate(1)
    with pytest.raises(InvalidArgumentError, match="token ids"):
        alloc.cache_blocks_verified(ids, [1], [0] * (BS + 1))
    assert alloc.stats()["prefix_queries"] == 0


def test_entry_memory_is_reported_and_tiny_next_to_a_llama_8b_pool():
    from kvpool.plan import plan_memory

    plan = plan_memory("llama-3.1-8b", gpu="h100-sxm", tp=1)
    num_blocks = plan.kv_cache["num_blocks"]
    alloc = BlockAllocator(num_blocks, 16)
    entry_bytes = alloc.stats()["prefix_entry_bytes"]
    assert entry_bytes == num_blocks * (16 * 4 + 24)  # tokens + stamp, parent, salt per block
    assert BlockAllocator(num_blocks, 16, enable_prefix_caching=False).stats()["prefix_entry_bytes"] == 0
    pool_bytes = num_blocks * plan.kv_cache["bytes_per_block_per_gpu"]
    assert entry_bytes / pool_bytes <= 1e-4  # <= 0.01% of the pool it indexes (0.0042% here)
