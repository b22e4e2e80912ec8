"""The reference backend: today's PyTorch code (``model/layers.py``,
``model/paged_attention.py``, ``model/prepacked.py``), called as it is.

It runs on every device and dtype, it is the oracle the parity tests and the startup
self-check compare other backends with, and it is what ``auto`` falls back to. A backend
that accelerates only some ops subclasses it and overrides those.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..layers import ExpertWeights, moe_routed
from ..paged_attention import AttentionPlan, paged_attention
from ..prepacked import PrepackedLinear, prepack_available

if TYPE_CHECKING:
    from ..config import ModelConfig
    from ..transformer import ModelWeights

REFERENCE = "reference"


class ReferenceKernels:
    """``Kernels`` over the portable PyTorch ops; on the CPU in bf16, dense experts and the
    unembedding are reordered once for oneDNN (bit-identical results, see prepacked.py)."""

    name = REFERENCE

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        self.device = torch.device(device)
        self.dtype = dtype

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
            weights.unembedding_prepacked = PrepackedLinear(weights.unembedding)

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

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return torch.nn.functional.linear(x, weight, bias)

    def lm_head(self, x: torch.Tensor, weights: ModelWeights) -> torch.Tensor:
        if weights.unembedding_prepacked is not None:
            return weights.unembedding_prepacked(x)
        return torch.nn.functional.linear(x, weights.unembedding)
