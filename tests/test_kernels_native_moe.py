"""The native CPU MoE kernel (model/kernels/native_cpu) against the reference expert math.

Random MXFP4 experts of odd small shapes; every path this CPU runs (generic, AVX2,
AVX-512 BF16, AVX-512 VNNI, AMX, and AMX forced onto every expert); fp32 and bf16 activations; routings
where some experts receive no rows, one expert most of them, and tokens name an expert
twice. Compared with model.layers' own expert code (dequantize per use, matmuls, SwiGLU,
weighted sum) and with a float64 evaluation of the same maths.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import model.layers as layers
from model.config import ModelConfig
from model.kernels import native_cpu
from model.layers import ExpertWeights, moe, route, swiglu

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def _native_kernel() -> None:
    if not native_cpu.available():
        pytest.skip(native_cpu.unavailable_reason() or "native MoE kernel unavailable")


def random_experts(e: int, h: int, i: int, seed: int) -> ExpertWeights:
    """Uniform nibbles, scales spread over four powers of two around ~1/sqrt(fan_in)."""
    g = torch.Generator().manual_seed(seed)

    def scales(rows: int, fan_in: int) -> torch.Tensor:
        centre = 127 + round(math.log2(3.0 / (2.93 * math.sqrt(fan_in))))
        return torch.randint(centre - 2, centre + 2, (e, rows, fan_in // 32), generator=g, dtype=torch.uint8)

    return ExpertWeights(
        mlp1_bias=torch.randn(e, 2 * i, generator=g),
        mlp2_bias=torch.randn(e, h, generator=g),
        mlp1_blocks=torch.randint(0, 256, (e, 2 * i, h // 32, 16), generator=g, dtype=torch.uint8),
        mlp1_scales=scales(2 * i, h),
        mlp2_blocks=torch.randint(0, 256, (e, h, i // 32, 16), generator=g, dtype=torch.uint8),
        mlp2_scales=scales(h, i),
    )


def skewed_routing(t: int, e: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert 0 takes about half the draws, expert 1 none; draws with replacement, so some
    tokens name an expert twice."""
    g = torch.Generator().manual_seed(seed)
    probs = torch.ones(e)
    probs[0], probs[1] = float(e), 0.0
    ids = torch.multinomial(probs.expand(t, e), k, replacement=True, generator=g)
    weights = torch.softmax(torch.randn(t, k, generator=g), dim=-1)
    return weights, ids


def reference(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, experts: ExpertWeights,
              config: ModelConfig) -> torch.Tensor:  # fmt: skip
    """model.layers.moe after routing, step for step (it takes ids rather than a router)."""
    t, k = ids.shape
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=config.num_experts).tolist()
    token_of = order // k
    o = layers._experts_one_by_one(x.index_select(0, token_of), counts, experts, config)
    weighted = o.float() * weights.reshape(-1)[order][:, None]
    out = torch.zeros(t, x.shape[1], dtype=torch.float32)
    return out.index_add_(0, token_of, weighted).to(x.dtype)


def exact(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, experts: ExpertWeights,
          config: ModelConfig) -> torch.Tensor:  # fmt: skip
    """The same maths in float64 from the same inputs (bias rounded to x's dtype, as used)."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    xd = x.double()
    for e in ids.unique().tolist():
        rows, slots = (ids == e).nonzero(as_tuple=True)
        b1 = experts.mlp1_bias[e].to(x.dtype).double()
        b2 = experts.mlp2_bias[e].to(x.dtype).double()
        h = xd[rows] @ experts.mlp1(e, torch.float64) + b1
        o = swiglu(h, config.swiglu_alpha, config.swiglu_limit) @ experts.mlp2(e, torch.float64) + b2
        out.index_add_(0, rows, weights[rows, slots].double()[:, None] * o)
    return out


def row_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest per-row max |difference| / max |ref| (as tests/test_model_cache.py)."""
    ours, ref = ours.double(), ref.double()
    return ((ours - ref).abs().amax(-1) / ref.abs().amax(-1)).max().item()


