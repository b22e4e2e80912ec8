"""Block manager and scheduler, without a model: block accounting, sliding-window freeing,
prefix-cache hits (and their sliding-pool condition), LRU eviction, preemption."""

from __future__ import annotations

import pytest

from engine.block_manager import NO_BLOCK, BlockPool, KVBlockManager
from engine.scheduler import Scheduler
from engine.sequence import Sequence, SequenceStatus
from engine.types import RequestMetrics, SamplingParams


def make_seq(rid: str, tokens: list[int]) -> Sequence:
    return Sequence(
        request_id=rid, prompt_ids=list(tokens), params=SamplingParams(), metrics=RequestMetrics(0.0)
    )


def run_step(bm: KVBlockManager, seq: Sequence, n: int) -> None:
    """What the engine does around a forward pass, minus the forward pass."""
    assert bm.can_schedule(seq, n)
    bm.grow(seq, n)
    seq.num_computed_tokens += n
    bm.on_computed(seq)


def test_pool_refcounts_and_lru_eviction() -> None:
    pool = BlockPool(3)
    a, b, c = pool.allocate(), pool.allocate(), pool.allocate()
    assert pool.num_free == 0
    pool.register(a, b"ka")
    pool.register(b, b"kb")
    pool.acquire(a)  # shared by two sequences
    pool.release(a)
    assert pool.num_free == 0
    pool.release(b)  # freed first: evicted first
    pool.release(a)
    pool.release(c)  # never hashed: handed out before any cached block
    assert pool.num_free == 3
    assert pool.allocate() == c
    assert pool.allocate() == b and pool.lookup(b"kb") is None  # LRU victim lost its key
    assert pool.lookup(b"ka") == a
    with pytest.raises(RuntimeError):
        pool.release(c)
        pool.release(c)


def test_sliding_blocks_freed_behind_window() -> None:
    bs, window = 4, 8
    bm = KVBlockManager(bs, 64, 64, window, enable_prefix_caching=False)
    seq = make_seq("a", list(range(40)))
    run_step(bm, seq, 13)  # prefill chunk: positions 0..12
    # Next step starts at 13 and needs keys from 13 - 8 + 1 = 6: blocks 1.. stay, block 0 goes.
    assert seq.sliding_blocks[0] == NO_BLOCK and all(b != NO_BLOCK for b in seq.sliding_blocks[1:])
    assert len(seq.full_blocks) == 4
    for _ in range(27):
        run_step(bm, seq, 1)
    # context 40: window needs positions 33.. -> blocks 8, 9 (the one being written) only.
    held = [i for i, b in enumerate(seq.sliding_blocks) if b != NO_BLOCK]
    assert held == [8, 9]
    assert bm.sliding.num_used == 2 and bm.full.num_used == 10
    bm.free(seq)
    assert bm.all_free()


def test_prefix_hit_needs_sliding_blocks_of_the_last_window() -> None:
    bs, window = 4, 8
    bm = KVBlockManager(bs, 64, 64, window, enable_prefix_caching=True)
    prompt = list(range(100, 124))  # 6 full blocks
    first = make_seq("a", prompt)
    run_step(bm, first, 24)
    bm.free(first)
    assert bm.all_free()
    second = make_seq("b", [*prompt[:20], 1, 2, 3, 4, 5])  # shares 5 blocks
    hit = bm.lookup_prefix(second)
    assert hit == 5
    assert bm.can_schedule(second, 5, hit)
    bm.admit(second, hit)
    assert second.num_computed_tokens == 20
    # Sliding layers at position 20 see keys 13..: blocks 3, 4 held, 0..2 not.
    assert second.sliding_blocks[:3] == [NO_BLOCK] * 3 and NO_BLOCK not in second.sliding_blocks[3:5]
    bm.grow(second, 5)
    second.num_computed_tokens += 5
    bm.on_computed(second)
    bm.free(second)
    assert bm.all_free()


def test_prefix_hit_shortened_when_sliding_tail_was_evicted() -> None:
    bs, window = 4, 8
    bm = KVBlockManager(bs, 64, 6, window, enable_prefix_caching=True)
    prompt = list(range(100, 124))
    first = make_seq("a", prompt)
    for _ in range(6):  # 4 tokens a step, so the sliding pool (6 blocks) suffices
        run_step(bm, first, 4)
    bm.free(first)
    # Churn the sliding pool with an unrelated sequence: the cached sliding blocks get evicted
    # (the full-pool blocks stay cached: that pool is large).
    other = make_seq("x", list(range(500, 540)))
    for _ in range(10):
        run_step(bm, other, 4)
    bm.free(other)
    second = make_seq("b", [*prompt, 9])
    hit = bm.lookup_prefix(second)
    keys = second.block_hashes
    assert all(bm.full.lookup(k) is not None for k in keys[:6])
    # Every accepted hit has its last window in the sliding pool.
    for i in range(bm.sliding_start(hit * bs), hit):
        assert bm.sliding.lookup(keys[i]) is not None
    assert hit < 6


def test_scheduler_chunked_prefill_budget_and_fcfs() -> None:
    bm = KVBlockManager(4, 256, 256, 8, enable_prefix_caching=False)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=16)
    a, b, c = make_seq("a", list(range(30))), make_seq("b", list(range(5))), make_seq("c", list(range(3)))
    for s in (a, b, c):
        sched.add(s)
    out = sched.schedule()
    assert out.seqs == [a] and out.num_new_tokens == [16]  # a's first chunk fills the budget
    a.num_computed_tokens += 16
    bm.on_computed(a)
    out = sched.schedule()
    assert out.seqs == [a, b] and out.num_new_tokens == [14, 2]
    assert c.status is SequenceStatus.WAITING


