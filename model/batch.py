"""What one forward pass is asked to compute: the contract between engine/ and model/.

The engine flattens every scheduled sequence's new tokens (prefill chunks and single
decode tokens, mixed) into one 1-D batch of T tokens and describes it here. The model
writes the new tokens' K/V into the paged cache, attends over each sequence's cached
blocks plus its new tokens, and returns logits only for the rows the engine asks for.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class BatchMetadata:
    """Describes a flattened batch of S sequences holding T new tokens in total.

    Sequence s owns the token rows ``query_start[s]:query_start[s+1]``; its first new
    token sits at absolute position ``context_lens[s]`` (the number of its tokens whose
    K/V are already in the cache), so ``positions`` is redundant but precomputed once.

    Block tables map a sequence's logical block ``i`` (positions ``i*block_size`` to
    ``(i+1)*block_size - 1``) to a physical block id, padded with -1. Full-attention
    layers and sliding-window layers use separate block pools and separate tables: a
    sliding table may hold -1 for blocks that fell out of the window (the engine frees
    them), but it must hold valid blocks for every position in
    ``[max(0, context_len - window + 1), context_len + new_tokens)``.
    """

    positions: torch.Tensor  # [T] int64, absolute position of every new token
    query_start: torch.Tensor  # [S+1] int64, cumulative new-token counts (cu_seqlens)
    context_lens: torch.Tensor  # [S] int64, tokens already cached before this step
    full_block_table: torch.Tensor | None  # [S, max_blocks] int32, -1 padded; None = no cache
    sliding_block_table: torch.Tensor | None  # [S, max_blocks] int32, -1 = not held
    logits_indices: torch.Tensor  # [N] int64, token rows whose logits are returned
    # Host-side copies so the model never syncs the device to learn sizes.
    query_lens_cpu: list[int] | None = None
    context_lens_cpu: list[int] | None = None

    @property
    def num_seqs(self) -> int:
        return int(self.context_lens.shape[0])
