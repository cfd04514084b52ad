"""A CPU stand-in of a server with a host tier: fake KV pages whose content proves where it came from.

Every token's "KV" is a digest of the salt and of every token up to it (KV depends on the whole prefix), so a
block read before its copy landed, a block reused before its offload ran, or another request's block served
after a hash collision shows up as a wrong digest. `DeferredCopier` moves offloaded data only when a test
finishes the copy (as a side stream that has not run yet), and its tickets complete on demand.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from kvpool import BlockAllocator
from kvpool.block_table import BlockTables
from kvpool.tier import HostKVTier

KEY = 0x1234_5678_9ABC_DEF0_0FED_CBA9_8765_4321


def digest(salt, tokens) -> int:
    """The fake KV of the last of `tokens` (after all the others), under `salt`."""
    return hash((salt, tuple(int(t) for t in tokens))) & (2**62 - 1) | 1  # never 0: 0 is "never written"


class Ticket:
    def __init__(self, move=None):
        self._move, self._done = move, False

    def finish(self):
        if not self._done and self._move is not None:
            self._move()
        self._done = True

    def done(self) -> bool:
        return self._done

    def wait(self) -> None:
        self.finish()


class DeferredCopier:
    """Reloads copy at once (the compute stream runs them before the forward) but complete on demand;
    offloads copy only when finished (`finish_offloads`), as a side stream that has not run yet."""

    def __init__(self, gpu_pages: torch.Tensor, host_pages: torch.Tensor):
        self.gpu, self.host = gpu_pages, host_pages
        self.reloads: list[Ticket] = []
        self.offloads: list[Ticket] = []
        self.calls: list = []

    def reload(self, host_ids, gpu_ids):
        h, g = list(map(int, host_ids)), list(map(int, gpu_ids))
        self.calls.append(("reload", h, g))
        self.gpu[g] = self.host[h]
        ticket = Ticket()
        self.reloads.append(ticket)
        return ticket

    def offload(self, gpu_ids, host_ids):
        g, h = list(map(int, gpu_ids)), list(map(int, host_ids))
        self.calls.append(("offload", g, h))

        def move():
            self.host[h] = self.gpu[g]
        ticket = Ticket(move)
        self.offloads.append(ticket)
        return ticket

    def finish_offloads(self):
        for t in self.offloads:
            t.finish()

    def finish_reloads(self):
        for t in self.reloads:
            t.finish()

    def finish_all(self):
        self.finish_reloads()
        self.finish_offloads()


class InstantCopier(DeferredCopier):
    """Every copy runs and completes at once (the CPU BlockCopier's behaviour)."""

    def reload(self, host_ids, gpu_ids):
        t = super().reload(host_ids, gpu_ids)
        t.finish()
        return t

    def offload(self, gpu_ids, host_ids):
        t = super().offload(gpu_ids, host_ids)
        t.finish()
        return t


class TierServer:
    """BlockTables + HostKVTier + fake pages, driven the way a server drives them."""

    def __init__(self, num_blocks, num_host_blocks, block_size=2, copier=DeferredCopier, hash_bits=64, max_seqs=8):
        self.bs = block_size
        self.gpu = torch.zeros(num_blocks, block_size, dtype=torch.int64)
        self.host = torch.zeros(num_host_blocks, block_size, dtype=torch.int64)
        self.copier = copier(self.gpu, self.host)
        self.allocator = BlockAllocator(num_blocks, block_size, True, hash_key=KEY)
        self.tier = HostKVTier(SimpleNamespace(block_size=block_size), num_host_blocks, copier=self.copier)
        self.tables = BlockTables(self.allocator, block_size, max_seqs=max_seqs, host_tier=self.tier,
                                  _hash_bits=hash_bits)
        self.seqs: dict = {}  # id -> (salt, tokens)
        self.computed_prompt_tokens = 0

    def add(self, sid, tokens, salt=None) -> int:
        self.tier.poll()  # a server admits requests after releasing the holds of finished copies
        hit = self.tables.add(sid, np.asarray(tokens, np.int32), extra=salt)
        self.seqs[sid] = (salt, list(tokens))
        return hit

    def run_transfers(self):
        transfers = self.tables.pop_transfers()
        self.tier.run(transfers)
        return transfers

    def forward(self, sids, num_new_tokens=None):
        """One step over `sids`: run the transfers, check every KV the step reads, write the new tokens' KV."""
        transfers = self.run_transfers()
        batch = self.tables.batch(sids, num_new_tokens)
        for i, sid in enumerate(sids):
            salt, tokens = self.seqs[sid]
            computed = self.tables.num_computed(sid)
            self.check(sid, computed)
            new = int(batch.seq_lens_host[i]) - computed
            self.computed_prompt_tokens += new
            blocks = self.tables.blocks(sid)
            for pos in range(computed, computed + new):
                self.gpu[blocks[pos // self.bs], pos % self.bs] = digest(salt, tokens[: pos + 1])
        self.tables.mark_computed(batch)
        return transfers

    def check(self, sid, upto=None):
        """Every computed token of `sid` (or its first `upto`) holds its own KV."""
        salt, tokens = self.seqs[sid]
        upto = self.tables.num_computed(sid) if upto is None else upto
        blocks = self.tables.blocks(sid)
        for pos in range(upto):
            got = int(self.gpu[blocks[pos // self.bs], pos % self.bs])
            assert got == digest(salt, tokens[: pos + 1]), (sid, pos, blocks[pos // self.bs])

    def free(self, sid):
        self.tables.free(sid)
        del self.seqs[sid]

    def serve(self, sid, tokens, salt=None) -> int:
        """add + one prefill step + free; returns the prompt tokens found cached."""
        hit = self.add(sid, tokens, salt)
        self.forward([sid])
        self.free(sid)
        return hit

    def refcounts(self):
        a = self.allocator
        return a.refcounts(np.arange(a.num_blocks, dtype=np.int32))

    def host_refcounts(self):
        h = self.tier.allocator
        return h.refcounts(np.arange(h.num_blocks, dtype=np.int32))
