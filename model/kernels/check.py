"""A backend's check against the reference at load, before the model serves anything.

A few random rows of the model's real widths (hidden size, heads, head dim, intermediate
size) go through each op on both backends: the MoE over the first experts of layer 0 (a
decode-sized and a prefill-sized batch), paged attention with sinks over a mixed batch
(a prefill chunk after cached tokens, decodes; with and without a sliding window; and a
cache-less prefill), both attention projections, RMSNorm and RoPE, and the LM head over the
first rows of the vocabulary. Real weights, sliced, so the check reads the form the model will run (packed
or dense experts) without allocating a layer's worth of random ones. At 120b widths it
costs about a second of CPU, most of it the reference dequantizing its two experts.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch

from ..batch import BatchMetadata
from ..paged_attention import build_plan
from .base import Kernels

if TYPE_CHECKING:
    from ..config import ModelConfig
    from ..layers import ExpertWeights
    from ..transformer import ModelWeights

# Max relative error per row (max |ours - ref| / max |ref|, the parity tests' metric) a
# backend may show against the reference. float32 is the parity tests' own bound; in the
# 16-bit dtypes each op rounds its result once, and a different summation order can move
# that rounding by an ulp or two (bf16: 2^-8 relative), so the bound catches wrong results
# rather than reordered ones.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}
MOE_ROWS = (2, 37)  # a decode batch and a prefill chunk
MOE_EXPERTS = 2  # experts of layer 0 used (rows are routed among these; dequantizing dominates)
LM_HEAD_VOCAB = 256  # rows of the unembedding used
BLOCK_SIZE = 4
WINDOW = 5  # shorter than the contexts below, so the window really cuts
# (cached tokens, new tokens) per sequence: a prefill chunk after a cached prefix, two decodes.
MIXED_BATCH = ((5, 7), (9, 1), (2, 1))
PREFILL_ONLY = 6  # tokens of the cache-less prefill


class _Mismatch(Exception):
    pass


def max_relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """Per row (last dim): max |ours - ref| / max |ref|; the worst row."""
    ours, ref = ours.float().reshape(-1, ours.shape[-1]), ref.float().reshape(-1, ref.shape[-1])
    scale = ref.abs().amax(-1).clamp_min(torch.finfo(torch.float32).tiny)
    return ((ours - ref).abs().amax(-1) / scale).max().item()


def self_check(
    candidate: Kernels, reference: Kernels, weights: ModelWeights, config: ModelConfig, dtype: torch.dtype
) -> str | None:
    """None when ``candidate`` matches ``reference`` on every op, else why not (the first
    op that raised or differed beyond ``TOLERANCE``)."""
    device = weights.embedding.device
    checks = (_check_moe, _check_attention, _check_linear, _check_norm_rope, _check_lm_head)
    try:
        with torch.inference_mode():
            for check in checks:
                check(candidate, reference, weights, config, dtype, device)
    except _Mismatch as exc:
        return str(exc)
    except Exception as exc:  # a backend that crashes is as unusable as a wrong one
        return f"{type(exc).__name__}: {exc}"
    return None


def _compare(what: str, ours: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    if ours.shape != ref.shape or ours.dtype != ref.dtype:
        raise _Mismatch(
            f"{what}: got {ours.dtype} {list(ours.shape)}, expected {ref.dtype} {list(ref.shape)}"
        )
    bound = TOLERANCE.get(dtype, TOLERANCE[torch.bfloat16])
    error = max_relative_error(ours, ref)
    if not error <= bound:  # NaN fails too
        raise _Mismatch(f"{what}: max relative error {error:.3g} > {bound:g}")


def _randn(g: torch.Generator, *shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.randn(shape, generator=g, dtype=torch.float32, device=device).to(dtype)


def _first_experts(experts: ExpertWeights, n: int) -> ExpertWeights:
    """A new ``ExpertWeights`` of the first n experts (views), so that preparing it touches
    neither the layer's object nor its tensors."""

    def head(value: Any) -> Any:
        return value[:n] if isinstance(value, (torch.Tensor, list)) else value

    return dataclasses.replace(
        experts, **{f.name: head(getattr(experts, f.name)) for f in dataclasses.fields(experts)}
    )


def _check_moe(
    candidate: Kernels,
    reference: Kernels,
    weights: ModelWeights,
    config: ModelConfig,
    dtype: torch.dtype,
    device: torch.device,
) -> None:
    experts = weights.layers[0].experts
    n = min(MOE_EXPERTS, experts.mlp1_bias.shape[0])
    small = config.replace(num_experts=n, experts_per_token=min(config.experts_per_token, n))
    k = small.experts_per_token
    ours = candidate.prepare_experts(_first_experts(experts, n), small)
    ref = reference.prepare_experts(_first_experts(experts, n), small)
    g = torch.Generator(device=device).manual_seed(0)
    for rows in MOE_ROWS:
        x = _randn(g, rows, config.hidden_size, dtype=dtype, device=device)
        # Distinct experts per row, as the router's top-k gives.
        ids = torch.rand((rows, n), generator=g, device=device).argsort(dim=-1)[:, :k]
        routing = torch.softmax(torch.randn((rows, k), generator=g, device=device), dim=-1)
        _compare(
            f"moe ({rows} rows)",
            candidate.moe(x, routing, ids, ours, small),
            reference.moe(x, routing, ids, ref, small),
            dtype,
        )


