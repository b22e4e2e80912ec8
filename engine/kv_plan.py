"""How many KV blocks of each pool to allocate, and the context length that results."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model.config import ModelConfig
from model.kv_cache import KVCache

from .config import ACCELERATOR_KV_FRACTION, DEFAULT_CPU_KV_BYTES, EngineConfig

# Sliding blocks kept beyond the working set, as a multiple of it, so that the window tail
# of recently finished prompts survives long enough to serve prefix-cache hits.
SLIDING_CACHE_FACTOR = 2


@dataclass(frozen=True)
class KVPlan:
    num_full_blocks: int
    num_sliding_blocks: int
    max_model_len: int
    nbytes: int


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def plan_kv_cache(
    config: EngineConfig, model_config: ModelConfig, dtype: torch.dtype, device: torch.device
) -> KVPlan:
    bs = config.block_size
    full_bytes, sliding_bytes = KVCache.bytes_per_block(model_config, bs, dtype)
    has_sliding = bool(model_config.sliding_layers)
    model_len = model_config.max_position_embeddings
    if config.max_model_len is not None:
        model_len = min(model_len, config.max_model_len)
    blocks_per_seq = _ceil_div(model_len, bs)

    # Sliding working set: per running sequence the window behind it plus the block being
    # filled (and one for a boundary), plus the step's new tokens (a prefill chunk needs its
    # whole span while it is computed). Never more than the sequences could use at full length.
    if has_sliding:
        window_blocks = _ceil_div(model_config.sliding_window - 1, bs) + 2
        working = config.max_num_seqs * window_blocks + _ceil_div(config.max_num_batched_tokens, bs)
        factor = SLIDING_CACHE_FACTOR if config.enable_prefix_caching else 1
        num_sliding = min(
            working * factor,
            config.max_num_seqs * blocks_per_seq + _ceil_div(config.max_num_batched_tokens, bs),
        )
        one_seq = min(window_blocks + _ceil_div(config.max_num_batched_tokens, bs), blocks_per_seq + 1)
    else:
        num_sliding = one_seq = 0

    budget = config.kv_cache_memory
    if budget is None:
        want = num_sliding * sliding_bytes + config.max_num_seqs * blocks_per_seq * full_bytes
        if device.type == "cpu":
            budget = min(DEFAULT_CPU_KV_BYTES, want)
        else:
            free, _total = (
                torch.cuda.mem_get_info(device) if device.type == "cuda" else (DEFAULT_CPU_KV_BYTES, 0)
            )
            budget = min(int(free * ACCELERATOR_KV_FRACTION), want)

    # The sliding pool takes at most half the budget (but always one sequence's working set).
    if has_sliding and num_sliding * sliding_bytes > budget // 2:
        num_sliding = max(one_seq, (budget // 2) // sliding_bytes)
    left = budget - num_sliding * sliding_bytes
    if full_bytes:
        num_full = left // full_bytes
    else:  # no full-attention layers: the full table is bookkeeping only
        num_full = config.max_num_seqs * blocks_per_seq
    if num_full < 1 or (has_sliding and num_sliding < one_seq):
        need = one_seq * sliding_bytes + 2 * full_bytes
        raise ValueError(f"kv_cache_memory {budget} B is too small: at least {need} B are needed")
    max_model_len = min(model_len, num_full * bs)
    return KVPlan(num_full, num_sliding, max_model_len, num_full * full_bytes + num_sliding * sliding_bytes)
