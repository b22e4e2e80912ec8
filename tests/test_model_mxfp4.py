"""MXFP4 dequantization against independent references: a bit-level E2M1/E8M0 decoder
written here from the OCP MX spec (not the value table), the spec's value table, and
transformers' own converter."""

from __future__ import annotations

import math

import pytest
import torch

from model.mxfp4 import dequantize_mxfp4

# The value table of shared/spec/model.md §4, nibble by nibble.
SPEC_TABLE = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


def e2m1_from_bits(nibble: int) -> float:
    """FP4 E2M1: sign bit, 2 exponent bits (bias 1), 1 mantissa bit; exponent 0 is subnormal."""
    sign = -1.0 if nibble & 0b1000 else 1.0
    exponent = (nibble >> 1) & 0b11
    mantissa = nibble & 0b1
    if exponent == 0:
        return sign * mantissa * 0.5
    return sign * math.ldexp(1.0 + mantissa / 2, exponent - 1)


def reference_block(byte_values: list[int], scale: int) -> list[float]:
    """One 32-value block: byte b holds element 2b (low nibble) and 2b+1 (high nibble)."""
    out = []
    for b in byte_values:
        for nibble in (b & 0x0F, b >> 4):
            v = e2m1_from_bits(nibble) * math.ldexp(1.0, scale - 127)  # float64: exact
            out.append(v)
    return out


def test_bit_decoder_matches_spec_table():
    assert [e2m1_from_bits(n) for n in range(16)] == SPEC_TABLE
    assert math.copysign(1.0, e2m1_from_bits(8)) == -1.0  # nibble 8 is -0


SCALES = [0, 1, 2, 100, 119, 120, 123, 126, 127, 128, 130, 200, 253, 254]  # 2^-127 .. 2^127


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_byte_and_extreme_scales(dtype):
    # 16 blocks of 16 bytes = all 256 byte values, each block at every scale of SCALES.
    all_bytes = torch.arange(256, dtype=torch.uint8).view(16, 16)
    blocks = all_bytes.unsqueeze(0).expand(len(SCALES), 16, 16).contiguous()  # [rows, G, 16]
    scales = torch.tensor(SCALES, dtype=torch.uint8)[:, None].expand(len(SCALES), 16).contiguous()
    got = dequantize_mxfp4(blocks, scales, dtype)
    assert got.shape == (len(SCALES), 16 * 32) and got.dtype == dtype
    for r, scale in enumerate(SCALES):
        expected = []
        for g in range(16):
            expected += reference_block(all_bytes[g].tolist(), scale)
        # float64 -> target dtype: the exact value rounded once (inf beyond the range).
        exp_t = torch.tensor(expected, dtype=torch.float64).to(dtype)
        assert torch.equal(got[r], exp_t), f"scale byte {scale}"
        # Signs of zeros too (nibble 8 is -0).
        assert torch.equal(torch.signbit(got[r]), torch.signbit(exp_t))


def test_extreme_values_are_exact():
    blocks = torch.tensor([[[0x71] + [0] * 15]], dtype=torch.uint8)  # low nibble 1 (0.5), high 7 (6.0)
    lo = dequantize_mxfp4(blocks, torch.tensor([[0]], dtype=torch.uint8), torch.float32)[0]
    assert lo[0].item() == 2.0**-128 and lo[1].item() == 6.0 * 2.0**-127  # float32 subnormals kept
    hi = dequantize_mxfp4(blocks, torch.tensor([[254]], dtype=torch.uint8), torch.float32)[0]
    assert hi[0].item() == 2.0**126 and hi[1].item() == math.inf  # 6 * 2^127 overflows float32
    one = dequantize_mxfp4(blocks, torch.tensor([[127]], dtype=torch.uint8), torch.float32)[0]
    assert one[:2].tolist() == [0.5, 6.0]


def test_nibble_order_low_first():
    blocks = torch.zeros(1, 1, 16, dtype=torch.uint8)
    blocks[0, 0, 3] = 0x2C  # element 6 = low nibble 0xC (-2), element 7 = high nibble 0x2 (1)
    got = dequantize_mxfp4(blocks, torch.full((1, 1), 127, dtype=torch.uint8), torch.float32)[0]
    assert got[6].item() == -2.0 and got[7].item() == 1.0
    assert got[[i for i in range(32) if i not in (6, 7)]].abs().sum().item() == 0


def test_matches_transformers_converter():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    g = torch.Generator().manual_seed(1)
    blocks = torch.randint(0, 256, (3, 48, 4, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(100, 140, (3, 48, 4), generator=g, dtype=torch.uint8)
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16)  # [E, in, out] (transposed)
    ours = dequantize_mxfp4(blocks, scales, torch.bfloat16)  # [E, out, in]
    assert torch.equal(ours.transpose(1, 2), theirs)


def test_rejects_bad_inputs():
    with pytest.raises(TypeError):
        dequantize_mxfp4(torch.zeros(1, 1, 16, dtype=torch.int8), torch.zeros(1, 1, dtype=torch.uint8))
    with pytest.raises(ValueError):
        dequantize_mxfp4(torch.zeros(1, 2, 16, dtype=torch.uint8), torch.zeros(1, 1, dtype=torch.uint8))
