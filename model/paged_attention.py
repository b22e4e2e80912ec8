"""Attention over the paged KV cache for one flattened batch.

An ``AttentionPlan`` is built once per forward pass for each pool kind (full layers, sliding
layers) from ``BatchMetadata``: where each new token's K/V goes (its slot), and, for each
sequence, which cache slots hold its keys and which of them each query may see. All layers
of a kind then reuse it. Sequences decoding one token are batched together: their keys are
gathered padded to the longest context and attended in one masked call. Prefill chunks are
attended one sequence at a time, in tiles of query rows so that the score tensor stays
bounded for long prompts; each tile reads only the keys its queries can see.

Masks: causal (key position <= query position) and, on sliding layers, query - key <=
window - 1 (the window includes the current token). Sliding layers gather only the keys a
query can still see, so blocks that fell out of the window (table entry -1) are never read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .batch import BatchMetadata
from .layers import attention_with_sinks

# Upper bound on attention scores materialised at once per query head (rows x keys).
SCORE_ELEMENTS_PER_HEAD = 1 << 20
# Upper bound on key positions gathered at once for a group of decode sequences.
DECODE_KEYS_PER_GROUP = 1 << 16


@dataclass
class _Decode:
    """All single-token sequences of the step, batched."""

    rows: torch.Tensor  # [B] token row of each decode query
    slots: torch.Tensor  # [B, Tk] int64 cache slots (padding points at slot 0, masked)
    mask: torch.Tensor  # [B, 1, Tk] bool


@dataclass
class _Tile:
    """Query rows [row_start, row_end) of one sequence against its keys [key_start, key_end)
    (indices into the sequence's key list, whose entry j is position key_first_pos + j)."""

    row_start: int
    row_end: int
    key_start: int
    key_end: int
    mask: torch.Tensor  # [1, rows, keys] bool


@dataclass
class _Prefill:
    row_start: int
    row_end: int
    slots: torch.Tensor | None  # [Tk] cache slots of its keys; None = its own new tokens
    tiles: list[_Tile]


@dataclass
class AttentionPlan:
    write_slots: torch.Tensor | None  # [T] int64 flat slot of every new token; None = no cache
    decode: list[_Decode]  # groups of decode sequences (bounded gathered-key memory)
    prefill: list[_Prefill]


def _window_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """q_pos [..., Tq], k_pos [..., Tk] -> [..., Tq, Tk] bool."""
    diff = q_pos[..., :, None] - k_pos[..., None, :]
    mask = diff >= 0
    if window is not None:
        mask &= diff <= window - 1
    return mask


def _slots(table: torch.Tensor, seq: torch.Tensor, pos: torch.Tensor, block_size: int) -> torch.Tensor:
    """Flat cache slot of (sequence, position)."""
    block = table[seq, pos // block_size].long()
    return block * block_size + pos % block_size


def _tiles(
    row_start: int, q_first: int, n: int, k_first: int, window: int | None, device: torch.device
) -> list[_Tile]:
    """Split n queries at positions q_first.. into row tiles; keys start at position k_first."""
    tiles = []
    keys_total = q_first + n - k_first
    span = min(keys_total, window if window is not None else keys_total)
    rows_per_tile = max(1, SCORE_ELEMENTS_PER_HEAD // max(span, 1))
    for r0 in range(0, n, rows_per_tile):
        r1 = min(n, r0 + rows_per_tile)
        # Keys the tile's queries may see: up to its last query, back one window from its first.
        lo = k_first if window is None else max(k_first, q_first + r0 - window + 1)
        hi = q_first + r1  # exclusive
        q_pos = torch.arange(q_first + r0, q_first + r1, device=device)
        k_pos = torch.arange(lo, hi, device=device)
        tiles.append(
            _Tile(
                row_start + r0,
                row_start + r1,
                lo - k_first,
                hi - k_first,
                _window_mask(q_pos, k_pos, window)[None],
            )
        )
    return tiles


def _decode_group(
    seqs: list[int],
    context_lens: list[int],
    starts: list[int],
    table: torch.Tensor,
    block_size: int,
    window: int | None,
    device: torch.device,
) -> _Decode:
    """Keys of a decode token at position p: [first, p], first = 0 or p - window + 1,
    gathered padded to the group's widest range (padding masked, pointing at slot 0)."""
    totals = [context_lens[s] + 1 for s in seqs]
    firsts = [0 if window is None else max(0, n - window) for n in totals]
    width = max(n - f for n, f in zip(totals, firsts, strict=True))
    seq_t = torch.tensor(seqs, device=device)
    first_t = torch.tensor(firsts, device=device)
    q_pos = torch.tensor([n - 1 for n in totals], device=device)
    k_pos = first_t[:, None] + torch.arange(width, device=device)[None, :]  # [B, Tk]
    valid = k_pos <= q_pos[:, None]
    k_pos = torch.where(valid, k_pos, torch.zeros_like(k_pos))
    slots = _slots(table, seq_t[:, None].expand_as(k_pos), k_pos, block_size)
    slots = torch.where(valid, slots, torch.zeros_like(slots))
    mask = _window_mask(q_pos[:, None], k_pos, window) & valid[:, None, :]
    rows = torch.tensor([starts[s] for s in seqs], device=device)
    return _Decode(rows=rows, slots=slots, mask=mask)


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
        prefill = [
            _Prefill(starts[s], starts[s + 1], None, _tiles(starts[s], 0, n, 0, window, device))
            for s, n in enumerate(query_lens)
            if n > 0
        ]
        return AttentionPlan(write_slots=None, decode=[], prefill=prefill)

    table = table.to(device)
    seq_of_token = torch.repeat_interleave(
        torch.arange(len(query_lens), device=device), torch.tensor(query_lens, device=device)
    )
    write_slots = _slots(table, seq_of_token, meta.positions, block_size)

    decode_seqs = [s for s, n in enumerate(query_lens) if n == 1]
    decode = []
    # Longest contexts first, so that each group pads its keys to similar lengths.
    decode_seqs.sort(key=lambda s: -context_lens[s])
    while decode_seqs:
        longest = context_lens[decode_seqs[0]] + 1
        width = longest if window is None else min(longest, window)
        size = max(1, DECODE_KEYS_PER_GROUP // width)
        decode.append(
            _decode_group(decode_seqs[:size], context_lens, starts, table, block_size, window, device)
        )
        decode_seqs = decode_seqs[size:]

    prefill = []
    for s, n in enumerate(query_lens):
        if n <= 1:
            continue
        ctx = context_lens[s]
        first = 0 if window is None else max(0, ctx - window + 1)
        k_pos = torch.arange(first, ctx + n, device=device)
        slots = _slots(table, torch.full_like(k_pos, s), k_pos, block_size)
        prefill.append(
            _Prefill(starts[s], starts[s + 1], slots, _tiles(starts[s], ctx, n, first, window, device))
        )
    return AttentionPlan(write_slots=write_slots, decode=decode, prefill=prefill)


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
    k_flat = v_flat = None
    if plan.write_slots is not None:
        assert k_cache is not None and v_cache is not None
        kvh, d = k_cache.shape[2], k_cache.shape[3]
        k_flat = k_cache.view(-1, kvh, d)
        v_flat = v_cache.view(-1, kvh, d)
        k_flat.index_copy_(0, plan.write_slots, k.to(k_flat.dtype))
        v_flat.index_copy_(0, plan.write_slots, v.to(v_flat.dtype))
    for g in plan.decode:
        assert k_flat is not None and v_flat is not None
        keys = k_flat[g.slots]  # [B, Tk, KVH, D]
        values = v_flat[g.slots]
        out[g.rows] = attention_with_sinks(q[g.rows][:, None], keys, values, g.mask, sinks, sm_scale)[:, 0]
    for p in plan.prefill:
        if p.slots is None:  # no cache: the sequence's own new tokens are its keys
            keys, values = k[p.row_start : p.row_end], v[p.row_start : p.row_end]
        else:
            assert k_flat is not None and v_flat is not None
            keys, values = k_flat[p.slots], v_flat[p.slots]
        for t in p.tiles:
            out[t.row_start : t.row_end] = attention_with_sinks(
                q[None, t.row_start : t.row_end],
                keys[None, t.key_start : t.key_end],
                values[None, t.key_start : t.key_end],
                t.mask,
                sinks,
                sm_scale,
            )[0]
    return out
