"""The paged KV cache path equals full recomputation without a cache.

Logits at position p depend only on tokens 0..p, so one cache-free forward over a whole
sequence gives the reference for every step. The cached runs cross the sliding window,
use shuffled physical blocks, release out-of-window sliding blocks (-1 in the table) and
mix prefill chunks with batched decode tokens in the same step.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from model.batch import BatchMetadata
from model.checkpoint import make_checkpoint
from model.config import ModelConfig
from model.generate import greedy_generate
from model.kv_cache import KVCache
from model.loader import load_model

VOCAB = 1024
WINDOW = 16
BLOCK = 4


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    ckpt = make_checkpoint(
        tmp_path_factory.mktemp("cache_ckpt"), preset="tiny", seed=11, vocab_size=VOCAB, pad_token_id=0,
        eos_token_id=1, num_layers=3, num_experts=5, experts_per_token=2, sliding_window=WINDOW,
    )  # fmt: skip
    return load_model(ckpt, dtype=torch.float32)


def full_logits(model, tokens: list[int]) -> torch.Tensor:
    n = len(tokens)
    meta = BatchMetadata(
        positions=torch.arange(n), query_start=torch.tensor([0, n]), context_lens=torch.tensor([0]),
        full_block_table=None, sliding_block_table=None, logits_indices=torch.arange(n),
    )  # fmt: skip
    return model(torch.tensor(tokens), meta, None)


def assert_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    rel = ((ours - ref).abs().amax(-1) / ref.abs().amax(-1)).max().item()
    assert rel < 1e-5, rel


def test_greedy_decode_equals_recompute_every_step(small_model):
    prompt = [random.Random(0).randrange(VOCAB) for _ in range(10)]
    steps: list[torch.Tensor] = []
    tokens, prefill = greedy_generate(
        small_model, prompt, 40, block_size=BLOCK, on_step=lambda i, logits: steps.append(logits.clone())
    )
    assert len(tokens) == 40 and len(prompt) + 40 > 3 * WINDOW
    ref = full_logits(small_model, prompt + tokens)
    assert prefill is not None
    assert_close(prefill, ref[: len(prompt)])
    # step i's distribution is the one at position len(prompt) - 1 + i
    assert_close(torch.stack(steps), ref[len(prompt) - 1 : len(prompt) - 1 + 40])
    assert tokens == ref[len(prompt) - 1 : -1].argmax(-1).tolist()


class PagedPools:
    """A minimal block manager over both pools, with shuffled physical ids."""

    def __init__(self, num_full: int, num_sliding: int, seed: int) -> None:
        rng = random.Random(seed)
        self.free_full = list(range(num_full))
        self.free_sliding = list(range(num_sliding))
        rng.shuffle(self.free_full)
        rng.shuffle(self.free_sliding)
        self.full: dict[int, list[int]] = {}
        self.sliding: dict[int, list[int]] = {}

    def prepare(self, seq: int, context_len: int, total: int) -> None:
        full, sliding = self.full.setdefault(seq, []), self.sliding.setdefault(seq, [])
        first_needed = max(0, context_len - WINDOW + 1)
        for i in range(first_needed // BLOCK):  # fully out of the window: give back
            if sliding[i] >= 0:
                self.free_sliding.append(sliding[i])
                sliding[i] = -1
        while len(full) < math.ceil(total / BLOCK):
            full.append(self.free_full.pop())
        while len(sliding) < math.ceil(total / BLOCK):
            sliding.append(self.free_sliding.pop())

    def table(self, which: dict[int, list[int]], seqs: list[int]) -> torch.Tensor:
        width = max(len(which[s]) for s in seqs)
        return torch.tensor([which[s] + [-1] * (width - len(which[s])) for s in seqs], dtype=torch.int32)


@pytest.mark.parametrize("decode_group_keys", [None, 20])
def test_mixed_batches_of_chunks_and_decodes(small_model, monkeypatch, decode_group_keys):
    if decode_group_keys is not None:  # split batched decodes into several gather groups
        import model.paged_attention as paged

        monkeypatch.setattr(paged, "DECODE_KEYS_PER_GROUP", decode_group_keys)
    rng = random.Random(1)
    lengths = {0: 45, 1: 30, 2: 8, 3: 60}
    seqs = {s: [rng.randrange(VOCAB) for _ in range(n)] for s, n in lengths.items()}
    refs = {s: full_logits(small_model, toks) for s, toks in seqs.items()}
    # Sliding pool just big enough for each sequence's window plus one chunk: it only works
    # if out-of-window blocks really are released and reused.
    cache = KVCache(small_model.config, BLOCK, num_full_blocks=60, num_sliding_blocks=40, dtype=torch.float32)
    pools = PagedPools(60, 40, seed=2)
    done = dict.fromkeys(seqs, 0)
    # Each step: (sequence, new tokens); prefill chunks and single decode tokens mixed.
    schedule = [
        [(0, 12), (1, 7)],
        [(0, 9), (1, 1), (2, 8)],
        [(3, 20), (2, 0), (1, 1), (0, 1)],
        [(3, 17), (0, 1), (1, 1)],
    ]
    while any(done[s] < len(seqs[s]) for s in seqs):
        step = [(s, 1) for s in seqs if done[s] < len(seqs[s])]
        if len(schedule) > 0:
            step = schedule.pop(0)
        step = [(s, n) for s, n in step if n > 0]
        order = [s for s, _ in step]
        for s, n in step:
            pools.prepare(s, done[s], done[s] + n)
        ids = torch.tensor([t for s, n in step for t in seqs[s][done[s] : done[s] + n]])
        query_lens = [n for _, n in step]
        starts = [0]
        for n in query_lens:
            starts.append(starts[-1] + n)
        meta = BatchMetadata(
            positions=torch.tensor([p for s, n in step for p in range(done[s], done[s] + n)]),
            query_start=torch.tensor(starts),
            context_lens=torch.tensor([done[s] for s in order]),
            full_block_table=pools.table(pools.full, order),
            sliding_block_table=pools.table(pools.sliding, order),
            logits_indices=torch.arange(starts[-1]),
            query_lens_cpu=query_lens,
            context_lens_cpu=[done[s] for s in order],
        )
        logits = small_model(ids, meta, cache)
        expected = torch.cat([refs[s][done[s] : done[s] + n] for s, n in step])
        assert_close(logits, expected)
        for s, n in step:
            done[s] += n
    assert any(b == -1 for b in pools.sliding[3])  # the window really released blocks


def test_logits_indices_select_rows(small_model):
    toks = list(range(20))
    n = len(toks)
    meta = BatchMetadata(
        positions=torch.arange(n), query_start=torch.tensor([0, n]), context_lens=torch.tensor([0]),
        full_block_table=None, sliding_block_table=None, logits_indices=torch.tensor([19, 3]),
    )  # fmt: skip
    out = small_model(torch.tensor(toks), meta, None)
    ref = full_logits(small_model, toks)
    assert out.shape == (2, VOCAB) and out.dtype == torch.float32
    assert torch.allclose(out, ref[[19, 3]], rtol=0, atol=1e-5)


def test_no_cache_requires_pure_prefill(small_model):
    meta = BatchMetadata(
        positions=torch.tensor([5]), query_start=torch.tensor([0, 1]), context_lens=torch.tensor([5]),
        full_block_table=None, sliding_block_table=None, logits_indices=torch.tensor([0]),
    )  # fmt: skip
    with pytest.raises(ValueError, match="pure prefill"):
        small_model(torch.tensor([1]), meta, None)


def test_kv_cache_shapes_and_block_bytes():
    config = ModelConfig(num_layers=5, num_kv_heads=8, head_dim=64)
    cache = KVCache(config, block_size=16, num_full_blocks=7, num_sliding_blocks=3, dtype=torch.bfloat16)
    assert cache.k[0].shape == (8, 3, 16, 64) and cache.v[1].shape == (8, 7, 16, 64)  # layer 0 sliding
    full, sliding = KVCache.bytes_per_block(config, 16, torch.bfloat16)
    # 2048 bytes per token per layer (spec §6); 2 full layers (1, 3), 3 sliding (0, 2, 4)
    assert (full, sliding) == (2048 * 16 * 2, 2048 * 16 * 3)
    assert cache.nbytes() == 7 * full + 3 * sliding


def resident_anon_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))


def test_the_cpu_kv_cache_is_zeros_resident_only_where_written():
    """A 1 GiB cache costs (almost) no resident memory until blocks are written, reads as
    zeros, and a written block holds what was written."""
    cfg = ModelConfig(num_layers=2, num_kv_heads=8, head_dim=64)
    before = resident_anon_bytes()
    cache = KVCache(cfg, block_size=16, num_full_blocks=16384, num_sliding_blocks=16384)
    assert cache.nbytes() >= 1 << 30
    assert resident_anon_bytes() - before < 64 << 20
    k = cache.k[0]
    assert k.is_contiguous() and k.dtype == torch.bfloat16 and not k[:, ::997].any()
    k[:, 7] = 1.5
    assert k[:, 7].eq(1.5).all() and not k[:, 8].any() and not cache.v[0][:, 7].any()
    written = resident_anon_bytes()
    cache.v[1][:, :4096] = 1.0  # 64 MiB of blocks: now resident
    assert resident_anon_bytes() - written >= 48 << 20


def test_query_tiles_give_the_same_logits(small_model, monkeypatch):
    """Long prefills are attended in row tiles (bounded score memory); tiny tiles, each
    reading only its visible keys, must give what one big tile gives."""
    import model.paged_attention as paged

    rng = random.Random(3)
    toks = [rng.randrange(VOCAB) for _ in range(50)]
    untiled = full_logits(small_model, toks)
    steps: list[torch.Tensor] = []
    greedy_generate(
        small_model, toks[:30], 3, block_size=BLOCK, on_step=lambda i, lg: steps.append(lg.clone())
    )
    monkeypatch.setattr(paged, "SCORE_ELEMENTS_PER_HEAD", 40)  # 2-3 query rows per tile
    plan = paged.build_plan(
        BatchMetadata(
            positions=torch.arange(50), query_start=torch.tensor([0, 50]), context_lens=torch.tensor([0]),
            full_block_table=None, sliding_block_table=None, logits_indices=torch.arange(50),
        ),
        None, 1, WINDOW,
    )  # fmt: skip
    assert len(plan.prefill[0].tiles) > 10
    assert all(t.key_end - t.key_start <= WINDOW + 3 for t in plan.prefill[0].tiles)  # sliding: window only
    assert_close(full_logits(small_model, toks), untiled)
    tiled_steps: list[torch.Tensor] = []
    greedy_generate(
        small_model, toks[:30], 3, block_size=BLOCK, on_step=lambda i, lg: tiled_steps.append(lg.clone())
    )
    assert_close(torch.stack(tiled_steps), torch.stack(steps))


@pytest.mark.parametrize(
    ("heads", "kv_heads", "tq", "tk", "window"),
    [(4, 2, 7, 7, None), (8, 1, 33, 50, 16), (6, 6, 1, 20, None), (16, 2, 64, 200, 128)],
)
def test_fused_attention_equals_the_portable_reference(heads, kv_heads, tq, tk, window):
    """The fused prefill kernel (flash attention + log-sum-exp sink correction) gives the
    portable fp32 reference's result for GQA shapes, causal and windowed masks."""
    from model.layers import attention_with_sinks, fused_attention_with_sinks

    gen = torch.Generator().manual_seed(heads * 100 + tq)
    d = 16
    q = torch.randn(2, tq, heads, d, generator=gen)
    k = torch.randn(2, kv_heads, tk, d, generator=gen)
    v = torch.randn(2, kv_heads, tk, d, generator=gen)
    sinks = torch.randn(heads, generator=gen) * 2
    q_pos = torch.arange(tk - tq, tk)
    diff = q_pos[:, None] - torch.arange(tk)[None, :]
    mask = diff >= 0
    if window is not None:
        mask &= diff <= window - 1
    mask = mask[None].expand(2, tq, tk)
    ref = attention_with_sinks(q, k, v, mask, sinks, 0.25)
    fused = fused_attention_with_sinks(q, k, v, mask, sinks, 0.25)
    assert fused.shape == ref.shape
    assert torch.allclose(fused, ref, rtol=1e-5, atol=1e-6)


