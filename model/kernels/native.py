"""The ``native-cpu`` backend: the reference everywhere but the experts, whose MXFP4 weights
``model/kernels/native_cpu/`` multiplies packed (its ``PackedExperts`` and ``moe_experts``),
decode attention, which reads the paged cache in place (``paged_decode_attention``; fp32,
and bf16 where the CPU has AVX-512 BF16), RMSNorm and RoPE in one pass each, and the bf16
projections and LM head, whose greedy tokens read an 8-bit screen of it.

Imported by ``select.py`` only for a CPU device, after ``native_cpu.available()`` said yes,
so nothing here is loaded on a GPU machine. Dense experts (``--dequantize-experts``, the
bf16 export) have nothing packed to read and keep the reference's path.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch

from ..config import ModelConfig
from ..layers import ExpertWeights
from ..paged_attention import AttentionPlan, DecodeGroup, attend_decode_group, paged_attention
from .reference import ReferenceKernels
from .select import NATIVE_CPU

if TYPE_CHECKING:
    from ..prepacked import PackedLinear
    from ..transformer import ModelWeights

NATIVE_DTYPES = (torch.float32, torch.bfloat16)  # what moe_experts computes in
# Where paged_decode_attention beats the reference's gather + matmuls (bench/attention_kernel.py,
# AMD EPYC, 2026-12-03): fp32 1.3-2.7x at batch 16-64. In bf16 it wins only with its AVX-512
# BF16 dot-product path (the widening path lost to oneDNN's bf16 matmuls below ~512 keys,
# 0.67-0.81x), so bf16 goes native only where the CPU has that path.
NATIVE_ATTENTION_DTYPES = (torch.float32,)
NATIVE_ATTENTION_BF16_DOT_DTYPES = (torch.float32, torch.bfloat16)
# bf16 projections and the LM head are laid out once for linear_interleaved (one copy, the
# loaded weight released): on the AMD EPYC, 2026-12-07, the small preset's [201088, 640] head
# took 7.9 ms at 1 row against oneDNN's prepacked 10.2, and 0.93, 0.89 and 0.95 of oneDNN's time
# at 4, 16 and 64 rows; the 20b's [201088, 2880] 0.79-0.90 at 1-16 rows; the projections
# 0.92-0.97 of F.linear's time for 512- and 2048-row prefill chunks and 0.3-0.8 for 1-64 rows
# (bench/linear_kernel.py). ``linear`` and ``lm_head`` are the reference's, which call a
# prepared weight; weights left plain (fp32 models) take its F.linear.


@dataclass
class NativeExperts(ExpertWeights):
    """One layer's experts as the native kernel reads them: the biases as loaded and the
    MXFP4 bytes re-laid out once in ``native`` (a ``native_cpu.PackedExperts``, the same size
    as the checkpoint's); the checkpoint's own blocks and scales are dropped, nothing reads
    them again."""

    native: Any = None


class NativeCpuKernels(ReferenceKernels):
    name = NATIVE_CPU

    def __init__(
        self, device: torch.device, dtype: torch.dtype, native_cpu: ModuleType, isa: str | None = None
    ) -> None:
        super().__init__(device, dtype)
        self.native_cpu = native_cpu
        # The CPU path (one of native_cpu.ISAS): the best this CPU runs (or what
        # GPTOSS_NATIVE_MOE_ISA allows), or lower where ``fallback`` capped it.
        best = native_cpu.isa()
        self.isa = best if isa is None else min(isa, best, key=native_cpu.ISAS.index)
        # Asked once: the per-call check takes the loader's lock, twice per layer per step.
        self.bf16_dot = native_cpu.bf16_dot_available(self.isa)
        self.screens = native_cpu.screen_available(self.isa)
        # The dtypes whose decode attention runs in the kernel (a bench may narrow it to A/B).
        self.attention_dtypes = NATIVE_ATTENTION_BF16_DOT_DTYPES if self.bf16_dot else NATIVE_ATTENTION_DTYPES
        # Calls left before the head's screen is tried again, per mode (two digits or one).
        self._screen_paused = {True: 0, False: 0}

    def fallback(self) -> NativeCpuKernels | None:
        # A kernel wrong on one CPU path (say AMX, on a machine kind CI never saw) need not send
        # the whole server to the reference: the next path down is tried, each self-checked.
        level = self.native_cpu.ISAS.index(self.isa)
        if level == 0:
            return None
        return NativeCpuKernels(self.device, self.dtype, self.native_cpu, self.native_cpu.ISAS[level - 1])

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
            x, routing_weights, expert_ids, experts.native, config.swiglu_alpha, config.swiglu_limit, out=out,
            isa=self.isa,
        )  # fmt: skip

    def prepare_lm_head(self, weights: ModelWeights) -> None:
        w = weights.unembedding
        if self._interleaves(w):
            # The 8-bit screen beside the bf16 copy (half its size again) for greedy rows: on the
            # AMD EPYC, 2026-12-07, 0.51-0.54 of the fused argmax's time at 1-4 rows on the small
            # preset's [201088, 640] head and 0.52-0.56 at 1-2 on the 20b's; 0.75 at 16 rows and
            # 0.66 at 64 on the small one (bench/linear_kernel.py).
            screens = self.screens and w.shape[1] % 4 == 0
            kind = self.native_cpu.ScreenedHead if screens else self.native_cpu.InterleavedLinear
            weights.unembedding_prepacked = kind(w)
            return
        super().prepare_lm_head(weights)

    def lm_head_argmax(self, x: torch.Tensor, weights: ModelWeights) -> torch.Tensor:
        head = weights.unembedding_prepacked
        if isinstance(head, self.native_cpu.ScreenedHead) and self._screens(x.shape[0]):
            screened = self.native_cpu.screened_argmax(x, head)
            if screened is not None:
                ids, recomputed = screened
                self._judge_screen(x.shape[0], recomputed, head.weight.shape[0])
                return ids
        if isinstance(head, self.native_cpu.InterleavedLinear):
            return self.native_cpu.linear_interleaved(x, head, argmax=True)  # no logits written
        return super().lm_head_argmax(x, weights)

    # The screen pays only while what its bound admits costs less than the bf16 kernel's read,
    # which depends on the model's logits. So each mode (two digits: up to 4 rows; one: wider)
    # watches what it recomputes on this model and stands aside for SCREEN_PAUSE_CALLS calls
    # after a call that recomputed too much (and more than a few groups: a small head costs
    # nothing either way).
    # - One digit: random weights at the 20b's width admitted 30-40% of the groups per row (2.5-
    #   2.9x the bf16 kernel's time), the small preset's under 1%: above 1/32 per row, it pauses.
    # - Two digits: the screen alone takes 0.52-0.72 of the bf16 kernel's time, and each (group,
    #   row) recomputed about 1/14,000 of it on the 20b's head (AMD EPYC, 2026-12-08: 2.3 us
    #   against 33 ms at 4 rows); recomputing half the head's groups over all rows took 1.11x
    #   the bf16 kernel's time. It pauses above a quarter. The 20b's random checkpoint
    #   recomputes 0.4-3.6% per row at 1-4 rows: a limit of 1/32 per row paused it within 17-45
    #   calls, for 18 ms a step more at batch 1.
    SCREEN_MAX_RECOMPUTED = 1 / 32
    SCREEN_MAX_RECOMPUTED_TWO_DIGITS = 1 / 4
    SCREEN_MIN_RECOMPUTED_GROUPS = 64
    SCREEN_PAUSE_CALLS = 256

    def _screens(self, rows: int) -> bool:
        mode = rows <= self.native_cpu.SCREEN_TWO_DIGIT_ROWS
        if self._screen_paused[mode] > 0:
            self._screen_paused[mode] -= 1
            return False
        return True

    def _judge_screen(self, rows: int, recomputed: int, groups: int) -> None:
        two_digits = rows <= self.native_cpu.SCREEN_TWO_DIGIT_ROWS
        if two_digits:
            limit = max(groups * self.SCREEN_MAX_RECOMPUTED_TWO_DIGITS, self.SCREEN_MIN_RECOMPUTED_GROUPS)
        else:
            limit = rows * max(groups * self.SCREEN_MAX_RECOMPUTED, self.SCREEN_MIN_RECOMPUTED_GROUPS)
        if recomputed > limit:
            self._screen_paused[two_digits] = self.SCREEN_PAUSE_CALLS

    def argmax(self, logits: torch.Tensor) -> torch.Tensor:
        if self.bf16_dot and logits.dtype in NATIVE_DTYPES and logits.device.type == "cpu":
            return self.native_cpu.argmax_rows(logits)
        return super().argmax(logits)

    def _interleaves(self, weight: torch.Tensor) -> bool:
        return (
            self.bf16_dot
            and weight.device.type == "cpu"
            and weight.dtype == torch.bfloat16
            and weight.dim() == 2
            and weight.shape[1] % 2 == 0
        )

    def prepare_linear(self, weight: torch.Tensor) -> torch.Tensor | PackedLinear:
        if self._interleaves(weight):
            return self.native_cpu.InterleavedLinear(weight)
        return super().prepare_linear(weight)

    def _native_rows(self, x: torch.Tensor) -> bool:  # the wrappers take any strides
        return x.device.type == "cpu" and x.dtype in NATIVE_DTYPES

    def rms_norm(self, x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
        if self._native_rows(x) and x.dim() == 2:
            return self.native_cpu.rms_norm(x, scale, eps)
        return super().rms_norm(x, scale, eps)

    def rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self._native_rows(x) and x.dim() == 3:
            return self.native_cpu.rope(x, cos, sin)
        return super().rope(x, cos, sin)

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
        return paged_attention(plan, q, k, v, k_cache, v_cache, sinks, sm_scale, out=out,
                               decode_group=self._decode_group)  # fmt: skip

    def _decode_group(
        self,
        g: DecodeGroup,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        sinks: torch.Tensor,
        sm_scale: float,
        out: torch.Tensor,
    ) -> None:
        native = (
            q.dtype in self.attention_dtypes
            and k_cache.dtype == q.dtype
            and out.dtype == q.dtype
            and out.is_contiguous()
            and k_cache.is_contiguous()
            and v_cache.is_contiguous()
        )
        if not native:
            return attend_decode_group(g, q, k_cache, v_cache, sinks, sm_scale, out)
        self.native_cpu.paged_decode_attention(
            q, k_cache, v_cache, g.rows, g.blocks, g.mask, sinks, sm_scale, out
        )
        return None
