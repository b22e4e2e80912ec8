"""Weights reordered once into oneDNN's blocked layout, for bfloat16 matmuls on the CPU.

``F.linear`` on bf16 CPU tensors already runs oneDNN, but reorders the weight into oneDNN's
blocked layout on every call. When few rows multiply a large weight (decode: the experts, the
unembedding), that reorder costs about as much as the product itself; reordering once at load
made 32 experts' first projection ~40% faster at 8 rows and the unembedding 20-45% faster at
8-64 rows on our CPU. Results are bit-identical to ``F.linear`` (tests/test_model_moe.py).

This is a CPU fast path behind the same call as the portable one: where the ops are missing
(other devices, other dtypes, builds without oneDNN) nothing is prepacked and the model uses
its plain tensors, which stay the tested reference.
"""

from __future__ import annotations

from typing import Protocol

import torch

# The row count oneDNN tunes the packed layout for (the layout serves any row count).
BATCH_HINT = 8
# oneDNN's 1-3 row products read a large weight slower than its 4-row one: the small preset's
# unembedding [201088, 640] took 20.9 ms for 1 row and 16.4 ms for 4 (2 threads, AMD EPYC), so
# the unembedding pads its decode rows to this count (a c=1 token is mostly that one product).
# On that CPU each row's result is the same bits either way; a CPU where oneDNN picks another
# kernel at 4 rows (AMX) may round a logit differently, within bf16's rounding, as batching
# the rows would (tests/test_model_moe.py).
HEAD_MIN_ROWS = 4


class PackedLinear(Protocol):
    """A weight [out, in] held in the layout some kernel reads (built once at load), called
    as ``F.linear(x, weight, bias)``: ``PrepackedLinear`` here, or a backend's own (the native
    CPU backend's ``InterleavedLinear``). ``weight`` is the tensor held (memory accounting)."""

    weight: torch.Tensor

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor: ...


def prepack_available(device: torch.device, dtype: torch.dtype) -> bool:
    ops = torch.ops.mkldnn
    return (
        device.type == "cpu"
        and dtype == torch.bfloat16
        and torch.backends.mkldnn.is_available()
        and hasattr(ops, "_reorder_linear_weight")
        and hasattr(ops, "_linear_pointwise")
    )


class PrepackedLinear:
    """``F.linear(x, weight, bias)`` with ``weight`` [out, in] reordered once; fewer than
    ``min_rows`` rows are zero-padded to it (see HEAD_MIN_ROWS)."""

    def __init__(self, weight: torch.Tensor, min_rows: int = 1) -> None:
        self.out_features, self.in_features = weight.shape
        self.min_rows = min_rows
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), BATCH_HINT)

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        n = x.shape[0]
        if 0 < n < self.min_rows:
            padded = torch.cat([x, x.new_zeros(self.min_rows - n, x.shape[1])])
            return self(padded, bias)[:n]
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, bias, "none", [], "")

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()
