"""Which tokens of which sequences go into the next forward pass.

Every step first gives each running sequence its next tokens: one for each decode (oldest
first), then a chunk for each prompt still being prefilled. Then, with the token budget left, it
admits waiting sequences in arrival order, each with a first prefill chunk (chunked
prefill: a long prompt never stalls everyone's decoding). While anything decodes, the prefill
tokens of a step are bounded further by `StepBudget`, so the step stays near a target time. When a running sequence cannot
get the blocks it needs, the newest running sequence is preempted: its blocks are freed and
it goes back to the head of the queue, to be recomputed from its tokens later.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .block_manager import KVBlockManager
from .sequence import Sequence, SequenceStatus
from .step_budget import StepBudget


@dataclass
class SchedulerOutput:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)  # parallel to seqs
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __bool__(self) -> bool:
        return bool(self.seqs)


@dataclass
class SchedulerCounters:
    num_preemptions: int = 0
    prefix_queried_tokens: int = 0
    prefix_hit_tokens: int = 0


class Scheduler:
    def __init__(
        self,
        block_manager: KVBlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        step_budget: StepBudget | None = None,
    ) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.step_budget = step_budget or StepBudget("off", max_num_batched_tokens)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order: the last one is preempted first
        self.counters = SchedulerCounters()

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        """Take ``seq`` out of the queues and free its blocks (finish, abort, error)."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.counters.num_preemptions += 1

    def _grow_running(
        self,
        todo: list[tuple[Sequence, int]],
        budget: int,
        scheduled: dict[Sequence, int],
        out: SchedulerOutput,
    ) -> int:
        """Give each running sequence of ``todo`` its next tokens within ``budget``, preempting
        the newest running sequence while blocks are short; returns the budget left."""
        bm = self.block_manager
        for seq, left in todo:
            if budget <= 0:
                break
            if seq.status is not SequenceStatus.RUNNING:  # preempted earlier in this step
                continue
            n = min(left, budget)
            while not bm.can_schedule(seq, n):
                victim = self.running.pop()  # the newest
                self._preempt(victim)
                out.preempted.append(victim)
                budget += scheduled.pop(victim, 0)
                if victim is seq:
                    break
            else:
                bm.grow(seq, n)
                scheduled[seq] = n
                budget -= n
        return budget

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        bm = self.block_manager

        # Running sequences first: decodes (oldest first), then prefill chunks still under
        # way, so a long prompt never holds up everyone's next token.
        uncomputed = [(s, s.num_uncomputed_tokens) for s in self.running]
        decodes = [(s, n) for s, n in uncomputed if n == 1]
        chunks = [(s, n) for s, n in uncomputed if n > 1]
        scheduled: dict[Sequence, int] = {}
        budget = self._grow_running(decodes, self.max_num_batched_tokens, scheduled, out)
        if chunks or self.waiting:  # prefill beside the decodes: bounded by the step budget
            # Sequences whose prefill this step could advance: a queue beyond the free
            # slots cannot be admitted now, and must not make every step a full-size one.
            waiting = len(chunks) + min(len(self.waiting), self.max_num_seqs - len(self.running))
            budget = min(budget, self.step_budget.prefill_tokens(sum(scheduled.values()), waiting))
        budget = self._grow_running(chunks, budget, scheduled, out)
        out.seqs.extend(scheduled)
        out.num_new_tokens.extend(scheduled.values())

        # Then waiting sequences, in order, while budget, slots and blocks allow. Nothing is
        # admitted in a step that had to preempt: memory is short.
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not out.preempted:
            seq = self.waiting[0]
            hit = bm.lookup_prefix(seq)
            n = min(seq.num_tokens - hit * bm.block_size, budget)
            if not bm.can_schedule(seq, n, hit):
                break
            self.waiting.popleft()
            bm.admit(seq, hit)
            bm.grow(seq, n)
            if bm.enable_prefix_caching:
                self.counters.prefix_queried_tokens += seq.num_tokens
                self.counters.prefix_hit_tokens += seq.num_computed_tokens
            if not seq.admitted_once:
                seq.num_cached_tokens = seq.num_computed_tokens
                seq.admitted_once = True
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.seqs.append(seq)
            out.num_new_tokens.append(n)
            budget -= n
        return out
