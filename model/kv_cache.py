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

import math
import mmap

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
            self.k.append(lazy_zeros(shape, dtype, self.device))
            self.v.append(lazy_zeros(shape, dtype, self.device))

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


def lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero tensor. On the CPU its pages come from an anonymous mapping, which the OS backs
    with memory on first write: a cache sized for its worst case (1 GiB by default) then holds
    resident only the blocks sequences have written, where ``torch.zeros`` would touch every
    page at start. The tensor keeps the mapping alive."""
    nbytes = math.prod(shape) * dtype.itemsize
    if device.type != "cpu" or nbytes == 0:
        return torch.zeros(shape, dtype=dtype, device=device)
    pages = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(pages, dtype=dtype).view(shape)
