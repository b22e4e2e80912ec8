"""A native CPU kernel for gpt-oss's experts with the MXFP4 weights used packed (issue 16).

The experts' nibbles are never rebuilt as bf16 matrices: each step streams the routed
experts' packed rows once (about 4.25 bits per weight) and decodes them in registers
(``moe.cpp`` has the layout and the paths). Numerics follow ``model.layers.moe``'s expert
math with every accumulation in fp32: bf16 activations are used as they are, fp32 ones are
split exactly into three bf16 parts (so fp32 keeps fp32 accuracy), the SwiGLU runs in fp32
and its output is rounded once to bf16 in bf16 mode.

API:

- ``available() -> bool``: the extension compiled (or was found compiled) and loaded; never
  raises. ``unavailable_reason() -> str | None`` says why not. Importing this module does not
  compile; the first ``available()`` / ``moe_experts`` does, once per machine: the build goes
  to ``~/.cache/gptoss-server/kernels/<key>`` (``GPTOSS_KERNEL_CACHE`` overrides the root;
  the key hashes the sources, torch's and Python's versions and the architecture) and later
  processes load the built library without a compiler.
- ``isa() -> str``: the best path this CPU runs: ``amx``, ``avx512_vnni``, ``avx512_bf16``, ``avx2``,
  ``generic``
  (chosen at run time from CPUID; ``GPTOSS_NATIVE_MOE_ISA`` caps it).
- ``PackedExperts.from_expert_weights(experts)``: one layer's packed experts re-laid out once
  (16 output rows interleaved per byte column; same size as the checkpoint's tensors).
- ``moe_experts(x, weights, ids, packed, swiglu_alpha, swiglu_limit, out=None) -> Tensor``.
- ``paged_decode_attention(q, k_cache, v_cache, rows, blocks, mask, sinks, sm_scale, out)``:
  the decode queries of one plan group attended over the cache blocks in place
  (``attention.cpp``).
- ``bf16_dot_available(isa=None) -> bool``: the AVX-512 BF16 path is there, which the two below need.
- ``InterleavedLinear(weight)`` and ``linear_interleaved(x, packed, bias=None, out=None, *,
  argmax=False)``: x @ weight.T + bias in bf16 with fp32 accumulation, rounded once, over a copy
  of the weight laid out once for it (16 outputs interleaved per bf16 pair), at any row count;
  with ``argmax`` the greedy token of every row, the product not written (``linear.cpp``).
- ``screen_available(isa=None) -> bool``, ``ScreenedHead(weight)`` and ``screened_argmax(x, head,
  recomputed=None)``:
  the greedy tokens of an ``InterleavedLinear`` head read through an 8-bit copy with a proven
  error bound, the few candidates recomputed exactly: ``linear_interleaved(..., argmax=True)``'s
  tokens for half the bytes (``head.cpp``; AVX-512 VNNI).
- ``argmax_rows(logits) -> Tensor``: ``logits.argmax(-1)`` vectorised, fp32 or bf16.
- ``rms_norm(x, scale, eps, out=None)`` and ``rope(x, cos, sin, out=None)``: RMSNorm and the
  RoPE rotation in one pass each, fp32 or bf16, any ISA (``norm_rope.cpp``).
"""

from __future__ import annotations

import os

import torch

from .build import ISAS, available, build_in_background, build_info, is_built, settled_isa, unavailable_reason
from .packed_experts import PackedExperts

__all__ = [
    "ISAS",
    "SCREEN_TWO_DIGIT_ROWS",
    "InterleavedLinear",
    "PackedExperts",
    "ScreenedHead",
    "argmax_rows",
    "available",
    "bf16_dot_available",
    "build_in_background",
    "build_info",
    "is_built",
    "isa",
    "linear_interleaved",
    "moe_experts",
    "paged_decode_attention",
    "rms_norm",
    "rope",
    "screen_available",
    "screened_argmax",
    "unavailable_reason",
]

# From this many rows (tokens, times 3 for fp32) per expert, a row group is decoded once into
# bf16 and multiplied as a dense tile. With AMX, its tiles pay from 4 rows (measured:
# bench/moe_kernel.py). Without, AVX-512 BF16's register tile pays from about 64: 12-15%
# faster than the int8 path at 128 rows on the 20b's shapes, even at 32, slower at 16.
AMX_MIN_ROWS = 4
DECODED_MIN_ROWS = 64