# (isa cap, tile_min_rows): every path this machine can run; the dense tiles (AMX, or decoded
# bf16 without it) at their default threshold and forced onto every expert.
PATHS = [
    ("generic", None), ("avx2", None), ("avx512_bf16", None), ("avx512_bf16", 1), ("avx512_vnni", None),
    ("avx512_vnni", 1), ("amx", None), ("amx", 1),
]  # fmt: skip
SHAPES = [(96, 64, 5, 2), (128, 192, 8, 4)]  # hidden, intermediate, experts, top-k
TOKENS = (1, 3, 17, 64, 200)


def _runnable(isa: str) -> bool:
    return native_cpu.ISAS.index(isa) <= native_cpu.ISAS.index(native_cpu.isa())


@pytest.fixture(scope="module")
def layers_by_shape() -> dict:
    out = {}
    for h, i, e, _ in SHAPES:
        experts = random_experts(e, h, i, seed=h + i)
        out[h, i] = (experts, native_cpu.PackedExperts.from_expert_weights(experts))
    return out


@pytest.fixture(scope="module")
def cases(layers_by_shape) -> dict:
    """Inputs and both expected outputs per (shape, dtype, T), computed once for all paths."""
    out = {}
    for h, i, e, k in SHAPES:
        config = ModelConfig(hidden_size=h, intermediate_size=i, num_experts=e, experts_per_token=k)
        experts, _ = layers_by_shape[h, i]
        for dtype in (torch.float32, torch.bfloat16):
            for t in TOKENS:
                weights, ids = skewed_routing(t, e, k, seed=t)
                x = torch.randn(t, h, generator=torch.Generator().manual_seed(100 + t)).to(dtype)
                expected = (
                    reference(x, weights, ids, experts, config),
                    exact(x, weights, ids, experts, config),
                )
                out[h, dtype, t] = (x, weights, ids, *expected)
    return out


@pytest.mark.parametrize("path", PATHS, ids=[f"{p}-min{m or 'default'}" for p, m in PATHS])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"H{h}-I{i}-E{e}-k{k}" for h, i, e, k in SHAPES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_native_matches_reference(layers_by_shape, cases, path, shape, dtype):
    isa, tile_min_rows = path
    if not _runnable(isa):
        pytest.skip(f"this CPU runs at most {native_cpu.isa()}")
    h, i, _, _ = shape
    _, packed = layers_by_shape[h, i]
    alpha, limit = ModelConfig.swiglu_alpha, ModelConfig.swiglu_limit
    for t in TOKENS:
        x, weights, ids, ref, best = cases[h, dtype, t]
        got = native_cpu.moe_experts(
            x, weights, ids, packed, alpha, limit, isa=isa, tile_min_rows=tile_min_rows
        )
        assert got.dtype == dtype and got.shape == x.shape
        if dtype == torch.float32:
            assert row_error(got, ref) < 1e-5, (t, row_error(got, ref))
            assert row_error(got, best) < 1e-5, (t, row_error(got, best))
        else:
            # The reference rounds h, the SwiGLU's steps and o to bf16; the kernel rounds only
            # the SwiGLU output and the result, so it sits at least as close to float64.
            assert row_error(got, ref) < 2**-6, (t, row_error(got, ref))
            assert row_error(got, best) < 2**-7, (t, row_error(got, best))
            assert row_error(got, best) <= row_error(ref, best) * 1.5, t


def test_whole_moe_with_router_matches(layers_by_shape):
    """route + the kernel against model.layers.moe on the same packed ExpertWeights."""
    h, i, e, k = SHAPES[1]
    config = ModelConfig(hidden_size=h, intermediate_size=i, num_experts=e, experts_per_token=k)
    experts, packed = layers_by_shape[h, i]
    g = torch.Generator().manual_seed(3)
    router_w, router_b = torch.randn(e, h, generator=g), torch.randn(e, generator=g)
    for dtype in (torch.float32, torch.bfloat16):
        y = torch.randn(37, h, generator=g).to(dtype)
        weights, ids = route(y, router_w, router_b, k)
        got = native_cpu.moe_experts(y, weights, ids, packed, config.swiglu_alpha, config.swiglu_limit)
        ref = moe(y, experts, router_w, router_b, config)
        assert row_error(got, ref) < (1e-5 if dtype == torch.float32 else 2**-6)


