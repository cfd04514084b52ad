"""The pure-Python twin of the allocator's elastic-pool calls (csrc/allocator_elastic.cpp): grow,
shrink, and the relocation of held top blocks. Mixed into ReferenceBlockAllocator."""
import numpy as np

from ._arrays import as_int
from .errors import InvalidArgumentError, OutOfBlocksError


class ElasticMixin:
    """``grow`` / ``shrink`` / ``held_in_top`` / ``free_top_blocks`` / ``relocate_top`` on the twin's containers."""

    def _top(self, n, fn):
        n = as_int(n, "n")
        if not 0 <= n <= self.num_blocks:
            raise InvalidArgumentError(f"{fn}: n={n} must be in [0, num_blocks={self.num_blocks}]")
        return n

    def grow(self, n):
        n = as_int(n, "n")
        if not 0 <= n <= self.max_num_blocks - self.num_blocks:
            raise InvalidArgumentError(f"grow(): n={n} must be in [0, {self.max_num_blocks - self.num_blocks}]")
        for b in range(self.num_blocks, self.num_blocks + n):
            self._free[b] = None  # the tail: every lower free id goes out first
        self.num_blocks += n

    def held_in_top(self, n):
        n = self._top(n, "held_in_top()")
        return sum(rc > 0 for rc in self._refcount[self.num_blocks - n:self.num_blocks])

    @property
    def free_top_blocks(self):
        b = self.num_blocks
        while b > 0 and self._refcount[b - 1] == 0:
            b -= 1
        return self.num_blocks - b

    def shrink(self, n):
        n = self._top(n, "shrink()")
        held = self.held_in_top(n)
        if held:
            low = self.num_blocks - n
            raise OutOfBlocksError(f"shrink(): {held} of the top {n} blocks [{low}, {self.num_blocks}) are held; "
                                   f"relocate them first or shrink by at most {self.free_top_blocks} now",
                                   requested=n, available=self.free_top_blocks)
        for b in range(self.num_blocks - n, self.num_blocks):
            del self._free[b]
            if b in self._hash_of:
                self._forget(b)
                self._stats["evictions"] += 1
        self.num_blocks -= n

    def relocate_top(self, n):
        n = self._top(n, "relocate_top()")
        low = self.num_blocks - n
        src = [b for b in range(low, self.num_blocks) if self._refcount[b]]
        below = [b for b in self._free if b < low]  # least recently freed first
        if len(below) < len(src):
            raise OutOfBlocksError(f"relocate_top(): {len(src)} held blocks in the top {n} ids need free ids below "
                                   f"{low} but only {len(below)} are free there, so {len(below)} could move",
                                   requested=len(src), available=len(below))
        dst = below[:len(src)]
        for s, d in zip(src, dst):
            del self._free[d]
            if d in self._hash_of:
                self._forget(d)
                self._stats["evictions"] += 1
            self._refcount[d], self._refcount[s] = self._refcount[s], 0
            if s in self._hash_of:  # the cached content moves with the KV: same hash, same stamp
                h = self._hash_of.pop(s)
                self._hash_of[d] = h
                self._block_of[h] = d
                if s in self._entry:
                    self._entry[d] = self._entry.pop(s)
            self._free[s] = None
        return np.array(src, dtype=np.int64), np.array(dst, dtype=np.int64)
