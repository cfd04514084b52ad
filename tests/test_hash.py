"""hash_block_tokens: the C++ hash against its Python twin, and the properties prefix caching needs."""
import numpy as np
import pytest

from kvpool import InvalidArgumentError, hash_block_tokens
from kvpool._reference import ROOT_HASH
from kvpool._reference import hash_block_tokens as reference_hash

IMPLS = [hash_block_tokens, reference_hash]


@pytest.fixture(params=IMPLS, ids=["cpp", "reference"])
def hb(request):
    return request.param


def tokens(n, seed=0):
    return np.random.default_rng(seed).integers(0, 150_000, size=n, dtype=np.int32)


def test_pinned_values(hb):
    # The definition is a contract (docs/allocator.md): caches persisted elsewhere depend on it.
    assert hb(np.arange(32, dtype=np.int32), 16).tolist() == [1288304883906479719, 4925302553689299968]
    assert hb(list(range(16)), 16, parent_hash=1, extra="lora-7").tolist() == [11838341381070419426]


@pytest.mark.parametrize("block_size", [1, 3, 16, 64])
@pytest.mark.parametrize("extra", [None, b"", b"salt-0123456789", "lora-\u00e9", 0, 7, -1, 2**70])
def test_cpp_equals_reference(block_size, extra):
    t = tokens(200)
    t[::7] = -t[::7] - 1  # negative ids hash as their 32-bit pattern in both
    for parent in (None, 0, 2**64 - 1):
        want = reference_hash(t, block_size, parent_hash=parent, extra=extra)
        got = hash_block_tokens(t, block_size, parent_hash=parent, extra=extra)
        assert got.dtype == np.uint64 and got.tolist() == want.tolist()


def test_one_hash_per_full_block(hb):
    assert hb(tokens(47), 16).shape == (2,)  # the partial last block gets none
    assert hb(tokens(48), 16).shape == (3,)
    empty = hb(np.empty(0, dtype=np.int32), 16)
    assert empty.shape == (0,) and empty.dtype == np.uint64


def test_prefix_and_chaining(hb):
    t = tokens(160)
    full = hb(t, 16)
    assert hb(t[:64], 16).tolist() == full[:4].tolist()  # a prefix hashes the same
    rest = hb(t[64:], 16, parent_hash=int(full[3]))  # continuing a sequence from its last hash
    assert rest.tolist() == full[4:].tolist()
    assert hb(t, 16, parent_hash=ROOT_HASH).tolist() == full.tolist()


def test_a_token_changes_its_block_and_all_later_ones(hb):
    t = tokens(96)
    changed = t.copy()
    changed[40] += 1  # block 2
    a, b = hb(t, 16), hb(changed, 16)
    assert a[:2].tolist() == b[:2].tolist()
    assert all(x != y for x, y in zip(a[2:], b[2:]))


def test_same_tokens_after_different_prefixes_differ(hb):
    block = tokens(16)
    x = hb(np.concatenate([tokens(16, seed=1), block]), 16)
    y = hb(np.concatenate([tokens(16, seed=2), block]), 16)
    assert x[1] != y[1]


def test_extra_separates_namespaces(hb):
    t = tokens(32)
    variants = [None, b"", b"1", "1", 1, 2, b"\x01", "lora-a", "lora-b"]
    hashes = [tuple(hb(t, 16, extra=e).tolist()) for e in variants]
    assert len(set(hashes)) == len(variants)


def test_no_collisions_among_many_blocks():
    t = np.random.default_rng(3).integers(0, 8, size=16 * 200_000, dtype=np.int32)  # small alphabet
    hashes = hash_block_tokens(t, 16, parent_hash=0)
    assert len(np.unique(hashes)) == len(hashes)
    one_block_each = [hash_block_tokens(t[i:i + 16], 16)[0] for i in range(0, 16 * 2000, 16)]
    assert len(set(one_block_each)) == len({t[i:i + 16].tobytes() for i in range(0, 16 * 2000, 16)})


@pytest.mark.parametrize("kwargs", [
    dict(token_ids=np.zeros((2, 16), dtype=np.int32), block_size=16),
    dict(token_ids=[0.5] * 16, block_size=16),
    dict(token_ids=[2**31] * 16, block_size=16),
    dict(token_ids=list(range(16)), block_size=0),
    dict(token_ids=list(range(16)), block_size=16, parent_hash=-1),
    dict(token_ids=list(range(16)), block_size=16, parent_hash=2**64),
    dict(token_ids=list(range(16)), block_size=16, extra=1.5),
])
def test_bad_input(hb, kwargs):
    with pytest.raises(InvalidArgumentError):
        hb(**kwargs)
