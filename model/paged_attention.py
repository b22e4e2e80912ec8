"""Attention over the paged KV cache for one flattened batch.

An ``AttentionPlan`` is built once per forward pass for each pool kind (full layers, sliding
layers) from ``BatchMetadata``: where each new token's K/V goes (its slot), and, for each
sequence, which cache slots hold its keys and which of them each query may see. All layers
of a kind then reuse it. The cache keeps KV heads outermost
(``[kv_heads, blocks, block_size, head_dim]``), so gathering whole blocks yields each head's
keys as one contiguous run, which is what the matmuls want, without a transposing copy.
Sequences decoding one token are batched together: their blocks are gathered padded to the
longest context of their group and attended in one masked call whose matmuls run in the
cache's dtype (fp32 softmax, as the references do). Prefill chunks are attended one sequence
at a time, in tiles of query rows so that the score tensor stays bounded for long prompts; each tile reads only the
keys its queries can see, through a fused kernel where the device has one.

Masks: causal (key position <= query position) and, on sliding layers, query - key <=
window - 1 (the window includes the current token). Sliding layers gather only the keys a
query can still see, so blocks that fell out of the window (table entry -1) are never read.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .batch import BatchMetadata
from .layers import fused_attention_with_sinks

# Upper bound on attention scores materialised at once per query head (rows x keys).
SCORE_ELEMENTS_PER_HEAD = 1 << 20
# Query rows per prefill tile. Each tile reads only the keys its rows can see, so the
# masked-out part of a causal (or windowed) tile is at most about one tile's square, not
# half the prompt: with 64-row tiles a 512-token prompt's attention took 40% less time
# than one masked call (CPU flash kernel; the portable path gains too).
PREFILL_TILE_ROWS = 64
# Upper bound on key positions gathered at once for a group of decode sequences.
DECODE_KEYS_PER_GROUP = 1 << 16
# A decode group's shortest member needs at least this share of its longest member's keys.
DECODE_GROUP_MIN_FILL = 0.75


@dataclass
class DecodeGroup:
    """A group of the step's single-token sequences, attended together (the reference
    gathers their blocks into one padded copy; a backend may read them in place)."""

    rows: torch.Tensor  # [B] token row of each decode query
    blocks: torch.Tensor  # [B * NBLK] int64 physical blocks, sequence by sequence (padding -> block 0)
    mask: torch.Tensor  # [B, NBLK * block_size] bool, per key slot of the gathered blocks


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
    blocks: torch.Tensor | None  # [NBLK] physical blocks holding its keys; None = its own new tokens
    key_offset: int  # keys start this many slots into the first gathered block
    num_keys: int
    tiles: list[_Tile]


# (group, q, k_cache, v_cache, sinks, sm_scale, out) -> None: writes out[group.rows].
DecodeGroupFn = Callable[
    ["DecodeGroup", torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float, torch.Tensor], None
]


@dataclass
class AttentionPlan:
    write_blocks: torch.Tensor | None  # [T] int64 physical block of every new token; None = no cache
    write_offsets: torch.Tensor | None  # [T] int64 its slot within the block
    decode: list[DecodeGroup]  # groups of decode sequences (bounded gathered-key memory)
    prefill: list[_Prefill]


def _window_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """q_pos [..., Tq], k_pos [..., Tk] -> [..., Tq, Tk] bool."""
    diff = q_pos[..., :, None] - k_pos[..., None, :]
    mask = diff >= 0
    if window is not None:
        mask &= diff <= window - 1
    return mask


def _physical_blocks(table: torch.Tensor, seq: torch.Tensor, logical: torch.Tensor) -> torch.Tensor:
    """Physical block of (sequence, logical block)."""
    return table[seq, logical].long()


def _tiles(
    row_start: int, q_first: int, n: int, k_first: int, window: int | None, device: torch.device
) -> list[_Tile]:
    """Split n queries at positions q_first.. into row tiles; keys start at position k_first."""
    tiles = []
    keys_total = q_first + n - k_first
    span = min(keys_total, window if window is not None else keys_total)
    rows_per_tile = max(1, min(PREFILL_TILE_ROWS, SCORE_ELEMENTS_PER_HEAD // max(span, 1)))
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
) -> DecodeGroup:
    """Keys of a decode token at position p: [first, p], first = 0 or p - window + 1, read
    as the whole blocks that hold them, padded to the group's widest block range (padding
    masked, pointing at block 0)."""
    totals = [context_lens[s] + 1 for s in seqs]
    firsts = [0 if window is None else max(0, n - window) for n in totals]
    first_blocks = [f // block_size for f in firsts]
    last_blocks = [(n - 1) // block_size for n in totals]
    width = max(last - first + 1 for first, last in zip(first_blocks, last_blocks, strict=True))
    seq_t = torch.tensor(seqs, device=device)
    logical = torch.tensor(first_blocks, device=device)[:, None] + torch.arange(width, device=device)
    in_table = logical <= torch.tensor(last_blocks, device=device)[:, None]  # [B, NBLK]
    blocks = _physical_blocks(table, seq_t[:, None].expand_as(logical), torch.where(in_table, logical, 0))
    blocks = torch.where(in_table, blocks, torch.zeros_like(blocks))
    k_pos = logical[:, :, None] * block_size + torch.arange(block_size, device=device)  # [B, NBLK, bs]
    q_pos = torch.tensor([n - 1 for n in totals], device=device)
    mask = _window_mask(q_pos[:, None], k_pos.reshape(len(seqs), -1), window)[:, 0]  # [B, NBLK*bs]
    rows = torch.tensor([starts[s] for s in seqs], device=device)
    return DecodeGroup(rows=rows, blocks=blocks.reshape(-1), mask=mask)


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
            _Prefill(starts[s], starts[s + 1], None, 0, n, _tiles(starts[s], 0, n, 0, window, device))
            for s, n in enumerate(query_lens)
            if n > 0
        ]
        return AttentionPlan(write_blocks=None, write_offsets=None, decode=[], prefill=prefill)

    table = table.to(device)
    seq_of_token = torch.repeat_interleave(
        torch.arange(len(query_lens), device=device), torch.tensor(query_lens, device=device)
    )
    write_blocks = _physical_blocks(table, seq_of_token, meta.positions // block_size)
    write_offsets = meta.positions % block_size

    decode_seqs = [s for s, n in enumerate(query_lens) if n == 1]
    decode = []
    # Longest contexts first, so that each group pads its keys to similar lengths.
    decode_seqs.sort(key=lambda s: -context_lens[s])

    def key_width(s: int) -> int:
        keys = context_lens[s] + 1 if window is None else min(context_lens[s] + 1, window)
        return -(-keys // block_size) * block_size + block_size  # whole blocks, worst alignment

    while decode_seqs:
        width = key_width(decode_seqs[0])
        size = 1
        # A group also ends where contexts get much shorter: every member is padded to the
        # first (longest), and gathering padding costs as much as gathering keys.
        while (
            size < min(len(decode_seqs), DECODE_KEYS_PER_GROUP // width)
            and key_width(decode_seqs[size]) >= DECODE_GROUP_MIN_FILL * width
        ):
            size += 1
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
        logical = torch.arange(first // block_size, (ctx + n - 1) // block_size + 1, device=device)
        blocks = _physical_blocks(table, torch.full_like(logical, s), logical)
        tiles = _tiles(starts[s], ctx, n, first, window, device)
        prefill.append(_Prefill(starts[s], starts[s + 1], blocks, first % block_size, ctx + n - first, tiles))
    return AttentionPlan(write_blocks, write_offsets, decode=decode, prefill=prefill)


def _gather_blocks(
    k_cache: torch.Tensor, v_cache: torch.Tensor, blocks: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Caches [KVH, num_blocks, bs, D], blocks [N] -> keys, values [KVH, N * bs, D]: each
    head's slots of those blocks, in order. One gather on dim 0 of the flat
    [KVH * num_blocks, ...] view: the same result as ``index_select`` on dim 1, which
    PyTorch's CPU kernel does 1.5-2x slower."""
    kvh, num_blocks, block_size, d = k_cache.shape
    rows = (torch.arange(kvh, device=blocks.device)[:, None] * num_blocks + blocks).view(-1)
    keys = k_cache.view(kvh * num_blocks, block_size, d).index_select(0, rows).view(kvh, -1, d)
    values = v_cache.view(kvh * num_blocks, block_size, d).index_select(0, rows).view(kvh, -1, d)
    return keys, values


