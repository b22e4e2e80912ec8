"""Test doubles shared by the engine tests."""

from __future__ import annotations

import torch


class FlakyModel(torch.nn.Module):
    """Wraps the real model and raises while ``failing`` is set."""

    def __init__(self, inner: torch.nn.Module, message: str = "simulated device failure") -> None:
        super().__init__()
        self.inner = inner
        self.config = inner.config
        self.kernels = inner.kernels
        self.message = message
        self.failing = False

    def forward(self, *args: object, **kwargs: object) -> torch.Tensor:
        if self.failing:
            raise RuntimeError(self.message)
        return self.inner(*args, **kwargs)

    def final_hidden(self, *args: object, **kwargs: object) -> torch.Tensor:
        if self.failing:
            raise RuntimeError(self.message)
        return self.inner.final_hidden(*args, **kwargs)

    def head(self, *args: object, **kwargs: object) -> torch.Tensor:
        return self.inner.head(*args, **kwargs)
