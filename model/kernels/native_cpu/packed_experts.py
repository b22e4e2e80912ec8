"""The experts' MXFP4 bytes in the layout ``moe.cpp`` reads (built once per layer at load)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from model.layers import ExpertWeights

# Scale bytes the tiles (AMX, decoded bf16) can fold into bf16 exponents exactly (see moe.cpp).
_FOLDABLE_SCALES = (2, 252)


def _interleave_rows(blocks: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[E, R, G, 16] nibbles and [E, R, G] scales -> [E, R/16, G, 16, 16] (byte column outer,
    16 rows inner) and [E, R/16, G, 16]: one 16-byte load = one byte of 16 rows."""
    e, r, g, _ = blocks.shape
    w = blocks.reshape(e, r // 16, 16, g, 16).permute(0, 1, 3, 4, 2).contiguous()
    s = scales.reshape(e, r // 16, 16, g).permute(0, 1, 3, 2).contiguous()
    return w, s


class PackedExperts:
    """One layer's MXFP4 experts in the kernel's layout (built once, at load).

    Holds the same bytes as the checkpoint's blocks and scales, re-laid out (about 4.25 bits
    per weight; no dense copy), and the biases in fp32. The caller may drop its own packed
    tensors afterwards.
    """

    def __init__(
        self,
        mlp1_blocks: torch.Tensor,
        mlp1_scales: torch.Tensor,
        mlp1_bias: torch.Tensor,
        mlp2_blocks: torch.Tensor,
        mlp2_scales: torch.Tensor,
        mlp2_bias: torch.Tensor,
    ) -> None:
        e, two_i, g1, nb = mlp1_blocks.shape
        if nb != 16 or mlp1_scales.shape != (e, two_i, g1):
            raise ValueError(f"mlp1 blocks/scales {tuple(mlp1_blocks.shape)}/{tuple(mlp1_scales.shape)}")
        hidden = g1 * 32
        inter = two_i // 2
        if mlp2_blocks.shape != (e, hidden, inter // 32, 16) or mlp2_scales.shape != (e, hidden, inter // 32):
            raise ValueError(f"mlp2 blocks/scales {tuple(mlp2_blocks.shape)}/{tuple(mlp2_scales.shape)}")
        if mlp1_bias.shape != (e, two_i) or mlp2_bias.shape != (e, hidden):
            raise ValueError(f"biases {tuple(mlp1_bias.shape)}/{tuple(mlp2_bias.shape)}")
        if inter % 32 or hidden % 32:
            raise ValueError("hidden and intermediate sizes must be multiples of 32")
        for t in (mlp1_blocks, mlp1_scales, mlp2_blocks, mlp2_scales):
            if t.dtype != torch.uint8 or t.device.type != "cpu":
                raise TypeError("MXFP4 blocks and scales must be uint8 CPU tensors")
        self.num_experts, self.hidden_size, self.intermediate_size = e, hidden, inter
        self.w1, self.s1 = _interleave_rows(mlp1_blocks, mlp1_scales)
        self.w2, self.s2 = _interleave_rows(mlp2_blocks, mlp2_scales)
        self._bias_source = (mlp1_bias.detach(), mlp2_bias.detach())
        self._biases: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}
        lo, hi = _FOLDABLE_SCALES
        self.scales_foldable = all(int(s.min()) >= lo and int(s.max()) <= hi for s in (self.s1, self.s2))

    @classmethod
    def from_expert_weights(cls, experts: ExpertWeights) -> PackedExperts:
        """From a layer's packed ``ExpertWeights`` (raises ValueError if they are dense)."""
        if not experts.packed:
            raise ValueError("PackedExperts needs MXFP4 (packed) expert weights")
        assert experts.mlp1_scales is not None and experts.mlp2_blocks is not None
        assert experts.mlp1_blocks is not None and experts.mlp2_scales is not None
        return cls(
            experts.mlp1_blocks,
            experts.mlp1_scales,
            experts.mlp1_bias,
            experts.mlp2_blocks,
            experts.mlp2_scales,
            experts.mlp2_bias,
        )

    @property
    def nbytes(self) -> int:
        """Bytes of packed weights and scales held (the biases not counted)."""
        return sum(t.numel() for t in (self.w1, self.s1, self.w2, self.s2))

    def expert_nbytes(self) -> int:
        """Packed bytes (nibbles and scales) one expert's two projections read."""
        return self.nbytes // self.num_experts

    def biases(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The biases as the reference uses them with ``dtype`` activations (rounded to that
        dtype), held in fp32; computed once per dtype."""
        cached = self._biases.get(dtype)
        if cached is None:
            b1, b2 = self._bias_source
            cached = (b1.to(dtype).float().contiguous(), b2.to(dtype).float().contiguous())
            self._biases[dtype] = cached
        return cached