def test_scheduler_preempts_newest_and_readmits_first() -> None:
    bm = KVBlockManager(4, 6, 64, 8, enable_prefix_caching=False)  # 6 full blocks = 24 tokens
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    a, b = make_seq("a", list(range(11))), make_seq("b", list(range(11)))
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    assert out.seqs == [a, b]
    for s in (a, b):
        s.num_computed_tokens += 11
        bm.on_computed(s)
        s.token_ids.append(7)  # sampled
    for _ in range(1):
        out = sched.schedule()  # 12 tokens each fit in 3 blocks
        assert not out.preempted
        for s in out.seqs:
            s.num_computed_tokens += 1
            bm.on_computed(s)
            s.token_ids.append(7)
    out = sched.schedule()  # a needs a 4th block: b (newest) is preempted
    assert out.seqs == [a] and out.preempted == [b]
    assert b.status is SequenceStatus.WAITING and not b.full_blocks and sched.waiting[0] is b
    sched.remove(a)
    sched.remove(b)
    assert bm.all_free()


def test_decodes_are_scheduled_before_a_long_prefill() -> None:
    bm = KVBlockManager(4, 256, 256, 8, enable_prefix_caching=False)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=16)
    a = make_seq("a", list(range(100)))  # older, long prompt
    b = make_seq("b", list(range(3)))
    sched.add(a)
    sched.add(b)
    out = sched.schedule()  # a's first chunk takes the whole budget
    assert out.seqs == [a]
    a.num_computed_tokens += 16
    bm.on_computed(a)
    out = sched.schedule()  # FCFS: b waits while the older prompt's chunks fill the budget
    assert out.seqs == [a] and out.num_new_tokens == [16]
    a.num_computed_tokens += 16
    bm.on_computed(a)
    # Now let b be running and decoding (as if admitted earlier) beside a's prefill.
    sched.waiting.remove(b)
    bm.grow(b, 3)
    b.num_computed_tokens = 3
    bm.on_computed(b)
    b.token_ids.append(5)
    b.status = SequenceStatus.RUNNING
    sched.running.append(b)
    out = sched.schedule()  # b decodes first although a is older; a gets the rest
    assert out.seqs == [b, a] and out.num_new_tokens == [1, 15]
    for s, n in zip(out.seqs, out.num_new_tokens, strict=True):
        s.num_computed_tokens += n
        bm.on_computed(s)
    b.token_ids.append(6)
    out = sched.schedule()
    assert out.seqs[0] is b and out.num_new_tokens == [1, 15]


def check_invariants(bm: KVBlockManager, seqs: list[Sequence]) -> None:
    """Reference counts equal table references; free lists, LRU and hash maps agree."""
    for pool, tables in (
        (bm.full, [s.full_blocks for s in seqs]),
        (bm.sliding, [s.sliding_blocks for s in seqs]),
    ):
        refs = [0] * pool.num_blocks
        for table in tables:
            for b in table:
                if b != NO_BLOCK:
                    refs[b] += 1
        assert refs == pool.ref_counts
        free = set(pool.free_uncached) | set(pool.evictable)
        assert len(free) == pool.num_free == sum(r == 0 for r in refs)
        assert all(refs[b] == 0 for b in free)
        assert all(pool.block_hash[b] is not None for b in pool.evictable)
        assert all(pool.block_hash[b] is None for b in pool.free_uncached)
        assert all(pool.block_hash[b] == k for k, b in pool.by_hash.items())
    for s in seqs:
        c = s.num_computed_tokens
        assert len(s.full_blocks) * bm.block_size >= c
        if bm.window is not None:
            start = bm.sliding_start(c)
            assert all(b != NO_BLOCK for b in s.sliding_blocks[start : -(-c // bm.block_size)])


@pytest.mark.parametrize("seed", range(10))
def test_random_schedules_keep_block_accounting_exact(seed: int) -> None:
    """Scheduler + block manager driven like the engine (minus the model) with shared
    prefixes, tight pools, chunking, preemption and aborts."""
    import random

    rng = random.Random(seed)
    bm = KVBlockManager(4, rng.randint(12, 18), rng.randint(9, 14), 8, enable_prefix_caching=seed % 3 != 0)
    sched = Scheduler(bm, max_num_seqs=rng.randint(3, 6), max_num_batched_tokens=rng.randint(4, 20))
    prefix = [rng.randrange(1000) for _ in range(30)]
    live: dict[str, tuple[Sequence, int]] = {}
    for i in range(12):
        ids = prefix[: rng.randint(0, 30)] + [rng.randrange(1000) for _ in range(rng.randint(1, 10))]
        seq = make_seq(f"s{i}", ids[:40])
        live[seq.request_id] = (seq, rng.randint(4, 16))
        sched.add(seq)
    steps = 0
    while sched.has_unfinished():
        steps += 1
        assert steps < 5000
        out = sched.schedule()
        assert out.seqs or out.preempted
        for seq, n in zip(out.seqs, out.num_new_tokens, strict=True):
            seq.num_computed_tokens += n
            bm.on_computed(seq)
            if seq.num_computed_tokens == seq.num_tokens:
                seq.token_ids.append(rng.randrange(1000))
                if seq.num_output_tokens >= live[seq.request_id][1] or seq.num_tokens >= 4 * 12:
                    sched.remove(seq)
        if rng.random() < 0.05:
            victims = [s for s in sched.running + list(sched.waiting)]
            if victims:
                sched.remove(rng.choice(victims))
        check_invariants(bm, sched.running + list(sched.waiting))
    assert bm.all_free()