def paged_attention(
    plan: AttentionPlan,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor | None,
    v_cache: torch.Tensor | None,
    sinks: torch.Tensor,
    sm_scale: float,
    out: torch.Tensor | None = None,
    decode_group: DecodeGroupFn | None = None,
) -> torch.Tensor:
    """q [T, H, D]; k, v [T, KVH, D] (cache dtype); caches [KVH, blocks, block_size, D].
    Writes k/v to the cache, then attends (softmax in fp32). Returns [T, H, D] in q's dtype:
    ``out`` when given (every row is written), else a new tensor. ``decode_group`` attends one
    group of decode sequences (a backend's kernel); default ``attend_decode_group``."""
    decode_group = decode_group or attend_decode_group
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if plan.write_blocks is not None:
        assert k_cache is not None and v_cache is not None
        # Adjacent advanced indices after a slice stay in place: the target is [KVH, T, D].
        k_cache[:, plan.write_blocks, plan.write_offsets] = k.transpose(0, 1).to(k_cache.dtype)
        v_cache[:, plan.write_blocks, plan.write_offsets] = v.transpose(0, 1).to(v_cache.dtype)
    for g in plan.decode:
        assert k_cache is not None and v_cache is not None
        decode_group(g, q, k_cache, v_cache, sinks, sm_scale, out)
    for p in plan.prefill:
        if p.blocks is None:  # no cache: the sequence's own new tokens are its keys
            keys = k[p.row_start : p.row_end].transpose(0, 1)
            values = v[p.row_start : p.row_end].transpose(0, 1)
        else:
            assert k_cache is not None and v_cache is not None
            keys, values = (
                x[:, p.key_offset : p.key_offset + p.num_keys]
                for x in _gather_blocks(k_cache, v_cache, p.blocks)
            )
        keys, values = keys.float(), values.float()  # once, not once per tile
        for t in p.tiles:
            out[t.row_start : t.row_end] = fused_attention_with_sinks(
                q[None, t.row_start : t.row_end],
                keys[None, :, t.key_start : t.key_end],
                values[None, :, t.key_start : t.key_end],
                t.mask,
                sinks,
                sm_scale,
            )[0]
    return out


