"""The two ways experts run (one by one, batched over padded rows) give the same result."""

from __future__ import annotations

import pytest
import torch

import model.layers as layers
from model.config import ModelConfig
from model.layers import ExpertWeights, moe


def _experts(config: ModelConfig, dtype: torch.dtype, seed: int) -> tuple[ExpertWeights, torch.Tensor, torch.Tensor]:
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
    torch.testing.assert_close(batched, one_by_one, rtol=1e-5 if dtype == torch.float32 else 0, atol=1e-5 if dtype == torch.float32 else 0)
