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


@functools.lru_cache(maxsize=16)  # constant tables, one per (dtype, device)
def _byte_pair_table(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[256, 2]: the two FP4 values (low nibble first) that each byte encodes."""
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    byte = torch.arange(256)
    return torch.stack([lut[byte & 0x0F], lut[byte >> 4]], dim=-1).to(dtype=dtype, device=device)


@functools.lru_cache(maxsize=16)
def _scale_table(device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[256] float32: 2^(s-127). 2^-127 is a float32 subnormal, still exact; s=255 gives inf
    (the spec calls it NaN, the reference ignores that: we do what the reference does)."""
    exps = torch.arange(256, dtype=torch.float64) - SCALE_BIAS
    return torch.pow(2.0, exps).to(torch.float32).to(dtype=dtype, device=device)


def dequantize_mxfp4(
    blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """blocks uint8 [..., G, 16], scales uint8 [..., G] -> weights [..., G*32] in ``dtype``.

    The product of an FP4 value and a power of two is exact in float32 (and in bf16 while the
    result stays in range), so computing in float32 and casting once matches the reference.
    """
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise TypeError(f"MXFP4 blocks/scales must be uint8, got {blocks.dtype}/{scales.dtype}")
    if blocks.shape[-1] != BYTES_PER_BLOCK or blocks.shape[:-1] != scales.shape:
        raise ValueError(f"MXFP4 shape mismatch: blocks {tuple(blocks.shape)}, scales {tuple(scales.shape)}")
    # FP4 values times a power of two are exact in float32 and bf16 (same exponent range),
    # so computing directly in those dtypes matches the reference; fp16 goes through float32.
    compute = dtype if dtype in (torch.float32, torch.bfloat16, torch.float64) else torch.float32
    table = _byte_pair_table(compute, blocks.device)  # [256, 2]
    packed_int = {torch.bfloat16: torch.int32, torch.float32: torch.int64}.get(compute)
    if packed_int is not None:
        # Gather both values of a byte as one wider integer: a single 1-D index_select with
        # int32 indices is several times faster on CPU than fancy-indexing a [256, 2] table.
        both = table.view(packed_int).view(256)
        values = both.index_select(0, blocks.reshape(-1).int()).view(compute)
    else:
        values = table[blocks.reshape(-1).long()]
    values = values.view(*blocks.shape[:-1], VALUES_PER_BLOCK)
    factors = _scale_table(blocks.device, compute).index_select(0, scales.reshape(-1).int())
    out = values * factors.view(*scales.shape, 1)
    return out.reshape(*blocks.shape[:-2], -1).to(dtype)


def quantize_mxfp4_random(
    shape_rows: tuple[int, ...], in_features: int, generator: torch.Generator, scale_exponent: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random packed weights: uniform nibbles, scales 2^(scale_exponent + {-1, 0}).

    Returns blocks uint8 [*rows, in/32, 16] and scales uint8 [*rows, in/32].
    """
    groups = in_features // VALUES_PER_BLOCK
    blocks = torch.randint(0, 256, (*shape_rows, groups, BYTES_PER_BLOCK), generator=generator, dtype=torch.uint8)
    jitter = torch.randint(-1, 1, (*shape_rows, groups), generator=generator, dtype=torch.int16)
    scales = (jitter + SCALE_BIAS + scale_exponent).to(torch.uint8)
    return blocks, scales
