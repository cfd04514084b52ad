"""Continuous batching over a paged KV pool.

Every step the scheduler

1. admits the requests that have arrived (refusing bad ones with a clear error, for that request only),
2. gives every running sequence the slot its next decode token needs; when the pool is out of
   blocks it *preempts* the most recently admitted running sequence (frees its blocks; it is
   recomputed later from its prompt plus the tokens generated so far), so the oldest request
   always makes progress,
3. admits waiting sequences as prefills while blocks and the step's token budget last; a prompt
   whose leading blocks are in the prefix cache only computes the rest,

and returns a :class:`StepPlan` mixing prefills and decodes. After the model ran, :meth:`Scheduler.finish_step`
appends the sampled tokens and frees the blocks of finished requests at once (their full prompt
blocks stay in the prefix cache, evictable, for later requests with the same prefix).

The scheduler is deterministic (no wall clock, no randomness): under tensor parallelism every rank
runs its own copy on the same requests and sampled tokens and so makes the same block decisions
(the engine checks that the block tables agree on every step).
"""
from __future__ import annotations

import numbers
from collections import deque
from dataclasses import dataclass, field

from ..errors import InvalidArgumentError, OutOfBlocksError
from .requests import Request, RequestResult


@dataclass
class Sequence:
    """A request in flight: ``tokens`` = prompt + generated; the first ``num_computed`` have KV in the pool."""

    request: Request
    tokens: list[int]
    result: RequestResult
    num_computed: int = 0

    @property
    def seq_id(self) -> int:
        return self.request.req_id


@dataclass
class ScheduledSeq:
    """One sequence's share of a step: feed ``token_ids`` at positions ``start_pos ...``."""

    seq_id: int
    token_ids: list[int]
    start_pos: int
    is_prefill: bool


@dataclass
class StepPlan:
    """The batch of one engine step (prefills first, then decodes)."""

    step: int
    entries: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[int] = field(default_factory=list)
    # decodes only, their tokens not yet appended: the engine runs BlockTables.decode_step (one call)
    decode_step: bool = False

    @property
    def num_tokens(self) -> int:
        return sum(len(e.token_ids) for e in self.entries)


