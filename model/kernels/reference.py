"""The reference backend: today's PyTorch code (``model/layers.py``,
``model/paged_attention.py``, ``model/prepacked.py``), called as it is.

It runs on every device and dtype, it is the oracle the parity tests and the startup
self-check compare other backends with, and it is what ``auto`` falls back to. A backend
that accelerates only some ops subclasses it and overrides those.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..layers import ExpertWeights, YarnRope, moe_routed, rms_norm
from ..paged_attention import AttentionPlan, paged_attention
from ..prepacked import HEAD_MIN_ROWS, PackedLinear, PrepackedLinear, prepack_available

if TYPE_CHECKING:
    from ..config import ModelConfig
    from ..transformer import ModelWeights
    from .base import Kernels

REFERENCE = "reference"
ARGMAX_CHUNK = 1024  # columns per chunk in greedy_argmax


def greedy_argmax(x: torch.Tensor) -> torch.Tensor:
    """``x.argmax(dim=-1)`` for [N, V] logits (the first index of each row's maximum, NaN
    counting as the maximum, as torch.argmax), in two passes that run at memory speed: the
    maximum of every chunk of ARGMAX_CHUNK columns, then the argmax inside each row's first
    best chunk. torch.argmax's CPU kernel is not vectorised: on 64 x 201088 logits it took
    5.4 ms where this takes 1.3 ms, which at batch 64 was most of the sampler's time."""
    n, v = x.shape
    chunk = ARGMAX_CHUNK
    if v <= chunk:
        return x.argmax(dim=-1)
    whole = v // chunk
    maxima = x[:, : whole * chunk].view(n, whole, chunk).amax(dim=-1)  # [N, whole]
    if whole * chunk < v:
        maxima = torch.cat([maxima, x[:, whole * chunk :].amax(dim=-1, keepdim=True)], dim=1)
    # Columns of each row's best chunk; the last chunk may be short, so clamp (a repeated
    # last column comes after its first copy and never changes the first index).
    cols = (maxima.argmax(dim=-1) * chunk)[:, None] + torch.arange(chunk, device=x.device)
    cols = cols.clamp_(max=v - 1)
    within = x.gather(1, cols).argmax(dim=-1, keepdim=True)
    return cols.gather(1, within).squeeze(1)


class ReferenceKernels:
    """``Kernels`` over the portable PyTorch ops; on the CPU in bf16, dense experts and the
    unembedding are reordered once for oneDNN (bit-identical results, see prepacked.py)."""

    name = REFERENCE

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        self.device = torch.device(device)
        self.dtype = dtype

    def fallback(self) -> Kernels | None:
        return None  # the last resort itself

    def _prepacks(self, weight: torch.Tensor | None) -> bool:
        return (
            weight is not None and weight.dtype == self.dtype and prepack_available(self.device, self.dtype)
        )

    def prepare_experts(self, experts: ExpertWeights, config: ModelConfig) -> ExpertWeights:
        # Packed MXFP4 experts are dequantized per use and have nothing to reorder.
        if self._prepacks(experts.mlp1_dense):
            experts.prepack()
        return experts

    def prepare_lm_head(self, weights: ModelWeights) -> None:
        if self._prepacks(weights.unembedding):
            weights.unembedding_prepacked = PrepackedLinear(weights.unembedding, HEAD_MIN_ROWS)

    def moe(
        self,
        x: torch.Tensor,
        routing_weights: torch.Tensor,
        expert_ids: torch.Tensor,
        experts: ExpertWeights,
        config: ModelConfig,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        result = moe_routed(x, routing_weights, expert_ids, experts, config)
        return result if out is None else out.copy_(result)

    def attention(
        self,
        plan: AttentionPlan,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor | None,
        v_cache: torch.Tensor | None,
        sinks: torch.Tensor,
        sm_scale: float,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return paged_attention(plan, q, k, v, k_cache, v_cache, sinks, sm_scale, out=out)

    def prepare_linear(self, weight: torch.Tensor) -> torch.Tensor | PackedLinear:
        # Prepacking the projections for oneDNN saved ~1% of a decode step and, beside the
        # loaded weights, cost 1.3 GB more memory on the 20b (see GptOssModel.prepack).
        return weight

    def linear(
        self, x: torch.Tensor, weight: torch.Tensor | PackedLinear, bias: torch.Tensor | None
    ) -> torch.Tensor:
        if not isinstance(weight, torch.Tensor):
            return weight(x, bias)
        return torch.nn.functional.linear(x, weight, bias)

    def rms_norm(self, x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
        return rms_norm(x, scale, eps)

    def rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return YarnRope.apply(x, cos, sin)

    def lm_head(self, x: torch.Tensor, weights: ModelWeights) -> torch.Tensor:
        if weights.unembedding_prepacked is not None:
            return weights.unembedding_prepacked(x)
        return torch.nn.functional.linear(x, weights.unembedding)

    def lm_head_argmax(self, x: torch.Tensor, weights: ModelWeights) -> torch.Tensor:
        return self.argmax(self.lm_head(x, weights))

    def argmax(self, logits: torch.Tensor) -> torch.Tensor:
        return greedy_argmax(logits)
