"""Attention over the paged KV cache for one flattened batch.

An ``AttentionPlan`` is built once per forward pass for each pool kind (full layers, sliding
layers) from ``BatchMetadata``: where each new token's K/V goes (its slot), and, for each
sequence, which cache slots hold its keys and which of them each query may see. All layers
of a kind then reuse it. Sequences decoding one token are batched together: their keys are
gathered padded to the longest context and attended in one masked call. Prefill chunks are
attended one sequence at a time.

Masks: causal (key position <= query position) and, on sliding layers, query - key <=
window - 1 (the window includes the current token). Sliding layers gather only the keys a
query can still see, so blocks that fell out of the window (table entry -1) are never read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .batch import BatchMetadata
from .layers import attention_with_sinks


@dataclass
class _KeyGather:
    """Keys of a group of sequences, gathered from the cache."""

    rows: torch.Tensor | None  # token rows of the queries; None = a contiguous range
    row_start: int
    row_end: int
    slots: torch.Tensor  # [B, Tk] int64 cache slots (padding points at slot 0, masked)
    mask: torch.Tensor  # [B, Tq, Tk] bool


@dataclass
class AttentionPlan:
    write_slots: torch.Tensor | None  # [T] int64 flat slot of every new token; None = no cache
    decode: _KeyGather | None
    prefill: list[_KeyGather]
    # No-cache mode: per-sequence (row_start, row_end, mask [1, q, q]).
    self_only: list[tuple[int, int, torch.Tensor]]


def _window_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """q_pos [..., Tq], k_pos [..., Tk] -> [..., Tq, Tk] bool."""
    diff = q_pos[..., :, None] - k_pos[..., None, :]
    mask = diff >= 0
    if window is not None:
        mask &= diff <= window - 1
    return mask


def _slots(table: torch.Tensor, seq: torch.Tensor, pos: torch.Tensor, block_size: int) -> torch.Tensor:
    """Flat cache slot of (sequence, position); -1 table entries give slot -1 - ... (negative)."""
    block = table[seq, pos // block_size].long()
    return block * block_size + pos % block_size


def build_plan(
    meta: BatchMetadata,
    table: torch.Tensor | None,
    block_size: int,
    window: int | None,
) -> AttentionPlan:
    """``table`` is the block table of this pool kind (None = no cache: pure prefill)."""
    device = meta.positions.device
    query_lens = meta.query_lens_cpu
    if query_lens is None:
        query_lens = (meta.query_start[1:] - meta.query_start[:-1]).tolist()
    context_lens = meta.context_lens_cpu if meta.context_lens_cpu is not None else meta.context_lens.tolist()
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)

    if table is None:
        if any(c != 0 for c in context_lens):
            raise ValueError("without a KV cache the batch must be pure prefill (context_lens all 0)")
        self_only = []
        for s in range(len(query_lens)):
            pos = meta.positions[starts[s] : starts[s + 1]]
            self_only.append((starts[s], starts[s + 1], _window_mask(pos, pos, window)[None]))
        return AttentionPlan(write_slots=None, decode=None, prefill=[], self_only=self_only)

    table = table.to(device)
    seq_of_token = torch.repeat_interleave(
        torch.arange(len(query_lens), device=device), torch.tensor(query_lens, device=device)
    )
    write_slots = _slots(table, seq_of_token, meta.positions, block_size)

    decode_seqs = [s for s, n in enumerate(query_lens) if n == 1]
    prefill_seqs = [s for s, n in enumerate(query_lens) if n > 1]
    decode = None
    if decode_seqs:
        # Keys of a decode token at position p: [first, p], first = 0 or p - window + 1.
        totals = [context_lens[s] + 1 for s in decode_seqs]
        firsts = [0 if window is None else max(0, n - window) for n in totals]
        width = max(n - f for n, f in zip(totals, firsts, strict=True))
        seq_t = torch.tensor(decode_seqs, device=device)
        first_t = torch.tensor(firsts, device=device)
        q_pos = torch.tensor([n - 1 for n in totals], device=device)
        k_pos = first_t[:, None] + torch.arange(width, device=device)[None, :]  # [B, Tk]
        valid = k_pos <= q_pos[:, None]
        k_pos = torch.where(valid, k_pos, torch.zeros_like(k_pos))
        slots = _slots(table, seq_t[:, None].expand_as(k_pos), k_pos, block_size)
        slots = torch.where(valid, slots, torch.zeros_like(slots))
        mask = _window_mask(q_pos[:, None], k_pos, window) & valid[:, None, :]
        rows = torch.tensor([starts[s] for s in decode_seqs], device=device)
        decode = _KeyGather(rows=rows, row_start=0, row_end=0, slots=slots, mask=mask)

    prefill = []
    for s in prefill_seqs:
        ctx, n = context_lens[s], query_lens[s]
        first = 0 if window is None else max(0, ctx - window + 1)
        k_pos = torch.arange(first, ctx + n, device=device)
        q_pos = meta.positions[starts[s] : starts[s + 1]]
        slots = _slots(table, torch.full_like(k_pos, s), k_pos, block_size)
        mask = _window_mask(q_pos, k_pos, window)
        prefill.append(_KeyGather(None, starts[s], starts[s + 1], slots[None], mask[None]))
    return AttentionPlan(write_slots=write_slots, decode=decode, prefill=prefill, self_only=[])


def paged_attention(
    plan: AttentionPlan,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor | None,
    v_cache: torch.Tensor | None,
    sinks: torch.Tensor,
    sm_scale: float,
) -> torch.Tensor:
    """q [T, H, D] fp32; k, v [T, KVH, D] (cache dtype). Writes k/v to the cache, then
    attends. Returns [T, H, D] fp32."""
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    if plan.write_slots is None:
        for start, end, mask in plan.self_only:
            out[start:end] = attention_with_sinks(
                q[None, start:end], k[None, start:end], v[None, start:end], mask, sinks, sm_scale
            )[0]
        return out
    assert k_cache is not None and v_cache is not None
    kvh, d = k_cache.shape[2], k_cache.shape[3]
    k_flat = k_cache.view(-1, kvh, d)
    v_flat = v_cache.view(-1, kvh, d)
    k_flat.index_copy_(0, plan.write_slots, k.to(k_flat.dtype))
    v_flat.index_copy_(0, plan.write_slots, v.to(v_flat.dtype))
    if plan.decode is not None:
        g = plan.decode
        assert g.rows is not None
        keys = k_flat[g.slots]  # [B, Tk, KVH, D]
        values = v_flat[g.slots]
        out[g.rows] = attention_with_sinks(q[g.rows][:, None], keys, values, g.mask, sinks, sm_scale)[:, 0]
    for g in plan.prefill:
        keys = k_flat[g.slots]
        values = v_flat[g.slots]
        out[g.row_start : g.row_end] = attention_with_sinks(
            q[None, g.row_start : g.row_end], keys, values, g.mask, sinks, sm_scale
        )[0]
    return out
