"""The kernel seam: the ops the forward pass runs (``base.Kernels``), their backends, and
the choice among them.

- ``Kernels``: ``prepare_experts``, ``prepare_lm_head`` (once at load), ``moe``,
  ``attention`` (KV write + paged attention with sinks and windows), ``linear``, ``lm_head``.
- ``ReferenceKernels``: today's PyTorch code; the oracle and the fallback everywhere.
- ``select_kernels(name, device, dtype, config, weights)``: ``auto`` or a name of
  ``BACKENDS``; with weights, a non-reference backend is self-checked first (``check.self_check``).
- ``cpu_features()``: the CPU's flags (``avx2``, ``avx512_bf16``, ``amx_bf16``...).
"""

from .base import Kernels
from .check import self_check
from .reference import REFERENCE, ReferenceKernels
from .select import (
    AUTO,
    BACKENDS,
    NATIVE_CPU,
    BackendUnavailable,
    available_backends,
    cpu_features,
    select_kernels,
)

__all__ = [
    "AUTO",
    "BACKENDS",
    "NATIVE_CPU",
    "REFERENCE",
    "BackendUnavailable",
    "Kernels",
    "ReferenceKernels",
    "available_backends",
    "cpu_features",
    "select_kernels",
    "self_check",
]