def test_out_argument_and_edge_cases(layers_by_shape):
    h, i, e, k = SHAPES[0]
    experts, packed = layers_by_shape[h, i]
    config = ModelConfig(hidden_size=h, intermediate_size=i, num_experts=e, experts_per_token=k)
    weights, ids = skewed_routing(5, e, k, seed=9)
    x = torch.randn(5, h)
    out = torch.full_like(x, float("nan"))
    got = native_cpu.moe_experts(x, weights, ids, packed, config.swiglu_alpha, config.swiglu_limit, out=out)
    assert got is out and row_error(out, reference(x, weights, ids, experts, config)) < 1e-5
    # No tokens.
    empty = native_cpu.moe_experts(x[:0], weights[:0], ids[:0], packed, 1.702, 7.0)
    assert empty.shape == (0, h)
    # Every token on one expert, the rest idle.
    same = torch.full((20, k), 3)
    xs = torch.randn(20, h).to(torch.bfloat16)
    w = torch.rand(20, k)
    got = native_cpu.moe_experts(xs, w, same, packed, config.swiglu_alpha, config.swiglu_limit)
    assert row_error(got, exact(xs, w, same, experts, config)) < 2**-7
    with pytest.raises(RuntimeError, match="out of range"):
        native_cpu.moe_experts(x, weights, torch.full_like(ids, e), packed, 1.702, 7.0)
    with pytest.raises(ValueError):
        native_cpu.moe_experts(torch.randn(2, h + 32), weights[:2], ids[:2], packed, 1.702, 7.0)


@pytest.mark.parametrize("isa", [i for i in native_cpu.ISAS if native_cpu.available() and _runnable(i)])
def test_bf16_activations_of_any_range(layers_by_shape, isa):
    """On every path this CPU runs: blocks of 32 activations spanning 2^20 (the int8 path
    quantizes per block to the block's largest value), all-zero blocks and a token carrying
    inf or NaN: bf16 accuracy where the values are finite, and the non-finite token alone
    non-finite, as in the reference."""
    h, i, e, k = SHAPES[1]
    experts, packed = layers_by_shape[h, i]
    config = ModelConfig(hidden_size=h, intermediate_size=i, num_experts=e, experts_per_token=k)
    g = torch.Generator().manual_seed(21)
    x = torch.randn(9, h, generator=g) * torch.exp2(torch.randint(-10, 11, (9, h), generator=g).float())
    x[1, :64] = 0.0  # two whole blocks of zeros
    x[2] = 0.0  # a token of zeros (its output is the biases' path alone)
    x = x.to(torch.bfloat16)
    weights, ids = skewed_routing(9, e, k, seed=4)

    def run(x: torch.Tensor) -> torch.Tensor:
        return native_cpu.moe_experts(
            x, weights, ids, packed, config.swiglu_alpha, config.swiglu_limit, isa=isa
        )

    best = exact(x, weights, ids, experts, config)
    assert row_error(run(x), best) < 2**-7
    for value in (float("inf"), float("-inf"), float("nan")):
        bad = x.clone()
        bad[5, 7] = value
        got, ref = run(bad), reference(bad, weights, ids, experts, config)
        assert not torch.isfinite(got[5]).all() and not torch.isfinite(ref[5]).all(), value
        others = [r for r in range(9) if r != 5]
        assert torch.equal(got[others], run(x)[others])


