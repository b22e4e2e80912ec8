"""The kernel interface: every heavy op of the forward pass, and the one-time preparation
of the weights those ops read.

``GptOssModel.forward`` calls these and nothing else for its matmuls, attention and
experts, so a backend (``reference.py``: today's PyTorch code; a native one) is swapped in
without the network knowing. RMSNorm and RoPE are ops too (a handful of small torch ops each,
one pass natively: together ~1 ms of a batch-1 token); the router's top-k stays in the
forward pass, the same on every backend.

Contract for every op: inputs are on the model's device, outputs come back on it, in the
dtype documented; an op never changes its inputs (except the KV cache ``attention`` writes
and an ``out`` it is given), so the same call can be checked against the reference
(``check.py``). Where an op takes ``out``, it writes every element of it and returns
it: the forward pass can then preallocate its buffers (for CUDA graphs, later).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from ..config import ModelConfig
    from ..layers import ExpertWeights
    from ..paged_attention import AttentionPlan
    from ..prepacked import PackedLinear
    from ..transformer import ModelWeights


class Kernels(Protocol):
    """One backend's ops. ``name`` is the ``--kernels`` value that selects it."""

    name: str

    def fallback(self) -> Kernels | None:
        """A slower variant of this backend for ``auto`` to try when this one fails its
        self-check (the native CPU backend one CPU path lower: AMX, then AVX-512 VNNI, ...),
        or None."""
        ...

    def prepare_experts(self, experts: ExpertWeights, config: ModelConfig) -> ExpertWeights:
        """Once per layer at load: the experts in the form this backend's ``moe`` reads.
        May return the same object with attributes replaced, or a new one (a subclass can
        carry the backend's own layout); must not write into the given tensors, which may be
        memory-mapped from the checkpoint."""
        ...

    def prepare_lm_head(self, weights: ModelWeights) -> None:
        """Once at load: whatever ``lm_head`` keeps beside ``weights.unembedding`` (the
        reference sets ``weights.unembedding_prepacked`` where oneDNN is there)."""
        ...

    def moe(
        self,
        x: torch.Tensor,
        routing_weights: torch.Tensor,
        expert_ids: torch.Tensor,
        experts: ExpertWeights,
        config: ModelConfig,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The mixture of experts of T rows, after the router.

        x [T, H] normed activations in the model dtype; routing_weights [T, k] fp32 (softmax
        over the chosen k, already normalised); expert_ids [T, k] int64, distinct per row;
        experts as returned by ``prepare_experts`` (packed MXFP4 ``mlp*_blocks`` [E, out,
        in/32, 16] + ``mlp*_scales`` [E, out, in/32], or dense); config for E, the SwiGLU's
        alpha and limit. Returns [T, H] in x's dtype: sum_j w[t, j] * expert_{id[t, j]}(x[t])
        with expert_e(x) = mlp2_e(swiglu(mlp1_e(x) + b1_e)) + b2_e."""
        ...

    def attention(
        self,
        plan: AttentionPlan,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor | None,
        v_cache: torch.Tensor | None,
        sinks: torch.Tensor,
        sm_scale: float,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Writes the new tokens' K/V into the paged cache, then attends over it (causal,
        the plan's sliding window, one sink logit per head). q [T, H, D]; k, v [T, KVH, D];
        caches [KVH, blocks, block_size, D] (None with a plan built without a cache);
        sinks [H] fp32. Returns [T, H, D] in q's dtype (see ``paged_attention``)."""
        ...

    def prepare_linear(self, weight: torch.Tensor) -> torch.Tensor | PackedLinear:
        """Once per attention projection at load: the weight [out, in] in the form ``linear``
        reads (the reference keeps it as it is; a backend may hold a copy in its own layout
        instead, and the loaded one is then no longer referenced)."""
        ...

    def linear(
        self, x: torch.Tensor, weight: torch.Tensor | PackedLinear, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """x [T, in] @ weight [out, in].T + bias -> [T, out] in x's dtype (the attention
        projections); ``weight`` as loaded or as ``prepare_linear`` returned it."""
        ...

    def rms_norm(self, x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
        """x [T, H] -> x / sqrt(mean(x^2) + eps) * scale with fp32 statistics and the fp32
        scale [H], in x's dtype (``model.layers.rms_norm``)."""
        ...

    def rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [T, heads, D] (possibly a view into the qkv projection) rotated by fp32 cos, sin
        [T, D/2] in fp32 and rounded once: a new [T, heads, D] tensor in x's dtype
        (``model.layers.YarnRope.apply``)."""
        ...

    def lm_head(self, x: torch.Tensor, weights: ModelWeights) -> torch.Tensor:
        """x [N, H] (final-normed rows) -> logits [N, vocab] in the model dtype."""
        ...

    def lm_head_argmax(self, x: torch.Tensor, weights: ModelWeights) -> torch.Tensor:
        """The greedy tokens of ``lm_head(x, weights)``: int64 [N], as ``argmax`` of those
        logits. A backend may fuse the two and never write the logits."""
        ...

    def argmax(self, logits: torch.Tensor) -> torch.Tensor:
        """[N, V] -> int64 [N]: ``logits.argmax(dim=-1)`` exactly (the first index of each
        row's maximum, NaN counting as the maximum); the sampler's greedy rows."""
        ...
