"""One sequence of `ReferenceBlockTables`: its blocks per KV-cache group, token counts, known tokens and hashes.

Plain Python lists, so that the oracle is obviously right: every growth is an amortised O(1)
``list.extend``, every read a slice.
"""
from __future__ import annotations

RELEASED = -1  # a position a windowed group gave back (its tokens left the window) or never took


class ReferenceSeq:
    """The bookkeeping of one live sequence.

    Attributes
    ----------
    tables : list of list of int
        One block list per KV-cache group, in token order; each always ``ceil(num_tokens / block_size)``
        long, `RELEASED` (-1) at the positions a windowed group does not hold.
    num_tokens : int
        Tokens in the sequence (prompt plus appended).
    num_computed : int
        Leading tokens whose KV is written (prefix hits plus ``mark_computed``).
    tokens : list of int or None
        The *known* tokens: the prompt's, then those appended with ids. None when the prompt was a
        count or prefix caching is off. Known tokens are all the tokens while
        ``len(tokens) == num_tokens``; an append without ids ends them for good.
    hashes : list of int
        Group 0's chained uint64 hash of each full block of `tokens` (``len(tokens) // block_size``
        of them); other groups' hashes derive from these (`kvpool._reference_groups.group_hash`).
    num_cached : int
        Leading blocks already offered to the prefix cache (every group at once).
    shared_tail : bool
        The partial last block of every group may be shared with a fork twin (the next write copies it).
    extra : bytes, str, int or None
        The salt given to ``add`` (hashes of appended blocks mix it in too).
    context : int
        Keyed digest of `extra`, as the allocator's verified calls take it (group 0's).
    chains : list of int
        Per group, the verified-cache chain value after the `num_cached` blocks (what a windowed group
        anchored on another group's chain keeps there is unused).
    """

    __slots__ = ("tables", "num_tokens", "num_computed", "tokens", "hashes", "num_cached", "shared_tail",
                 "extra", "context", "chains")

    def __init__(self, tables, num_tokens: int, num_computed: int = 0, tokens=None, hashes=(), num_cached: int = 0,
                 extra=None, context: int = 0, chains=(0,)):
        self.tables = [[int(b) for b in blocks] for blocks in tables]
        self.num_tokens = num_tokens
        self.num_computed = num_computed
        self.tokens = None if tokens is None else [int(t) for t in tokens]
        self.hashes = [int(h) for h in hashes]
        self.num_cached = num_cached
        self.shared_tail = False
        self.extra = extra
        self.context = context
        self.chains = [int(c) for c in chains]

    @property
    def blocks(self) -> list:
        """Group 0's block list (the only one of a single-group model)."""
        return self.tables[0]

    @property
    def chain(self) -> int:
        """Group 0's chain value."""
        return self.chains[0]

    def held(self) -> list:
        """The blocks this sequence holds a reference on, position-major (a position's groups together)."""
        return [b for position in zip(*self.tables) for b in position if b != RELEASED]

    @property
    def knows_all_tokens(self) -> bool:
        """True while every token of the sequence is known (so the next full blocks get hashes)."""
        return self.tokens is not None and len(self.tokens) == self.num_tokens

    def unhashed_tokens(self, block_size: int) -> list:
        """The known tokens after the last hashed block: ``< block_size`` of them."""
        return self.tokens[len(self.hashes) * block_size:]

    def clone(self) -> "ReferenceSeq":
        """An independent copy (a fork twin); `shared_tail` is left for `fork` to set."""
        return ReferenceSeq(self.tables, self.num_tokens, self.num_computed, self.tokens, self.hashes, self.num_cached,
                            self.extra, self.context, self.chains)
