"""Single-sequence greedy generation through the paged KV cache, for the CLI, tests and
benchmarks. The engine has its own block manager and scheduler; this is the smallest
thing that drives ``GptOssModel.forward`` the same way (including freeing sliding-window
blocks once they leave the window)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .batch import BatchMetadata
from .kv_cache import KVCache
from .transformer import GptOssModel


class _SequenceBlocks:
    """Block tables of one sequence over both pools, with sliding blocks recycled."""

    def __init__(self, num_full: int, num_sliding: int, block_size: int, window: int) -> None:
        self.block_size = block_size
        self.window = window
        self.free_sliding = list(range(num_sliding))
        self.full: list[int] = []
        self.sliding: list[int] = []  # -1 = released
        self.num_full = num_full

    def ensure(self, num_tokens: int) -> None:
        needed = math.ceil(num_tokens / self.block_size)
        while len(self.full) < needed:
            if len(self.full) >= self.num_full:
                raise RuntimeError("KV cache full")
            self.full.append(len(self.full))
        while len(self.sliding) < needed:
            if not self.free_sliding:
                raise RuntimeError("sliding KV pool exhausted")
            self.sliding.append(self.free_sliding.pop())

    def release_out_of_window(self, next_position: int) -> None:
        """Keys before ``next_position - window + 1`` can never be seen again."""
        first_needed = max(0, next_position - self.window + 1)
        for i in range(first_needed // self.block_size):
            if self.sliding[i] >= 0:
                self.free_sliding.append(self.sliding[i])
                self.sliding[i] = -1

    def tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        return (
            torch.tensor([self.full], dtype=torch.int32, device=device),
            torch.tensor([self.sliding], dtype=torch.int32, device=device),
        )


def single_sequence_meta(
    start: int, count: int, full: torch.Tensor | None, sliding: torch.Tensor | None, logits_rows: torch.Tensor
) -> BatchMetadata:
    device = logits_rows.device
    return BatchMetadata(
        positions=torch.arange(start, start + count, device=device),
        query_start=torch.tensor([0, count], device=device),
        context_lens=torch.tensor([start], device=device),
        full_block_table=full,
        sliding_block_table=sliding,
        logits_indices=logits_rows,
        query_lens_cpu=[count],
        context_lens_cpu=[start],
    )


@torch.inference_mode()
def greedy_generate(
    model: GptOssModel,
    prompt_ids: list[int],
    max_new_tokens: int,
    block_size: int = 16,
    return_prefill_logits: bool = True,
    on_step: Callable[[int, torch.Tensor], None] | None = None,
) -> tuple[list[int], torch.Tensor | None]:
    """Prefill the prompt, then decode greedily one token at a time through the cache.

    Returns (new token ids, prefill logits [prompt_len, vocab] fp32 or None). ``on_step``
    is called with (step, logits [vocab]) for each generated token's distribution.
    """
    c = model.config
    device = model.device
    total = len(prompt_ids) + max_new_tokens
    num_full = math.ceil(total / block_size)
    # The prompt is prefilled in one piece, so the sliding pool must hold it whole once.
    num_sliding = (
        max(math.ceil(len(prompt_ids) / block_size), math.ceil(c.sliding_window / block_size) + 1) + 1
    )
    cache = KVCache(c, block_size, num_full, num_sliding, dtype=model.dtype, device=device)
    blocks = _SequenceBlocks(num_full, num_sliding, block_size, c.sliding_window)

    blocks.ensure(len(prompt_ids))
    full, sliding = blocks.tables(device)
    n = len(prompt_ids)
    rows = torch.arange(n, device=device) if return_prefill_logits else torch.tensor([n - 1], device=device)
    meta = single_sequence_meta(0, n, full, sliding, rows)
    logits = model(torch.tensor(prompt_ids, device=device), meta, cache)
    prefill_logits = logits.float() if return_prefill_logits else None
    last = logits[-1]
    tokens: list[int] = []
    position = n
    for step in range(max_new_tokens):
        if on_step is not None:
            on_step(step, last)
        token = int(torch.argmax(last))
        tokens.append(token)
        if step == max_new_tokens - 1:
            break
        blocks.release_out_of_window(position)
        blocks.ensure(position + 1)
        full, sliding = blocks.tables(device)
        meta = single_sequence_meta(position, 1, full, sliding, torch.tensor([0], device=device))
        last = model(torch.tensor([token], device=device), meta, cache)[0]
        position += 1
    return tokens, prefill_logits
