"""The two ways experts run (one by one, batched over padded rows) give the same result."""

from __future__ import annotations

import pytest
import torch

import model.layers as layers
from model.config import ModelConfig
from model.layers import ExpertWeights, moe


def _experts(
    config: ModelConfig, dtype: torch.dtype, seed: int
) -> tuple[ExpertWeights, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    e, h, i = config.num_experts, config.hidden_size, config.intermediate_size
    experts = ExpertWeights(
        mlp1_bias=torch.randn(e, 2 * i, generator=g),
        mlp2_bias=torch.randn(e, h, generator=g),
        mlp1_dense=(torch.randn(e, h, 2 * i, generator=g) / h**0.5).to(dtype),
        mlp2_dense=(torch.randn(e, i, h, generator=g) / i**0.5).to(dtype),
    )
    return experts, torch.randn(e, h, generator=g), torch.randn(e, generator=g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 3, 17, 64])
def test_batched_experts_equal_one_by_one(monkeypatch, dtype, tokens):
    config = ModelConfig(num_experts=8, experts_per_token=3, hidden_size=64, intermediate_size=96)
    experts, router_w, router_b = _experts(config, dtype, seed=tokens)
    y = torch.randn(tokens, config.hidden_size, generator=torch.Generator().manual_seed(7)).to(dtype)
    monkeypatch.setattr(layers, "BATCHED_EXPERT_ROWS", 10**9)
    batched = moe(y, experts, router_w, router_b, config)
    monkeypatch.setattr(layers, "BATCHED_EXPERT_ROWS", 0)
    one_by_one = moe(y, experts, router_w, router_b, config)
    torch.testing.assert_close(
        batched,
        one_by_one,
        rtol=1e-5 if dtype == torch.float32 else 0,
        atol=1e-5 if dtype == torch.float32 else 0,
    )


def test_prepacked_model_gives_the_same_logits(tiny_checkpoint_dir, monkeypatch):
    """bf16 on the CPU: prepacked experts and unembedding (oneDNN) change speed, not results."""
    from model.loader import load_model
    from model.prepacked import prepack_available
    from model.transformer import GptOssModel

    cpu = torch.device("cpu")
    prepacked = load_model(tiny_checkpoint_dir, torch.bfloat16, cpu, dequantize_experts=True)
    if not prepack_available(cpu, torch.bfloat16):  # a build without oneDNN: the plain path
        assert prepacked.weights.unembedding_prepacked is None
        return
    assert prepacked.weights.unembedding_prepacked is not None
    assert all(layer.experts.prepacked is not None for layer in prepacked.weights.layers)
    monkeypatch.setattr(GptOssModel, "prepack", lambda self, released=None: None)
    plain = load_model(tiny_checkpoint_dir, torch.bfloat16, cpu, dequantize_experts=True)
    from model.batch import BatchMetadata

    ids = torch.randint(0, plain.config.vocab_size, (37,), generator=torch.Generator().manual_seed(3))
    meta = BatchMetadata(
        positions=torch.arange(37), query_start=torch.tensor([0, 37]), context_lens=torch.tensor([0]),
        full_block_table=None, sliding_block_table=None, logits_indices=torch.arange(37),
    )  # fmt: skip
    assert torch.equal(prepacked(ids, meta), plain(ids, meta))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_experts_fused_per_expert_equal_one_swiglu_for_all(monkeypatch, dtype):
    """One by one, each expert's SwiGLU on its own rows (long prefills) or one SwiGLU over
    all rows (decode): the same numbers, to the bit."""
    config = ModelConfig(num_experts=8, experts_per_token=3, hidden_size=64, intermediate_size=96)
    experts, router_w, router_b = _experts(config, dtype, seed=5)
    y = torch.randn(50, config.hidden_size, generator=torch.Generator().manual_seed(8)).to(dtype)
    monkeypatch.setattr(layers, "BATCHED_EXPERT_ROWS", 0)
    monkeypatch.setattr(layers, "FUSED_EXPERT_ROWS", 0)
    fused = moe(y, experts, router_w, router_b, config)
    monkeypatch.setattr(layers, "FUSED_EXPERT_ROWS", 10**9)
    shared = moe(y, experts, router_w, router_b, config)
    assert torch.equal(fused, shared)


@pytest.mark.parametrize("rows", [1, 2, 3])
def test_a_prepacked_head_padded_to_more_rows_gives_the_product_of_those_rows(rows):
    """The unembedding pads 1-3 decode rows (model/prepacked.py, HEAD_MIN_ROWS): the rows
    asked for are exactly their rows of the padded product, and agree with F.linear within
    bf16's rounding (on CPUs without AMX, to the bit)."""
    from model.kernels.check import TOLERANCE, max_relative_error
    from model.prepacked import HEAD_MIN_ROWS, PrepackedLinear, prepack_available

    g = torch.Generator().manual_seed(rows)
    w = (torch.randn(3001, 640, generator=g) * 0.05).bfloat16()
    x = torch.randn(rows, 640, generator=g).bfloat16()
    if not prepack_available(torch.device("cpu"), torch.bfloat16):
        # A build without oneDNN: nothing is prepacked or padded, the head is F.linear.
        from types import SimpleNamespace

        from model.kernels import ReferenceKernels

        head = SimpleNamespace(unembedding=w, unembedding_prepacked=None)
        kernels = ReferenceKernels(torch.device("cpu"), torch.bfloat16)
        kernels.prepare_lm_head(head)
        assert head.unembedding_prepacked is None
        assert torch.equal(kernels.lm_head(x, head), torch.nn.functional.linear(x, w))
        return
    padded, plain = PrepackedLinear(w, HEAD_MIN_ROWS), PrepackedLinear(w)
    got = padded(x)
    assert got.shape == (rows, 3001)
    assert torch.equal(got, plain(torch.cat([x, x.new_zeros(HEAD_MIN_ROWS - rows, 640)]))[:rows])
    assert max_relative_error(got, torch.nn.functional.linear(x, w)) <= TOLERANCE[torch.bfloat16]
    assert torch.equal(plain(x[:0]), padded(x[:0]))  # no rows: nothing padded
