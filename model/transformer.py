"""The gpt-oss transformer over a flattened batch (prefill chunks and decode tokens mixed)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .batch import BatchMetadata
from .config import ModelConfig
from .kernels import Kernels, ReferenceKernels
from .kv_cache import KVCache
from .layers import ExpertWeights, YarnRope, route
from .paged_attention import build_plan
from .prepacked import PackedLinear


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor  # [H] fp32
    # The projections as loaded, or in a backend's own layout (``Kernels.prepare_linear``).
    qkv_weight: torch.Tensor | PackedLinear  # [q + 2kv, H]: rows q, then k, then v
    qkv_bias: torch.Tensor
    sinks: torch.Tensor  # [heads] fp32
    out_weight: torch.Tensor | PackedLinear  # [H, q]
    out_bias: torch.Tensor
    mlp_norm: torch.Tensor  # [H] fp32
    router_weight: torch.Tensor  # [E, H] fp32 (router math is fp32)
    router_bias: torch.Tensor  # [E] fp32
    experts: ExpertWeights


@dataclass
class ModelWeights:
    embedding: torch.Tensor  # [V, H]
    layers: list[LayerWeights]
    norm: torch.Tensor  # [H] fp32
    unembedding: torch.Tensor  # [V, H]
    # The unembedding as the kernels read it, when they keep a copy of their own (built once by
    # ``kernels.prepare_lm_head``): oneDNN's layout for the reference on CPU bf16, or the native
    # backend's.
    unembedding_prepacked: PackedLinear | None = None


class GptOssModel(torch.nn.Module):
    """Weights are plain tensors (inference only, possibly memory-mapped), not parameters.
    The matmuls, attention and experts run through ``kernels`` (model/kernels/; the
    reference backend unless the loader chose another)."""

    def __init__(
        self, config: ModelConfig, weights: ModelWeights, dtype: torch.dtype, kernels: Kernels | None = None
    ) -> None:
        super().__init__()
        self.config = config
        self.weights = weights
        self.dtype = dtype
        self.device = weights.embedding.device
        self.rope = YarnRope(config, self.device)
        self.kernels: Kernels = kernels if kernels is not None else ReferenceKernels(self.device, dtype)

    def prepack(self, released: Callable[[str, int], None] | None = None) -> None:
        """Let the kernels put the experts and the unembedding in the form they read, once,
        at load; ``released(part, i)`` is told when a weight as loaded is no longer read (the
        backend copied it: part ``experts``, ``qkv`` or ``out`` of layer i, layer by layer, or
        ``unembedding`` with i = -1), so the loader can free it before the next copy. The reference prepacks dense experts and the unembedding for oneDNN where
        that path exists (bf16 on the CPU; see model/prepacked.py): same results, faster
        small-batch matmuls, and leaves the attention projections plain; the native CPU
        backend lays the bf16 projections and unembedding out for its own kernel."""

        def release(part: str, i: int) -> None:  # the backend holds a copy of its own
            if released is not None:
                released(part, i)

        self.kernels.prepare_lm_head(self.weights)
        if self.weights.unembedding_prepacked is not None:
            release("unembedding", -1)
        for i, layer in enumerate(self.weights.layers):
            for part in ("qkv", "out"):
                loaded = getattr(layer, f"{part}_weight")
                if isinstance(loaded, torch.Tensor):
                    setattr(layer, f"{part}_weight", self.kernels.prepare_linear(loaded))
                    if getattr(layer, f"{part}_weight") is not loaded:
                        release(part, i)
            before = layer.experts.mlp1_blocks
            layer.experts = self.kernels.prepare_experts(layer.experts, self.config)
            if before is not None and layer.experts.mlp1_blocks is not before:
                release("experts", i)

    def weights_nbytes(self) -> int:
        """Bytes of all weight tensors as held (packed experts count at 4.25 bits)."""
        seen: set[int] = set()
        total = 0
        w = self.weights
        tensors = [w.embedding, w.norm, w.unembedding]
        if w.unembedding_prepacked is not None:  # its weight, and whatever a backend keeps beside it
            tensors += [v for v in vars(w.unembedding_prepacked).values() if isinstance(v, torch.Tensor)]
        for layer in w.layers:
            tensors += [v for v in vars(layer).values() if isinstance(v, torch.Tensor)]
            tensors += [
                w.weight for w in (layer.qkv_weight, layer.out_weight) if not isinstance(w, torch.Tensor)
            ]
            for held in vars(layer.experts).values():
                if isinstance(held, torch.Tensor):
                    tensors.append(held)
                elif hasattr(held, "__dict__"):  # a backend's own layout (native_cpu.PackedExperts)
                    tensors += [v for v in vars(held).values() if isinstance(v, torch.Tensor)]
            tensors += [p.weight for pair in layer.experts.prepacked or [] for p in pair]
        for t in tensors:
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
        return total

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        meta: BatchMetadata,
        kv_cache: KVCache | None = None,
        greedy: bool = False,
    ) -> torch.Tensor:
        """input_ids [T] -> logits [len(meta.logits_indices), vocab] in the model dtype (the
        unembedding's own output, as transformers' lm_head; whoever needs fp32 maths upcasts
        the rows it uses: at batch 64 an fp32 copy of every row would be a 51 MB pass).
        With ``greedy``: their argmax instead, int64 [len(meta.logits_indices)], which a
        backend may compute without writing the logits."""
        return self.head(self.final_hidden(input_ids, meta, kv_cache), greedy)

    @torch.inference_mode()
    def head(self, hidden: torch.Tensor, greedy: bool = False) -> torch.Tensor:
        """``final_hidden``'s rows -> their logits, or with ``greedy`` their argmax (as
        ``forward``). Rows can come back for their logits after a greedy pass."""
        ops = self.kernels
        return ops.lm_head_argmax(hidden, self.weights) if greedy else ops.lm_head(hidden, self.weights)

    @torch.inference_mode()
    def final_hidden(
        self, input_ids: torch.Tensor, meta: BatchMetadata, kv_cache: KVCache | None = None
    ) -> torch.Tensor:
        """input_ids [T] -> the final-normed rows of meta.logits_indices [N, H] (the LM head's
        input), in the model dtype."""
        c = self.config
        w = self.weights
        ops = self.kernels
        if kv_cache is not None and kv_cache.config.num_layers != c.num_layers:
            raise ValueError("KV cache was built for a different model")
        block_size = kv_cache.block_size if kv_cache is not None else 1
        plans = {}  # one attention plan per pool kind in use, shared by all its layers
        for sliding, table in ((False, meta.full_block_table), (True, meta.sliding_block_table)):
            if not (c.sliding_layers if sliding else c.full_layers):
                continue
            if kv_cache is not None and table is None:
                kind = "sliding" if sliding else "full"
                raise ValueError(f"a KV cache needs meta.{kind}_block_table")
            window = c.sliding_window if sliding else None
            plans[sliding] = build_plan(meta, table if kv_cache is not None else None, block_size, window)
        cos, sin = self.rope.cos_sin(meta.positions.to(self.device))
        x = w.embedding.index_select(0, input_ids.to(self.device)).to(self.dtype)
        t = x.shape[0]
        for i, layer in enumerate(w.layers):
            # Attention half.
            y = ops.rms_norm(x, layer.attn_norm, c.rms_norm_eps)
            qkv = ops.linear(y, layer.qkv_weight, layer.qkv_bias)
            q = qkv[:, : c.q_dim].view(t, c.num_heads, c.head_dim)
            k = qkv[:, c.q_dim : c.q_dim + c.kv_dim].view(t, c.num_kv_heads, c.head_dim)
            v = qkv[:, c.q_dim + c.kv_dim :].view(t, c.num_kv_heads, c.head_dim)
            # Q and K rotated in fp32, kept in the model dtype (as the references keep them);
            # K is stored and attended that way whether or not it goes through the cache, so
            # cached decode and full recomputation see the same keys.
            q = ops.rope(q, cos, sin)
            k = ops.rope(k, cos, sin)
            sliding = c.is_sliding(i)
            attn = ops.attention(
                plans[sliding], q, k, v,
                kv_cache.k[i] if kv_cache is not None else None,
                kv_cache.v[i] if kv_cache is not None else None,
                layer.sinks, c.sm_scale,
            )  # fmt: skip
            attn = attn.reshape(t, c.q_dim)
            x = x + ops.linear(attn, layer.out_weight, layer.out_bias)
            # MoE half: the router in fp32 here (the same on every backend), the experts there.
            y = ops.rms_norm(x, layer.mlp_norm, c.rms_norm_eps)
            routing_weights, expert_ids = route(
                y, layer.router_weight, layer.router_bias, c.experts_per_token
            )
            x = x + ops.moe(y, routing_weights, expert_ids, layer.experts, c)
        x = x.index_select(0, meta.logits_indices.to(self.device))
        return ops.rms_norm(x, w.norm, c.rms_norm_eps)
