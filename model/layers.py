"""The pieces of one gpt-oss layer that do not touch the KV cache: RMSNorm, YaRN RoPE,
attention with sinks over given keys, and the mixture of experts."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import ModelConfig
from .mxfp4 import dequantize_mxfp4
from .prepacked import PrepackedLinear


def rms_norm(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """fp32 statistics and fp32 scale, result in the input dtype (as REF and HF)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (scale * h).to(x.dtype)


# Rows per pass of the RoPE rotation (see YarnRope.apply).
ROPE_ROWS = 256


class YarnRope:
    """YaRN RoPE, half-split (NeoX): frequency i rotates the pair (i, i + head_dim/2).
    cos and sin both carry the concentration 0.1*ln(factor)+1, so logits scale by its square.
    low/high are NOT rounded (truncate=false); formulas and operation order follow HFR."""

    def __init__(self, config: ModelConfig, device: torch.device | str = "cpu") -> None:
        dim, base, factor = config.head_dim, config.rope_theta, config.rope_scaling_factor
        original = config.initial_context_length

        def correction_dim(num_rotations: float) -> float:
            return (dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

        low = max(correction_dim(config.rope_beta_fast), 0)
        high = min(correction_dim(config.rope_beta_slow), dim - 1)
        if low == high:
            high += 0.001
        pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
        extrapolation = 1.0 / pos_freqs
        interpolation = 1.0 / (factor * pos_freqs)
        ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
        extrapolation_factor = 1 - ramp
        self.inv_freq = (
            interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor
        ).to(device)
        self.concentration = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[T] positions -> cos, sin [T, head_dim/2] in fp32."""
        freqs = positions[:, None].float() * self.inv_freq.to(positions.device)
        return freqs.cos() * self.concentration, freqs.sin() * self.concentration

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [T, heads, head_dim] (any float dtype), cos/sin [T, head_dim/2] -> x rotated, in
        x's dtype. The rotation is computed in fp32 and rounded once (the references compute
        it in x's dtype). Rows go ROPE_ROWS at a time: on a long prefill a layer's queries
        are tens of MB, and fp32 temporaries that size would each be fresh memory (slow to
        touch on the CPU) where chunk-sized ones are reused and stay in cache."""
        half = x.shape[-1] // 2
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        for r0 in range(0, x.shape[0], ROPE_ROWS):
            r1 = min(x.shape[0], r0 + ROPE_ROWS)
            xs = x[r0:r1].float()
            c, s = cos[r0:r1, None, :], sin[r0:r1, None, :]
            first, second = xs[..., :half], xs[..., half:]
            rot = torch.empty(xs.shape, device=x.device)
            rot_first, rot_second = rot[..., :half], rot[..., half:]
            torch.mul(first, c, out=rot_first)
            rot_first.sub_(second * s)
            torch.mul(second, c, out=rot_second)
            rot_second.add_(first * s)
            out[r0:r1] = rot  # rounded once to x's dtype
        return out


def attention_with_sinks(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    sinks: torch.Tensor,
    sm_scale: float,
) -> torch.Tensor:
    """Grouped-query attention with one learned sink logit per head, all in fp32.

    q [B, Tq, H, D]; k, v [B, KVH, Tk, D] (head-major, as gathered from the cache);
    mask [B, Tq, Tk] bool (True = may attend);
    sinks [H]. Query head h uses KV head h // (H/KVH). Returns [B, Tq, H, D] fp32.
    The sink is an extra softmax column (never scaled, never masked) that is then dropped,
    so the weights over real keys sum to less than one.
    """
    b, tq, h, d = q.shape
    kvh, tk = k.shape[1], k.shape[2]
    g = h // kvh
    # The G query heads of a KV head are stacked as rows of one matmul against that head's
    # keys, so K and V are never broadcast (copied) G times.
    qg = q.float().view(b, tq, kvh, g, d).permute(0, 2, 3, 1, 4).reshape(b, kvh, g * tq, d)
    scores = (torch.matmul(qg, k.float().transpose(-1, -2)) * sm_scale).view(b, kvh, g, tq, tk)
    scores = scores.masked_fill(~mask[:, None, None], float("-inf"))
    # Softmax over [scores, sink] without materialising the extra column.
    sink = sinks.float().view(1, kvh, g, 1, 1)
    row_max = torch.maximum(scores.amax(dim=-1, keepdim=True), sink)
    probs = torch.exp(scores - row_max)
    probs = probs / (probs.sum(dim=-1, keepdim=True) + torch.exp(sink - row_max))
    out = torch.matmul(probs.view(b, kvh, g * tq, tk), v.float()).view(b, kvh, g, tq, d)
    return out.permute(0, 3, 1, 2, 4).reshape(b, tq, h, d)


def _cpu_flash_attention_op():
    """PyTorch's fused CPU attention kernel that also returns the log-sum-exp (None if this
    build has none). Private to ATen, hence looked up defensively."""
    return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def fused_attention_with_sinks(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    sinks: torch.Tensor,
    sm_scale: float,
) -> torch.Tensor:
    """``attention_with_sinks`` through a fused (flash) kernel, same arguments and result.

    The kernel knows nothing of sinks, but it returns each row's log-sum-exp L over the real
    keys, and a sink S only rescales the softmax: weights with the sink are the weights
    without it times sum(e^s) / (sum(e^s) + e^S) = sigmoid(L - S). Exact maths, fp32, no
    score tensor in memory. Used where the kernel exists (the CPU); ``attention_with_sinks``
    stays the portable reference it is tested against.
    """
    op = _cpu_flash_attention_op()
    if op is None or q.device.type != "cpu":
        return attention_with_sinks(q, k, v, mask, sinks, sm_scale)
    qh = q.float().transpose(1, 2)  # [B, H, Tq, D]
    # Grouped-query attention natively: query head h reads KV head h // (H / KVH).
    kh, vh = k.float(), v.float()
    bias = torch.zeros(mask.shape, dtype=torch.float32, device=q.device)
    bias = bias.masked_fill_(~mask, float("-inf"))[:, None]  # [B, 1, Tq, Tk]
    out, lse = op(qh, kh, vh, 0.0, False, attn_mask=bias, scale=sm_scale)
    keep = torch.sigmoid(lse - sinks.float().view(1, -1, 1))  # [B, H, Tq]
    return (out * keep[..., None]).transpose(1, 2)


@dataclass
class ExpertWeights:
    """One layer's experts. Either packed MXFP4 in [E, out, in] order (dequantized per use),
    dense in the HF export's [E, in, out] order (``x @ w``), or, on the CPU in bf16, dense
    weights prepacked for oneDNN (``prepack``)."""

    mlp1_bias: torch.Tensor  # [E, 2I], gate/up interleaved (even = gate, odd = up)
    mlp2_bias: torch.Tensor  # [E, H]
    mlp1_blocks: torch.Tensor | None = None  # [E, 2I, H/32, 16] uint8
    mlp1_scales: torch.Tensor | None = None  # [E, 2I, H/32] uint8
    mlp2_blocks: torch.Tensor | None = None  # [E, H, I/32, 16] uint8
    mlp2_scales: torch.Tensor | None = None  # [E, H, I/32] uint8
    mlp1_dense: torch.Tensor | None = None  # [E, H, 2I]
    mlp2_dense: torch.Tensor | None = None  # [E, I, H]
    prepacked: list[tuple[PrepackedLinear, PrepackedLinear]] | None = None  # per expert: mlp1, mlp2

    @property
    def packed(self) -> bool:
        """Held as MXFP4 (dequantized per use)."""
        return self.mlp1_blocks is not None

    def mlp1(self, e: int, dtype: torch.dtype) -> torch.Tensor:
        """Expert e's first projection as [H, 2I] (so that h = x @ w)."""
        if self.mlp1_dense is not None:
            return self.mlp1_dense[e]
        assert self.mlp1_blocks is not None and self.mlp1_scales is not None
        return dequantize_mxfp4(self.mlp1_blocks[e], self.mlp1_scales[e], dtype).t()

    def mlp2(self, e: int, dtype: torch.dtype) -> torch.Tensor:
        """Expert e's second projection as [I, H]."""
        if self.mlp2_dense is not None:
            return self.mlp2_dense[e]
        assert self.mlp2_blocks is not None and self.mlp2_scales is not None
        return dequantize_mxfp4(self.mlp2_blocks[e], self.mlp2_scales[e], dtype).t()

    def dequantize_all(self, dtype: torch.dtype) -> None:
        """Replace the packed tensors by dense ones (faster, ~4x the memory in bf16)."""
        if not self.packed:
            return
        num_experts = self.mlp1_bias.shape[0]
        self.mlp1_dense = torch.stack([self.mlp1(e, dtype).contiguous() for e in range(num_experts)])
        self.mlp2_dense = torch.stack([self.mlp2(e, dtype).contiguous() for e in range(num_experts)])
        self.mlp1_blocks = self.mlp1_scales = self.mlp2_blocks = self.mlp2_scales = None

    def prepack(self) -> None:
        """Replace dense weights by oneDNN-prepacked ones (same results, faster on the CPU;
        see model/prepacked.py). The dense tensors are dropped, so memory does not grow."""
        assert self.mlp1_dense is not None and self.mlp2_dense is not None, "dequantize first"
        self.prepacked = [
            (PrepackedLinear(self.mlp1_dense[e].t()), PrepackedLinear(self.mlp2_dense[e].t()))
            for e in range(self.mlp1_dense.shape[0])
        ]
        self.mlp1_dense = self.mlp2_dense = None

    def project1(self, e: int, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """x @ mlp1_e + bias, for x [n, H] rows of expert e -> [n, 2I]."""
        if self.prepacked is not None:
            return self.prepacked[e][0](x, bias)
        return torch.addmm(bias, x, self.mlp1(e, x.dtype))

    def project2(self, e: int, a: torch.Tensor, bias: torch.Tensor, out: torch.Tensor) -> None:
        """out = a @ mlp2_e + bias, for a [n, I] rows of expert e."""
        if self.prepacked is not None:
            out.copy_(self.prepacked[e][1](a, bias))
        else:
            torch.addmm(bias, a, self.mlp2(e, a.dtype), out=out)


def swiglu(h: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """Clamped SwiGLU on interleaved [..., 2I]: gate = even, up = odd; gate clamped above
    only, up both sides, and the up branch gets +1."""
    gate = h[..., ::2].clamp(max=limit)
    up = h[..., 1::2].clamp(min=-limit, max=limit).add_(1)
    # In place on the fresh tensors (on a prefill these are tens of MB each).
    return torch.sigmoid(gate * alpha).mul_(gate).mul_(up)


def route(
    y: torch.Tensor, router_weight: torch.Tensor, router_bias: torch.Tensor, top_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Router in fp32: top-k of the raw logits, then softmax over just those k.
    Returns (weights [T, k] fp32, expert ids [T, k] int64)."""
    logits = torch.nn.functional.linear(y.float(), router_weight.float(), router_bias.float())
    top_values, top_ids = torch.topk(logits, top_k, dim=-1, sorted=True)
    return torch.softmax(top_values, dim=-1), top_ids


# Up to this many rows per expert, expert matmuls are bound by reading the weights, so the
# experts run as one batched matmul over rows padded to the busiest expert (padding is free
# there, and one call beats one per expert: batch-64 decode MoE 116 -> 91 ms on the CPU).
# Above it (prefill), padding would cost real FLOPs, so experts run one by one.
BATCHED_EXPERT_ROWS = 32
# Rows per expert from which each expert runs its matmul-SwiGLU-matmul on its own (a long
# prefill's activations then stay in cache: 8% faster 2048-token steps on the CPU); below
# it one SwiGLU call serves all experts (decode: fewer calls).
FUSED_EXPERT_ROWS = 64


def moe(
    y: torch.Tensor,
    experts: ExpertWeights,
    router_weight: torch.Tensor,
    router_bias: torch.Tensor,
    config: ModelConfig,
) -> torch.Tensor:
    """y [T, H] (normed) -> sum over the chosen experts of w_e * expert_e(y), in y's dtype:
    the router, then ``moe_routed``."""
    weights, ids = route(y, router_weight, router_bias, config.experts_per_token)
    return moe_routed(y, weights, ids, experts, config)


def moe_routed(
    y: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    experts: ExpertWeights,
    config: ModelConfig,
) -> torch.Tensor:
    """y [T, H] (normed), routing weights [T, k] fp32 and expert ids [T, k] (``route``) ->
    sum over the chosen experts of w_e * expert_e(y), in y's dtype.

    The T*k (token, expert) pairs are sorted by expert (one sort) and their inputs gathered
    once; the experts then run (see BATCHED_EXPERT_ROWS), and the routing weights and the
    scatter back to tokens run once over all pairs. The per-expert counts need one host sync.
    """
    t, k = y.shape[0], ids.shape[1]
    flat_ids = ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)
    counts = torch.bincount(flat_ids, minlength=config.num_experts)
    counts_list = counts.tolist()
    token_of = order // k
    x = y.index_select(0, token_of)  # [T*k, H], expert by expert
    if experts.mlp1_dense is None or max(counts_list) > BATCHED_EXPERT_ROWS:
        o = _experts_one_by_one(x, counts_list, experts, config)
    else:
        o = _experts_batched(x, counts, flat_ids[order], max(counts_list), experts, config)
    weighted = o.float() * weights.reshape(-1)[order][:, None]
    out = torch.zeros(t, y.shape[1], dtype=torch.float32, device=y.device)
    return out.index_add_(0, token_of, weighted).to(y.dtype)


def _experts_one_by_one(
    x: torch.Tensor, counts: list[int], experts: ExpertWeights, config: ModelConfig
) -> torch.Tensor:
    """x [P, H] rows grouped by expert -> [P, H]. Only the experts that received rows run
    (and, when MXFP4, get dequantized): two matmuls each, the SwiGLU between them."""
    mlp1_bias = experts.mlp1_bias.to(x.dtype)
    mlp2_bias = experts.mlp2_bias.to(x.dtype)
    spans = []
    start = 0
    for e, n in enumerate(counts):
        if n:
            spans.append((e, slice(start, start + n)))
            start += n
    o = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.shape[0] >= FUSED_EXPERT_ROWS * len(spans):
        # Many rows per expert (prefill): matmul, SwiGLU, matmul expert by expert, so each
        # expert's activations are still in cache for its second matmul.
        for e, rows in spans:
            h = experts.project1(e, x[rows], mlp1_bias[e])
            experts.project2(e, swiglu(h, config.swiglu_alpha, config.swiglu_limit), mlp2_bias[e], o[rows])
        return o
    # Few rows per expert (decode): one SwiGLU over all rows rather than one call per expert.
    h = torch.cat([experts.project1(e, x[rows], mlp1_bias[e]) for e, rows in spans])
    a = swiglu(h, config.swiglu_alpha, config.swiglu_limit)
    for e, rows in spans:
        experts.project2(e, a[rows], mlp2_bias[e], o[rows])
    return o


def _experts_batched(
    x: torch.Tensor,
    counts: torch.Tensor,
    expert_of: torch.Tensor,
    max_rows: int,
    experts: ExpertWeights,
    config: ModelConfig,
) -> torch.Tensor:
    """Same result as ``_experts_one_by_one`` for dense experts, as two batched matmuls over
    [E, max_rows, .] inputs (row r of expert e's block = its r-th row in x, zeros after)."""
    assert experts.mlp1_dense is not None and experts.mlp2_dense is not None
    num_experts = counts.shape[0]
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(x.shape[0], device=x.device) - starts[expert_of]
    padded = x.new_zeros(num_experts, max_rows, x.shape[1])
    padded[expert_of, slot] = x
    h = torch.baddbmm(experts.mlp1_bias.to(x.dtype)[:, None, :], padded, experts.mlp1_dense)
    a = swiglu(h, config.swiglu_alpha, config.swiglu_limit)
    o = torch.baddbmm(experts.mlp2_bias.to(x.dtype)[:, None, :], a, experts.mlp2_dense)
    return o[expert_of, slot]
