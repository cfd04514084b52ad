"""One sequence of `ReferenceBlockTables`: its blocks, token counts, known tokens and block hashes.

Plain Python lists, so that the oracle is obviously right: every growth is an amortised O(1)
``list.extend``, every read a slice.
"""
from __future__ import annotations


class ReferenceSeq:
    """The bookkeeping of one live sequence.

    Attributes
    ----------
    blocks : list of int
        Block ids in token order; always ``ceil(num_tokens / block_size)`` of them.
    num_tokens : int
        Tokens in the sequence (prompt plus appended).
    num_computed : int
        Leading tokens whose KV is written (prefix hits plus ``mark_computed``).
    tokens : list of int or None
        The *known* tokens: the prompt's, then those appended with ids. None when the prompt was a
        count or prefix caching is off. Known tokens are all the tokens while
        ``len(tokens) == num_tokens``; an append without ids ends them for good.
    hashes : list of int
        Chained uint64 hash of each full block of `tokens` (``len(tokens) // block_size`` of them).
    num_cached : int
        Leading blocks already offered to the prefix cache.
    shared_tail : bool
        The partial last block may be shared with a fork twin (the next write copies it first).
    extra : bytes, str, int or None
        The salt given to ``add`` (hashes of appended blocks mix it in too).
    context : int
        Keyed digest of `extra`, as the allocator's verified calls take it.
    chain : int
        Verified-cache chain value after the `num_cached` blocks.
    """

    __slots__ = ("blocks", "num_tokens", "num_computed", "tokens", "hashes", "num_cached", "shared_tail",
                 "extra", "context", "chain")

    def __init__(self, blocks, num_tokens: int, num_computed: int = 0, tokens=None, hashes=(), num_cached: int = 0,
                 extra=None, context: int = 0, chain: int = 0):
        self.blocks = [int(b) for b in blocks]
        self.num_tokens = num_tokens
        self.num_computed = num_computed
        self.tokens = None if tokens is None else [int(t) for t in tokens]
        self.hashes = [int(h) for h in hashes]
        self.num_cached = num_cached
        self.shared_tail = False
        self.extra = extra
        self.context = context
        self.chain = chain

    @property
    def knows_all_tokens(self) -> bool:
        """True while every token of the sequence is known (so the next full blocks get hashes)."""
        return self.tokens is not None and len(self.tokens) == self.num_tokens

    def unhashed_tokens(self, block_size: int) -> list:
        """The known tokens after the last hashed block: ``< block_size`` of them."""
        return self.tokens[len(self.hashes) * block_size:]

    def clone(self) -> "ReferenceSeq":
        """An independent copy (a fork twin); `shared_tail` is left for `fork` to set."""
        twin = ReferenceSeq(self.blocks, self.num_tokens, self.num_computed, self.tokens, self.hashes, self.num_cached,
                            self.extra, self.context, self.chain)
        return twin
