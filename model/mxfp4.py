"""MXFP4 (OCP MX v1.0) as gpt-oss stores its expert weights.

A block is 32 FP4 E2M1 values along the input dimension plus one E8M0 scale byte
(value 2^(s-127)). Blocks are packed 16 bytes per block: the LOW nibble of byte b holds
element 2b and the HIGH nibble element 2b+1 (the OpenAI/HF order, not ggml's).
"""

from __future__ import annotations

import functools

import torch

# E2M1 magnitudes by nibble; nibbles 8..15 are the same values negated (8 is -0).
FP4_VALUES: tuple[float, ...] = (
    +0.0, +0.5, +1.0, +1.5, +2.0, +3.0, +4.0, +6.0,
    -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
)  # fmt: skip

SCALE_BIAS = 127
VALUES_PER_BLOCK = 32
BYTES_PER_BLOCK = 16


def _byte_pair_values() -> torch.Tensor:
    """[256, 2] float32: the two FP4 values (low nibble first) that each byte encodes."""
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    byte = torch.arange(256)
    return torch.stack([lut[byte & 0x0F], lut[byte >> 4]], dim=-1)


def _scale_values() -> torch.Tensor:
    """[256] float64: 2^(s-127). 2^-127 is a float32/bf16 subnormal, still exact; s=255 gives
    inf (the spec calls it NaN, the reference ignores that: we do what the reference does)."""
    return torch.pow(2.0, torch.arange(256, dtype=torch.float64) - SCALE_BIAS)


@functools.lru_cache(maxsize=16)  # immutable constant tables, one per (dtype, device)
def _decoded_table(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[256 scales * 256 bytes, 2]: every (scale, byte) pair already decoded to its two
    weights. Each product FP4 * 2^k is computed in float64 (exact) and rounded once."""
    table = _scale_values()[:, None, None] * _byte_pair_values().double()[None]
    return table.reshape(256 * 256, 2).to(dtype).to(device).contiguous()


_PAIR_AS_INT = {torch.bfloat16: torch.int32, torch.float16: torch.int32, torch.float32: torch.int64}


def dequantize_mxfp4(
    blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """blocks uint8 [..., G, 16], scales uint8 [..., G] -> weights [..., G*32] in ``dtype``.

    One gather per byte from a table of all (scale, byte) pairs: FP4 times a power of two
    rounded once to ``dtype`` (exact for float32 and bf16, which share float32's exponent
    range, except where the value overflows to inf as in the reference's ldexp).
    """
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise TypeError(f"MXFP4 blocks/scales must be uint8, got {blocks.dtype}/{scales.dtype}")
    if blocks.shape[-1] != BYTES_PER_BLOCK or blocks.shape[:-1] != scales.shape:
        raise ValueError(f"MXFP4 shape mismatch: blocks {tuple(blocks.shape)}, scales {tuple(scales.shape)}")
    table = _decoded_table(dtype, blocks.device)
    index = blocks.int()
    index += (scales.int() * 256).unsqueeze(-1)
    as_int = _PAIR_AS_INT.get(dtype)
    if as_int is not None:
        # Both weights of a byte gathered as one wider integer: a 1-D index_select with int32
        # indices is several times faster on CPU than fancy-indexing a [N, 2] table.
        values = table.view(as_int).view(-1).index_select(0, index.view(-1)).view(dtype)
    else:
        values = table.index_select(0, index.view(-1))
    return values.reshape(*blocks.shape[:-2], blocks.shape[-2] * VALUES_PER_BLOCK)
