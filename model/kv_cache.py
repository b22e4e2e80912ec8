"""The paged KV cache: per layer, K and V as ``[n_kv_heads, num_blocks, block_size, head_dim]``.

KV heads outermost: gathering a sequence's blocks (``index_select`` on dim 1) yields each
head's keys as one contiguous ``[tokens, head_dim]`` run, which is what the attention
matmuls want, without a transposing copy.

Full-attention layers index the full pool and sliding-window layers the sliding pool; both
pools use the same logical block numbering (``position // block_size``). The engine owns
which physical block each sequence holds (the block tables in ``BatchMetadata``); the cache
only stores the tensors.
"""

from __future__ import annotations

import torch

from .config import ModelConfig


class KVCache:
    def __init__(
        self,
        config: ModelConfig,
        block_size: int,
        num_full_blocks: int,
        num_sliding_blocks: int,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
    ) -> None:
        if block_size <= 0:
            raise ValueError("block_size must be positive")
        self.config = config
        self.block_size = block_size
        self.num_full_blocks = num_full_blocks
        self.num_sliding_blocks = num_sliding_blocks
        self.dtype = dtype
        self.device = torch.device(device)
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        for layer in range(config.num_layers):
            n = num_sliding_blocks if config.is_sliding(layer) else num_full_blocks
            shape = (config.num_kv_heads, n, block_size, config.head_dim)
            self.k.append(torch.zeros(shape, dtype=dtype, device=self.device))
            self.v.append(torch.zeros(shape, dtype=dtype, device=self.device))

    def num_blocks(self, layer: int) -> int:
        return self.num_sliding_blocks if self.config.is_sliding(layer) else self.num_full_blocks

    @staticmethod
    def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> tuple[int, int]:
        """Bytes of one full-pool block across all full layers, and of one sliding-pool block
        across all sliding layers (K and V both counted)."""
        per_layer = (
            2
            * block_size
            * config.num_kv_heads
            * config.head_dim
            * torch.empty((), dtype=dtype).element_size()
        )
        return per_layer * len(config.full_layers), per_layer * len(config.sliding_layers)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))