def attend_decode_group(
    g: DecodeGroup,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    sinks: torch.Tensor,
    sm_scale: float,
    out: torch.Tensor,
) -> None:
    """``out[g.rows]`` for one group of decode sequences: their blocks gathered into one
    padded copy, then ``decode_attention_with_sinks``."""
    b = g.rows.shape[0]
    kvh, d = k_cache.shape[0], k_cache.shape[3]
    keys, values = (x.view(kvh, b, -1, d) for x in _gather_blocks(k_cache, v_cache, g.blocks))
    out[g.rows] = decode_attention_with_sinks(q[g.rows], keys, values, g.mask, sinks, sm_scale)


def decode_attention_with_sinks(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    sinks: torch.Tensor,
    sm_scale: float,
) -> torch.Tensor:
    """One query per sequence against its gathered keys, same maths as
    ``attention_with_sinks``. q [B, H, D]; keys, values [KVH, B, Tk, D]; mask [B, Tk].
    The G query heads of a KV head are the rows of one matmul against that head's keys (no
    broadcast copies). The two matmuls run in the cache's dtype (fp32 caches: all fp32;
    bf16 caches: bf16 operands, as the reference and transformers do), the softmax and
    the sink in fp32. Returns [B, H, D] in q's dtype."""
    kvh, b, _, d = keys.shape
    g = q.shape[1] // kvh
    qg = q.view(b, kvh, g, d).transpose(0, 1).to(keys.dtype)  # [KVH, B, G, D]
    # In place after the first matmul: each pass over the [KVH, B, G, Tk] scores is a pass
    # over memory, and fresh temporaries are slower still.
    scores = torch.matmul(qg, keys.transpose(-1, -2)).float()  # [KVH, B, G, Tk]
    scores.mul_(sm_scale).masked_fill_(~mask[None, :, None, :], float("-inf"))
    sink = sinks.float().view(kvh, 1, g, 1)
    row_max = torch.maximum(scores.amax(dim=-1, keepdim=True), sink)
    probs = scores.sub_(row_max).exp_()
    probs.div_(probs.sum(dim=-1, keepdim=True).add_(torch.exp(sink - row_max)))
    out = torch.matmul(probs.to(values.dtype), values)  # [KVH, B, G, D]
    return out.to(q.dtype).transpose(0, 1).reshape(b, kvh * g, d)