def _mixed_meta(table: torch.Tensor | None, device: torch.device) -> BatchMetadata:
    batch = MIXED_BATCH if table is not None else ((0, PREFILL_ONLY),)
    query_lens = [new for _, new in batch]
    context_lens = [cached for cached, _ in batch]
    positions = torch.cat([torch.arange(c, c + n, device=device) for c, n in batch])
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    return BatchMetadata(
        positions=positions,
        query_start=torch.tensor(starts, device=device),
        context_lens=torch.tensor(context_lens, device=device),
        full_block_table=table,
        sliding_block_table=table,
        logits_indices=torch.tensor([s - 1 for s in starts[1:]], device=device),
        query_lens_cpu=query_lens,
        context_lens_cpu=context_lens,
    )


def _mixed_table(device: torch.device) -> tuple[torch.Tensor, int]:
    """Each sequence of MIXED_BATCH its own blocks, consecutively -> (table, blocks used)."""
    rows: list[list[int]] = []
    used = 0
    for cached, new in MIXED_BATCH:
        n = -(-(cached + new) // BLOCK_SIZE)
        rows.append(list(range(used, used + n)))
        used += n
    width = max(len(r) for r in rows)
    padded = [r + [-1] * (width - len(r)) for r in rows]
    return torch.tensor(padded, dtype=torch.int32, device=device), used


def _check_attention(
    candidate: Kernels,
    reference: Kernels,
    weights: ModelWeights,
    config: ModelConfig,
    dtype: torch.dtype,
    device: torch.device,
) -> None:
    c = config
    sinks = weights.layers[0].sinks
    g = torch.Generator(device=device).manual_seed(1)
    table, num_blocks = _mixed_table(device)
    for cached in (True, False):
        for window in (None, WINDOW):
            meta = _mixed_meta(table if cached else None, device)
            plan = build_plan(meta, table if cached else None, BLOCK_SIZE, window)
            t = meta.positions.shape[0]
            q = _randn(g, t, c.num_heads, c.head_dim, dtype=dtype, device=device)
            k = _randn(g, t, c.num_kv_heads, c.head_dim, dtype=dtype, device=device)
            v = _randn(g, t, c.num_kv_heads, c.head_dim, dtype=dtype, device=device)
            shape = (c.num_kv_heads, num_blocks + 1, BLOCK_SIZE, c.head_dim)
            caches = [_randn(g, *shape, dtype=dtype, device=device) for _ in range(2)] if cached else None
            ours_caches = [x.clone() for x in caches] if caches else [None, None]
            ref_caches = [x.clone() for x in caches] if caches else [None, None]
            what = f"attention ({'mixed batch' if cached else 'prefill without cache'}, window {window})"
            _compare(
                what,
                candidate.attention(plan, q, k, v, *ours_caches, sinks, c.sm_scale),
                reference.attention(plan, q, k, v, *ref_caches, sinks, c.sm_scale),
                dtype,
            )
            if caches:
                for name, ours, ref in zip(("K", "V"), ours_caches, ref_caches, strict=True):
                    if not torch.equal(ours, ref):
                        raise _Mismatch(f"{what}: the {name} cache differs after the write")


def _check_linear(
    candidate: Kernels,
    reference: Kernels,
    weights: ModelWeights,
    config: ModelConfig,
    dtype: torch.dtype,
    device: torch.device,
) -> None:
    layer = weights.layers[0]
    g = torch.Generator(device=device).manual_seed(2)
    for what, weight, bias in (
        ("qkv projection", layer.qkv_weight, layer.qkv_bias),
        ("output projection", layer.out_weight, layer.out_bias),
    ):
        assert isinstance(weight, torch.Tensor)  # the check runs before the model is prepared
        x = _randn(g, 3, weight.shape[1], dtype=dtype, device=device)
        ours = candidate.linear(x, candidate.prepare_linear(weight), bias)
        _compare(what, ours, reference.linear(x, weight, bias), dtype)


def _check_norm_rope(
    candidate: Kernels,
    reference: Kernels,
    weights: ModelWeights,
    config: ModelConfig,
    dtype: torch.dtype,
    device: torch.device,
) -> None:
    from ..layers import YarnRope

    layer = weights.layers[0]
    g = torch.Generator(device=device).manual_seed(4)
    x = _randn(g, 3, config.hidden_size, dtype=dtype, device=device)
    eps = config.rms_norm_eps
    _compare("rms_norm", candidate.rms_norm(x, layer.attn_norm, eps), reference.rms_norm(x, layer.attn_norm, eps),
             dtype)  # fmt: skip
    positions = torch.tensor([0, 7, 4000], device=device)
    cos, sin = YarnRope(config, device).cos_sin(positions)
    q = _randn(g, 3, config.num_heads, config.head_dim, dtype=dtype, device=device)
    _compare("rope", candidate.rope(q, cos, sin), reference.rope(q, cos, sin), dtype)


def _check_lm_head(
    candidate: Kernels,
    reference: Kernels,
    weights: ModelWeights,
    config: ModelConfig,
    dtype: torch.dtype,
    device: torch.device,
) -> None:
    def head_only() -> ModelWeights:
        return dataclasses.replace(
            weights, layers=[], unembedding=weights.unembedding[:LM_HEAD_VOCAB], unembedding_prepacked=None
        )

    ours, ref = head_only(), head_only()
    candidate.prepare_lm_head(ours)
    reference.prepare_lm_head(ref)
    x = _randn(
        torch.Generator(device=device).manual_seed(3), 2, config.hidden_size, dtype=dtype, device=device
    )
    logits = candidate.lm_head(x, ours)
    _compare("lm head", logits, reference.lm_head(x, ref), dtype)
    # A backend's greedy path (possibly fused or screened) against its own logits: the same
    # tokens exactly, where the reference's rounding could break a near-tie either way.
    ids = candidate.lm_head_argmax(x, ours)
    if not torch.equal(ids, candidate.argmax(logits)):
        raise _Mismatch(
            f"lm head argmax: got {ids.tolist()}, its logits' argmax is {candidate.argmax(logits).tolist()}"
        )