@pytest.mark.parametrize("isa", [i for i in native_cpu.ISAS if native_cpu.available() and _runnable(i)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gates_past_exps_range_give_finite_outputs(layers_by_shape, isa, dtype):
    """Tokens of magnitude 1e3 to 1e36 make mlp1's gates up to ~1e37 (finite): the sigmoid
    of a gate that negative is 0 (its exp overflows to inf), the SwiGLU's output 0, and the
    token's output finite and as accurate as any other's, on every path (the vector exp past
    its range included)."""
    h, i, e, k = SHAPES[1]
    experts, packed = layers_by_shape[h, i]
    config = ModelConfig(hidden_size=h, intermediate_size=i, num_experts=e, experts_per_token=k)
    g = torch.Generator().manual_seed(22)
    x = torch.randn(12, h, generator=g) * torch.logspace(3, 36, 12)[:, None]
    x = x.to(dtype)
    weights, ids = skewed_routing(12, e, k, seed=5)
    got = native_cpu.moe_experts(x, weights, ids, packed, config.swiglu_alpha, config.swiglu_limit, isa=isa)
    assert torch.isfinite(got).all()
    assert row_error(got, exact(x, weights, ids, experts, config)) < (
        2**-7 if dtype == torch.bfloat16 else 1e-5
    )


def test_scales_outside_the_foldable_range_fall_back_exactly():
    """Scale bytes the tiles' exponent trick cannot fold (0, 1, 253, 254) on all-zero blocks:
    the layer is marked, runs on the dot-product paths and still matches."""
    h, i, e, k = 64, 32, 3, 2
    experts = random_experts(e, h, i, seed=11)
    assert experts.mlp1_blocks is not None and experts.mlp1_scales is not None
    for row, scale in enumerate((0, 1, 253, 254)):
        experts.mlp1_blocks[1, row, 0] = 0x88 if row % 2 else 0  # -0 / +0 nibbles
        experts.mlp1_scales[1, row, 0] = scale
    packed = native_cpu.PackedExperts.from_expert_weights(experts)
    assert not packed.scales_foldable
    config = ModelConfig(hidden_size=h, intermediate_size=i, num_experts=e, experts_per_token=k)
    weights, ids = skewed_routing(40, e, k, seed=2)
    ids[:, 0] = 1
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(40, h).to(dtype)
        got = native_cpu.moe_experts(x, weights, ids, packed, config.swiglu_alpha, config.swiglu_limit,
                                     tile_min_rows=1)  # fmt: skip
        assert row_error(got, exact(x, weights, ids, experts, config)) < (
            1e-5 if dtype == torch.float32 else 2**-7
        )


def test_packed_experts_keep_the_packed_size(layers_by_shape):
    experts, packed = layers_by_shape[SHAPES[1][0], SHAPES[1][1]]
    tensors = (experts.mlp1_blocks, experts.mlp1_scales, experts.mlp2_blocks, experts.mlp2_scales)
    assert packed.nbytes == sum(t.numel() for t in tensors if t is not None)
    h, i = SHAPES[1][0], SHAPES[1][1]
    weights_count = packed.num_experts * 3 * h * i
    assert packed.nbytes * 8 / weights_count == pytest.approx(4.25)
    with pytest.raises(ValueError):
        native_cpu.PackedExperts.from_expert_weights(
            ExpertWeights(mlp1_bias=torch.zeros(1, 64), mlp2_bias=torch.zeros(1, 32),
                          mlp1_dense=torch.zeros(1, 32, 64), mlp2_dense=torch.zeros(1, 32, 32))
        )  # fmt: skip


def test_second_process_loads_the_cached_build():
    """The library built once is loaded, not rebuilt, by the next process."""
    assert native_cpu.build_info()["path"]
    code = "import json; from model.kernels import native_cpu as n; n.available(); print(json.dumps(n.build_info()))"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300, check=True)  # fmt: skip
    info = json.loads(result.stdout.strip().splitlines()[-1])
    assert info["compiled"] is False
    assert info["path"] == native_cpu.build_info()["path"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    ("kv_heads", "group", "head_dim", "block"),
    [(1, 1, 32, 4), (2, 3, 64, 16), (3, 5, 48, 8), (2, 8, 64, 16), (1, 2, 128, 2)],
)
def test_paged_decode_attention_matches_the_reference(dtype, kv_heads, group, head_dim, block):
    """The kernel itself in both dtypes: rows written, others untouched. In bf16, head sizes
    that are a multiple of 32 with even blocks take the AVX-512 BF16 dot-product path where
    the CPU has it (48 and odd shapes the widening one)."""
    from model.paged_attention import DecodeGroup, attend_decode_group

    g = torch.Generator().manual_seed(kv_heads * 100 + head_dim)
    heads, num_blocks, batch, nblk, tokens = kv_heads * group, 30, 4, 5, 7
    kc, vc = (torch.randn(kv_heads, num_blocks, block, head_dim, generator=g).to(dtype) for _ in range(2))
    q = torch.randn(tokens, heads, head_dim, generator=g).to(dtype)
    rows = torch.tensor([0, 2, 3, 6])
    blocks = torch.randint(0, num_blocks, (batch * nblk,), generator=g)
    mask = torch.rand(batch, nblk * block, generator=g) < 0.6
    mask[:, 0] = True  # every query sees at least its own key
    sinks = torch.randn(heads, generator=g)
    group_ = DecodeGroup(rows=rows, blocks=blocks, mask=mask)
    expected = torch.zeros(tokens, heads, head_dim, dtype=dtype)
    attend_decode_group(group_, q, kc, vc, sinks, head_dim**-0.5, expected)
    got = torch.full_like(expected, 7.0)
    native_cpu.paged_decode_attention(q, kc, vc, rows, blocks, mask, sinks, head_dim**-0.5, got)
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    scale = expected[rows].float().abs().amax(-1, keepdim=True)
    assert ((got[rows].float() - expected[rows].float()).abs() / scale).max() <= tolerance
    untouched = [i for i in range(tokens) if i not in rows.tolist()]
    assert (got[untouched] == 7.0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("rows", "hidden"), [(1, 640), (3, 37), (300, 96), (2, 2880)])
def test_rms_norm_matches_the_reference(dtype, rows, hidden):
    """Rows of odd widths (not a multiple of the 16 lanes), one row, and enough rows to split
    across threads; the input a strided view, as the residual stream's rows may be. The sum of
    squares is ordered differently from torch's, so the result may move by the rounding of
    the mean: within an ulp of fp32, and within one bf16 rounding step."""
    g = torch.Generator().manual_seed(rows * 7 + hidden)
    wide = (torch.randn(rows, hidden + 5, generator=g) * 3).to(dtype)
    x = wide[:, 2 : 2 + hidden]  # row stride hidden + 5
    scale = torch.rand(hidden, generator=g) + 0.5
    expected = layers.rms_norm(x, scale, 1e-5)
    got = native_cpu.rms_norm(x, scale, 1e-5)
    assert got.dtype == dtype and got.shape == (rows, hidden) and got.is_contiguous()
    diff = (got.float() - expected.float()).abs() / expected.float().abs().clamp_min(1e-30)
    assert diff.max() <= (1e-6 if dtype == torch.float32 else 2**-7)
    out = torch.full_like(expected, float("nan"))
    assert native_cpu.rms_norm(x, scale, 1e-5, out=out) is out and torch.equal(out, got)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("rows", "heads", "head_dim"), [(1, 64, 64), (5, 3, 6), (300, 4, 64), (2, 7, 2)])
def test_rope_is_bit_identical_to_the_reference(dtype, rows, heads, head_dim):
    """The rotation's arithmetic is the reference's operation for operation, so the result is
    equal, for q and k read as views into one fused projection output (row stride = all
    heads of q, k and v), at real YaRN positions."""
    from model.config import ModelConfig
    from model.layers import YarnRope

    g = torch.Generator().manual_seed(rows + heads * 10 + head_dim)
    kv = max(1, heads // 2)
    qkv = (torch.randn(rows, (heads + 2 * kv) * head_dim, generator=g) * 4).to(dtype)
    q = qkv[:, : heads * head_dim].view(rows, heads, head_dim)
    k = qkv[:, heads * head_dim : (heads + kv) * head_dim].view(rows, kv, head_dim)
    config = ModelConfig(head_dim=head_dim, rope_scaling_factor=32.0)
    cos, sin = YarnRope(config).cos_sin(torch.randint(0, 100000, (rows,), generator=g))
    for x in (q, k):
        expected = YarnRope.apply(x, cos, sin)
        got = native_cpu.rope(x, cos, sin)
        assert got.dtype == dtype and got.is_contiguous() and torch.equal(got, expected)
