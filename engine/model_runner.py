"""Turns a scheduled step into one flattened forward pass (``model.batch.BatchMetadata``)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from model.batch import BatchMetadata
from model.kv_cache import KVCache

from .block_manager import NO_BLOCK
from .scheduler import SchedulerOutput
from .sequence import Sequence


@dataclass
class PreparedBatch:
    input_ids: torch.Tensor
    meta: BatchMetadata
    sample_seqs: list[Sequence]  # sequences whose last scheduled token yields logits, in row order


def _table(rows: list[list[int]], device: torch.device) -> torch.Tensor:
    """Ragged block lists -> [S, width] int32 padded with NO_BLOCK (row copies run in C)."""
    width = max(1, max(len(r) for r in rows))
    table = np.full((len(rows), width), NO_BLOCK, dtype=np.int32)
    for i, r in enumerate(rows):
        table[i, : len(r)] = r
    return torch.from_numpy(table).to(device)


class ModelRunner:
    def __init__(self, model: torch.nn.Module, kv_cache: KVCache, has_sliding_layers: bool) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.device = kv_cache.device
        self.has_sliding_layers = has_sliding_layers

    def prepare(self, sched: SchedulerOutput) -> PreparedBatch:
        input_ids: list[int] = []
        positions: list[int] = []
        query_start = [0]
        context_lens: list[int] = []
        logits_rows: list[int] = []
        sample_seqs: list[Sequence] = []
        for seq, n in zip(sched.seqs, sched.num_new_tokens, strict=True):
            c = seq.num_computed_tokens
            if n == 1:  # a decode: most rows of most steps
                input_ids.append(seq.token_ids[c])
                positions.append(c)
            else:
                input_ids.extend(seq.token_ids[c : c + n])
                positions.extend(range(c, c + n))
            query_start.append(query_start[-1] + n)
            context_lens.append(c)
            # Only a step that reaches the end of the known tokens produces a next token;
            # an intermediate prefill chunk needs no logits.
            if c + n == seq.num_tokens:
                logits_rows.append(query_start[-1] - 1)
                sample_seqs.append(seq)
        dev = self.device
        full_table = _table([s.full_blocks for s in sched.seqs], dev)
        # A model without sliding layers never reads the sliding table; hand it the full one.
        sliding_table = (
            _table([s.sliding_blocks for s in sched.seqs], dev) if self.has_sliding_layers else full_table
        )
        meta = BatchMetadata(
            positions=torch.tensor(positions, dtype=torch.long, device=dev),
            query_start=torch.tensor(query_start, dtype=torch.long, device=dev),
            context_lens=torch.tensor(context_lens, dtype=torch.long, device=dev),
            full_block_table=full_table,
            sliding_block_table=sliding_table,
            logits_indices=torch.tensor(logits_rows, dtype=torch.long, device=dev),
            query_lens_cpu=list(sched.num_new_tokens),
            context_lens_cpu=context_lens,
        )
        return PreparedBatch(torch.tensor(input_ids, dtype=torch.long, device=dev), meta, sample_seqs)

    @torch.inference_mode()
    def forward(self, batch: PreparedBatch) -> torch.Tensor:
        """-> logits [len(batch.sample_seqs), vocab] in the model dtype."""
        return self.model(batch.input_ids, batch.meta, self.kv_cache)

    @torch.inference_mode()
    def forward_greedy(self, batch: PreparedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """-> the argmax token ids of ``forward``'s logits [len(batch.sample_seqs)] (int64),
        which the LM head may fuse, and the head's input rows, for ``logits`` to come back to
        for the rows whose argmax their request may not take."""
        hidden = self.model.final_hidden(batch.input_ids, batch.meta, self.kv_cache)
        return self.model.head(hidden, greedy=True), hidden

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``forward_greedy``'s rows -> their logits (as ``forward`` gives them)."""
        return self.model.head(hidden)