def _isa_level(requested: str | None) -> int:
    cap = requested or os.environ.get("GPTOSS_NATIVE_MOE_ISA") or ISAS[-1]
    if cap not in ISAS:
        raise ValueError(f"unknown ISA {cap!r}; one of {', '.join(ISAS)}")
    return min(ISAS.index(cap), settled_isa())


def _tile_min_rows(level: int) -> int:
    return AMX_MIN_ROWS if level >= ISAS.index("amx") else DECODED_MIN_ROWS


def isa() -> str:
    """The path ``moe_experts`` takes on this CPU (``GPTOSS_NATIVE_MOE_ISA`` caps it)."""
    if not available():
        raise RuntimeError(f"native MoE kernel unavailable: {unavailable_reason()}")
    return ISAS[_isa_level(None)]


def moe_experts(
    x: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    packed: PackedExperts,
    swiglu_alpha: float,
    swiglu_limit: float,
    out: torch.Tensor | None = None,
    *,
    isa: str | None = None,
    tile_min_rows: int | None = None,
) -> torch.Tensor:
    """sum_j weights[t, j] * expert_{ids[t, j]}(x[t]) for x [T, H] (fp32 or bf16, normed),
    weights [T, k] (fp32 routing weights), ids [T, k] (int64) -> [T, H] in x's dtype, written
    into ``out`` when given. expert_e(x) = mlp2_e(swiglu(mlp1_e(x) + b1_e)) + b2_e with
    gpt-oss's clamped SwiGLU. An expert may appear twice in a row of ``ids``. ``isa`` caps the
    path (one of ``ISAS``; default: the best, or ``GPTOSS_NATIVE_MOE_ISA``); ``tile_min_rows``,
    the rows per expert from which its row groups are decoded once into a bf16 tile (default:
    that path's measured threshold). Raises RuntimeError when the kernel is unavailable."""
    if not available():
        raise RuntimeError(f"native MoE kernel unavailable: {unavailable_reason()}")
    level = _isa_level(isa)
    if x.dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(f"x must be fp32 or bf16, got {x.dtype}")
    if x.dim() != 2 or x.shape[1] != packed.hidden_size:
        raise ValueError(f"x must be [T, {packed.hidden_size}], got {tuple(x.shape)}")
    x = x.contiguous()
    weights = weights.to(torch.float32).contiguous()
    ids = ids.to(torch.int64).contiguous()
    if out is None:
        out = torch.empty_like(x)
    b1, b2 = packed.biases(x.dtype)
    torch.ops.gptoss_native.moe_experts(
        x,
        weights,
        ids,
        packed.w1,
        packed.s1,
        b1,
        packed.w2,
        packed.s2,
        b2,
        float(swiglu_alpha),
        float(swiglu_limit),
        level,
        packed.scales_foldable,
        int(tile_min_rows if tile_min_rows is not None else _tile_min_rows(level)),
        out,
    )
    return out


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    rows: torch.Tensor,
    blocks: torch.Tensor,
    mask: torch.Tensor,
    sinks: torch.Tensor,
    sm_scale: float,
    out: torch.Tensor,
) -> None:
    """Writes ``out[rows]`` for one group of decode sequences (``model.paged_attention``'s
    ``DecodeGroup``: rows [B], blocks [B * NBLK] physical blocks in logical order, mask [B, NBLK *
    block_size]): each query against its keys read from the caches [KVH, blocks, block_size,
    D] where they are, with the heads' sinks [H] (fp32). q and out [T, H, D] and the caches
    share one dtype (fp32 or bf16); bf16 uses AVX-512 BF16 dot products where the CPU has them
    (``bf16_dot_available``). Raises RuntimeError when the kernel is unavailable."""
    if not available():
        raise RuntimeError(f"native kernels unavailable: {unavailable_reason()}")
    torch.ops.gptoss_native.paged_decode_attention(
        q.contiguous(),
        k_cache,
        v_cache,
        rows.to(torch.int64).contiguous(),
        blocks.to(torch.int64).contiguous(),
        mask.contiguous(),
        sinks.to(torch.float32).contiguous(),
        float(sm_scale),
        bf16_dot_available(),
        out,
    )