class Scheduler:
    """Continuous-batching scheduler.

    Parameters
    ----------
    tables : kvpool.block_table.BlockTables
        The block lists of the live sequences (and, through ``tables.allocator``, the pool): the
        scheduler allocates with ``add``/``append`` and frees with ``free``; the engine calls
        ``mark_computed`` after each forward, which publishes full prompt blocks to the prefix cache.
    vocab_size : int
        Token ids must lie in ``[0, vocab_size)``.
    max_model_len : int
        Longest sequence (prompt + new tokens) the model's positions allow.
    max_batch_tokens : int
        Token budget of one step (prefill tokens + one per decode).
    max_running : int
        Most sequences in flight at once.
    """

    def __init__(self, tables, vocab_size: int, max_model_len: int, max_batch_tokens: int = 256,
                 max_running: int = 16, metrics=None):
        self.tables = tables
        self.block_size = int(tables.block_size)
        self.num_blocks = int(tables.allocator.num_blocks)
        self.num_groups = int(tables.num_groups)  # KV-cache groups: a new block is one per group
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.max_batch_tokens = max_batch_tokens
        self.max_running = max_running
        self.metrics = metrics
        self.pending: list[Request] = []  # not arrived yet, sorted by arrival step
        self.waiting: deque[Sequence] = deque()  # arrived (or preempted), no blocks
        self.running: list[Sequence] = []  # holding blocks, oldest admission first
        self.results: dict[int, RequestResult] = {}
        self.num_preemptions = 0
        self.prompt_tokens_seen = 0
        self.prompt_tokens_cached = 0

    # ----------------------------------------------------------------- requests
    def submit(self, request: Request) -> None:
        """Queue ``request`` until its arrival step."""
        if request.req_id in self.results:
            raise InvalidArgumentError(f"request id {request.req_id} was submitted twice; give each request its own id")
        self.results[request.req_id] = RequestResult(request.req_id, len(request.prompt) if _is_list(request.prompt) else 0)
        self.pending.append(request)
        self.pending.sort(key=lambda r: r.arrival_step)

    def validate(self, request: Request) -> None:
        """Raise a clear error if ``request`` can never run; nothing is allocated either way."""
        prompt = request.prompt
        if not _is_list(prompt):
            raise InvalidArgumentError(
                f"request {request.req_id}: the prompt is a {type(prompt).__name__}; send a list of token ids")
        if len(prompt) == 0:
            raise InvalidArgumentError(
                f"request {request.req_id}: the prompt is empty; send at least one token id")
        bad = [t for t in prompt
               if not isinstance(t, numbers.Integral) or isinstance(t, bool) or not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidArgumentError(
                f"request {request.req_id}: token id {bad[0]!r} is outside the vocabulary [0, {self.vocab_size}); "
                f"tokenize with this model's tokenizer")
        if not isinstance(request.max_new_tokens, int) or request.max_new_tokens < 1:
            raise InvalidArgumentError(
                f"request {request.req_id}: max_new_tokens={request.max_new_tokens!r}; ask for at least 1 token")
        total = len(prompt) + request.max_new_tokens
        if total > self.max_model_len:
            raise InvalidArgumentError(
                f"request {request.req_id}: prompt ({len(prompt)}) + max_new_tokens ({request.max_new_tokens}) = "
                f"{total} tokens exceeds the model's {self.max_model_len} positions; shorten it")
        # the KV of the last generated token is never written, so total - 1 tokens must fit; a prefill
        # (a recompute after preemption: up to total - 1 tokens) holds all its blocks in every group
        # until mark_computed frees what left a window
        per_group = -(-(total - 1) // self.block_size)
        blocks = self.num_groups * per_group
        if blocks > self.num_blocks:
            need = f"{blocks}" if self.num_groups == 1 else f"{blocks} ({self.num_groups} KV-cache groups x {per_group})"
            raise OutOfBlocksError(
                f"request {request.req_id}: {total} tokens need {need} KV blocks but the whole pool holds "
                f"{self.num_blocks} (block_size {self.block_size}); it can never run: shorten the "
                f"prompt or max_new_tokens, or start with a larger pool", requested=blocks,
                available=self.num_blocks)

    @property
    def done(self) -> bool:
        return not (self.pending or self.waiting or self.running)

    def next_arrival(self) -> int | None:
        return self.pending[0].arrival_step if self.pending else None

    # ----------------------------------------------------------------- one step
    def schedule(self, step: int) -> StepPlan:
        """Decide the batch of ``step`` (may be empty when nothing has arrived yet)."""
        plan = StepPlan(step)
        self._admit_arrivals(step)

        # decodes first: each running sequence needs room for one more token's KV
        budget = self.max_batch_tokens
        self._make_room(plan)
        if self.running and not self.waiting:
            plan.decode_step = True  # nothing to admit: the engine appends and builds in one call
        elif self.running:  # prefills may join: append the decodes' tokens now, in one call
            self.tables.append_batch([s.seq_id for s in self.running], 1, [s.tokens[-1] for s in self.running])
        for seq in self.running:
            plan.entries.append(ScheduledSeq(seq.seq_id, seq.tokens[-1:], len(seq.tokens) - 1, False))
            budget -= 1

        # then prefills, unless this step already had to preempt (the pool is tight)
        prefills = []
        while self.waiting and not plan.preempted and len(self.running) + len(prefills) < self.max_running:
            seq = self.waiting[0]
            if len(seq.tokens) > budget and (plan.entries or prefills):
                break
            try:
                cached = self.tables.add(seq.seq_id, seq.tokens, extra=seq.request.cache_salt)
            except OutOfBlocksError:
                break
            self.waiting.popleft()
            self._count_prefix(seq, cached)
            seq.num_computed = cached
            if seq.result.first_step is None:
                seq.result.first_step = step
            prefills.append(seq)
            budget -= len(seq.tokens) - cached
            plan.entries.insert(len(prefills) - 1,
                                ScheduledSeq(seq.seq_id, seq.tokens[cached:], cached, True))
        self.running.extend(prefills)
        return plan

    def finish_step(self, plan: StepPlan, next_tokens: list[int]) -> list[int]:
        """Record the sampled ``next_tokens`` (one per plan entry); return the ids of finished requests."""
        if len(next_tokens) != len(plan.entries):
            raise InvalidArgumentError(
                f"step {plan.step}: got {len(next_tokens)} sampled tokens for {len(plan.entries)} sequences")
        by_id = {seq.seq_id: seq for seq in self.running}
        finished = []
        for entry, token in zip(plan.entries, next_tokens):
            seq = by_id[entry.seq_id]
            seq.num_computed = len(seq.tokens)
            seq.tokens.append(int(token))
            seq.result.output.append(int(token))
            if len(seq.result.output) == seq.request.max_new_tokens:
                self.tables.free(seq.seq_id)
                seq.result.finish_step = plan.step
                finished.append(seq.seq_id)
                if self.metrics is not None:
                    self.metrics.finished.inc()
        if finished:
            self.running = [s for s in self.running if s.seq_id not in finished]
        return finished

    # ----------------------------------------------------------------- helpers
    def _admit_arrivals(self, step: int) -> None:
        while self.pending and self.pending[0].arrival_step <= step:
            request = self.pending.pop(0)
            result = self.results[request.req_id]
            try:
                self.validate(request)
            except (InvalidArgumentError, OutOfBlocksError) as err:
                result.error = str(err)
                if self.metrics is not None:
                    self.metrics.rejected.inc()
                continue
            self.waiting.append(Sequence(request, [int(t) for t in request.prompt], result))

    def _make_room(self, plan: StepPlan) -> None:
        """Preempt the newest running sequences until every other one's next token has a block."""
        bs, free = self.tables.block_size, self.tables.allocator.num_free_blocks
        while self.running:
            for seq in self.running:  # the token sampled last step is the one not yet in the tables
                assert len(seq.tokens) == self.tables.num_tokens(seq.seq_id) + 1, "one token per step"
            need = self.num_groups * sum(self.tables.num_tokens(s.seq_id) % bs == 0 for s in self.running)
            if need <= free:
                return
            victim = self.running[-1]
            self._preempt(victim)
            plan.preempted.append(victim.seq_id)
            free = self.tables.allocator.num_free_blocks

    def _preempt(self, seq: Sequence) -> None:
        """Free ``seq``'s blocks and queue it first in line; it recomputes prompt + generated tokens."""
        self.tables.free(seq.seq_id)
        self.running.remove(seq)
        seq.num_computed = 0
        seq.result.num_preemptions += 1
        self.num_preemptions += 1
        if self.metrics is not None:
            self.metrics.preemptions.inc()
        self.waiting.appendleft(seq)

    def _count_prefix(self, seq: Sequence, cached: int) -> None:
        if seq.result.num_preemptions == 0:  # count each prompt once, on its first admission
            self.prompt_tokens_seen += len(seq.tokens)
            self.prompt_tokens_cached += cached
            seq.result.num_cached_prompt_tokens = cached


def _is_list(x) -> bool:
    return isinstance(x, (list, tuple))
