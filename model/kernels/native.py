"""The ``native-cpu`` backend: the reference everywhere but the experts, whose MXFP4 weights
``model/kernels/native_cpu/`` multiplies packed (its ``PackedExperts`` and ``moe_experts``).

Imported by ``select.py`` only for a CPU device, after ``native_cpu.available()`` said yes,
so nothing here is loaded on a GPU machine. Dense experts (``--dequantize-experts``, the
bf16 export) have nothing packed to read and keep the reference's path.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch

from ..config import ModelConfig
from ..layers import ExpertWeights
from .reference import ReferenceKernels
from .select import NATIVE_CPU

NATIVE_DTYPES = (torch.float32, torch.bfloat16)  # what moe_experts computes in


@dataclass
class NativeExperts(ExpertWeights):
    """One layer's experts as the native kernel reads them: the biases as loaded and the
    MXFP4 bytes re-laid out once in ``native`` (a ``native_cpu.PackedExperts``, the same size
    as the checkpoint's); the checkpoint's own blocks and scales are dropped, nothing reads
    them again."""

    native: Any = None


class NativeCpuKernels(ReferenceKernels):
    name = NATIVE_CPU

    def __init__(self, device: torch.device, dtype: torch.dtype, native_cpu: ModuleType) -> None:
        super().__init__(device, dtype)
        self.native_cpu = native_cpu

    def prepare_experts(self, experts: ExpertWeights, config: ModelConfig) -> ExpertWeights:
        if not experts.packed:
            return super().prepare_experts(experts, config)
        return NativeExperts(
            mlp1_bias=experts.mlp1_bias,
            mlp2_bias=experts.mlp2_bias,
            native=self.native_cpu.PackedExperts.from_expert_weights(experts),
        )

    def moe(
        self,
        x: torch.Tensor,
        routing_weights: torch.Tensor,
        expert_ids: torch.Tensor,
        experts: ExpertWeights,
        config: ModelConfig,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if not isinstance(experts, NativeExperts):
            return super().moe(x, routing_weights, expert_ids, experts, config, out)
        return self.native_cpu.moe_experts(
            x, routing_weights, expert_ids, experts.native, config.swiglu_alpha, config.swiglu_limit, out=out
        )