def test_decode_groups_cover_every_sequence_with_bounded_padding():
    """The rule: every decode sequence is in exactly one group, and within a group the
    shortest member needs at least DECODE_GROUP_MIN_FILL of the longest's key blocks."""
    import model.paged_attention as paged

    rng = random.Random(5)
    bs = 4
    for window in (None, 24):
        ctx = [rng.randrange(0, 300) for _ in range(40)]
        width = max(c // bs + 1 for c in ctx)
        table = torch.arange(len(ctx) * width, dtype=torch.int32).view(len(ctx), width)
        meta = BatchMetadata(
            positions=torch.tensor(ctx), query_start=torch.arange(len(ctx) + 1),
            context_lens=torch.tensor(ctx), full_block_table=table, sliding_block_table=table,
            logits_indices=torch.arange(len(ctx)), query_lens_cpu=[1] * len(ctx), context_lens_cpu=ctx,
        )  # fmt: skip
        plan = paged.build_plan(meta, table, bs, window)
        rows = sorted(r for g in plan.decode for r in g.rows.tolist())
        assert rows == list(range(len(ctx)))
        for g in plan.decode:
            keys = [min(ctx[r] + 1, window or 10**9) for r in g.rows.tolist()]
            blocks = [-(-k // bs) + 1 for k in keys]
            assert min(blocks) >= paged.DECODE_GROUP_MIN_FILL * max(blocks)
        assert len(plan.decode) > 1 or window is not None