def bf16_dot_available(isa: str | None = None) -> bool:
    """Whether ``linear_interleaved`` and ``argmax_rows`` run here (AVX-512 BF16, not capped
    off by ``isa`` or ``GPTOSS_NATIVE_MOE_ISA``)."""
    return available() and _isa_level(isa) >= ISAS.index("avx512_bf16")


class InterleavedLinear:
    """A bf16 weight [O, H] re-laid out once for ``linear_interleaved``: [ceil(O / 16), H / 2, 16,
    2], a bf16 pair of 16 consecutive outputs per 64 bytes (rows past O zero). Same size as
    the weight, give or take 15 rows. ``weight`` is that tensor (for memory accounting);
    calling it is ``linear_interleaved`` (a ``model.prepacked.PackedLinear``)."""

    def __init__(self, weight: torch.Tensor) -> None:
        if weight.dtype != torch.bfloat16 or weight.dim() != 2 or weight.shape[1] % 2:
            raise ValueError(
                f"need a bf16 [O, H] weight with H even, got {weight.dtype} {tuple(weight.shape)}"
            )
        self.out_features, self.in_features = weight.shape
        groups = -(-self.out_features // 16)
        padded = torch.zeros(groups * 16, self.in_features, dtype=weight.dtype, device=weight.device)
        padded[: self.out_features] = weight
        self.weight = padded.view(groups, 16, self.in_features // 2, 2).permute(0, 2, 1, 3).contiguous()

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return linear_interleaved(x, self, bias)


def linear_interleaved(
    x: torch.Tensor,
    weight: InterleavedLinear,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    *,
    argmax: bool = False,
) -> torch.Tensor:
    """bf16 x [N, H] @ weight.T (+ bias [O]) -> bf16 [N, O] (fp32 accumulation, one rounding),
    written into ``out`` when given; with ``argmax`` -> int64 [N], the first index of each row's
    maximum of that bf16 result (NaN counting as the maximum, as torch.argmax), without writing
    the result. The weight streams once per call whatever the rows. Raises RuntimeError
    without AVX-512 BF16."""
    if not bf16_dot_available():
        raise RuntimeError("linear_interleaved needs the native kernels with AVX-512 BF16")
    x = x.contiguous()
    b = None if bias is None else bias.to(torch.float32).contiguous()
    o = weight.out_features
    if argmax:
        ids = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
        torch.ops.gptoss_native.linear_interleaved(x, weight.weight, o, b, None, ids)
        return ids
    if out is None:
        out = torch.empty(x.shape[0], o, dtype=torch.bfloat16, device=x.device)
    torch.ops.gptoss_native.linear_interleaved(x, weight.weight, o, b, out, None)
    return out


def screen_available(isa: str | None = None) -> bool:
    """Whether ``screened_argmax`` runs here (AVX-512 VNNI beside BF16, not capped off by
    ``isa`` or ``GPTOSS_NATIVE_MOE_ISA``)."""
    return available() and _isa_level(isa) >= ISAS.index("avx512_vnni")


SCREEN_BUILD_ROWS = 16384  # outputs quantized at a time at load (an fp32 copy of these only)
# Up to this many rows screened_argmax quantizes x in two digits; wider calls in one. Two
# digits make the screen compute-bound past a few rows (two VPDPBUSD per row and 64 bytes, as
# many instructions as the bf16 kernel's VDPBF16PS): at 8 rows it lost to that kernel on the
# 20b's head (bench/linear_kernel.py, AMD EPYC, 2026-12-07).
SCREEN_TWO_DIGIT_ROWS = 4


class ScreenedHead(InterleavedLinear):
    """An ``InterleavedLinear`` LM head with an 8-bit copy beside it for ``screened_argmax``:
    per output a scale max|W[v]| / 127 (``scale``), the bytes round(W / scale) + 128 laid out
    [ceil(V / 16), H / 4, 16, 4] (``screen``: 4 inputs of 16 outputs per 64 bytes) and
    sum|W[v]| rounded up (``l1``). Half the head's size again; the full logits
    (``__call__``) still come from the bf16 copy. Needs H a multiple of 4."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__(weight)
        if self.in_features % 4:
            raise ValueError(f"the screen needs H a multiple of 4, got {self.in_features}")
        groups, h = self.weight.shape[0], self.in_features
        self.screen = torch.empty(groups, h // 4, 16, 4, dtype=torch.uint8, device=weight.device)
        self.scale = torch.zeros(groups * 16, dtype=torch.float32, device=weight.device)
        self.l1 = torch.zeros(groups * 16, dtype=torch.float32, device=weight.device)
        for start in range(0, groups * 16, SCREEN_BUILD_ROWS):
            stop = min(start + SCREEN_BUILD_ROWS, groups * 16)
            w = torch.zeros(stop - start, h, dtype=torch.float32, device=weight.device)
            real = max(0, min(stop, self.out_features) - start)
            w[:real] = weight[start : start + real]
            scale = w.abs().amax(dim=1) / 127
            q = torch.round(w / torch.where(scale > 0, scale, 1.0)[:, None]).clamp_(-127, 127) + 128
            self.screen[start // 16 : stop // 16] = (
                q.to(torch.uint8).view(-1, 16, h // 4, 4).permute(0, 2, 1, 3)
            )
            self.scale[start:stop] = scale
            # Rounded up, so that the bound built on it stays a bound.
            self.l1[start:stop] = (w.abs().sum(dim=1, dtype=torch.float64) * (1 + 2**-20)).float()

    @property
    def nbytes(self) -> int:
        return super().nbytes + sum(t.numel() * t.element_size() for t in (self.screen, self.scale, self.l1))


def screened_argmax(
    x: torch.Tensor, head: ScreenedHead, recomputed: torch.Tensor | None = None
) -> tuple[torch.Tensor, int] | None:
    """``linear_interleaved(x, head, argmax=True)``'s tokens (int64 [N]), bit for bit, for bf16
    x [N, H], read through the head's 8-bit screen: every logit within a proven bound, then only
    the groups of 16 outputs that can hold the maximum recomputed exactly (all of them when the
    bound says nothing: NaN or inf in x, flat logits). Returns the tokens and how many groups
    were recomputed in all (``recomputed``, int64 [N], when given, gets them per row).

    Up to SCREEN_TWO_DIGIT_ROWS rows, activations in two 8-bit digits; wider calls in one (half
    the products), unless a row has outlier features: then nothing is computed and None comes
    back (the bf16 kernel serves those rows better). Raises RuntimeError without AVX-512 VNNI."""
    if not screen_available():
        raise RuntimeError("screened_argmax needs the native kernels with AVX-512 VNNI")
    x = x.contiguous()
    ids = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    op = torch.ops.gptoss_native.screened_argmax
    total = op(
        x,
        head.weight,
        head.screen,
        head.scale,
        head.l1,
        head.out_features,
        SCREEN_TWO_DIGIT_ROWS,
        ids,
        recomputed,
    )
    return None if total < 0 else (ids, total)


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(dim=-1)`` for fp32 or bf16 [N, V] CPU logits (same index, NaN
    included). Raises RuntimeError without AVX-512 BF16."""
    if not bf16_dot_available():
        raise RuntimeError("argmax_rows needs the native kernels with AVX-512 BF16")
    ids = torch.empty(logits.shape[0], dtype=torch.int64, device=logits.device)
    torch.ops.gptoss_native.argmax_rows(logits.contiguous(), ids)
    return ids


def _rows_and_out(x: torch.Tensor, out: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The row-wise ops' shared preamble: the kernels loaded, x with a unit last stride (rows
    and heads may be strided views), and a fresh contiguous output unless one was given."""
    if not available():
        raise RuntimeError(f"native kernels unavailable: {unavailable_reason()}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return x, out


def rms_norm(
    x: torch.Tensor, scale: torch.Tensor, eps: float, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``model.layers.rms_norm`` of fp32 or bf16 [T, H] rows (unit column stride) with an
    fp32 scale [H], in x's dtype, written into ``out`` when given. Raises RuntimeError when
    the kernels are unavailable."""
    x, out = _rows_and_out(x, out)
    torch.ops.gptoss_native.rms_norm(x, scale.to(torch.float32).contiguous(), float(eps), out)
    return out


def rope(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``YarnRope.apply``: fp32 or bf16 x [T, heads, D] (any row and head strides, unit last
    stride: a view into the fused qkv output is read in place) rotated by fp32 cos, sin
    [T, D/2], in x's dtype, contiguous, written into ``out`` when given. Raises RuntimeError
    when the kernels are unavailable."""
    x, out = _rows_and_out(x, out)
    torch.ops.gptoss_native.rope(
        x, cos.to(torch.float32).contiguous(), sin.to(torch.float32).contiguous(), out
    )
    return out
