"""Engine configuration: one dataclass, passed explicitly to everything that needs it."""

from __future__ import annotations

from dataclasses import dataclass

from .step_budget import parse_step_target

DTYPES = ("float32", "bfloat16")
DEFAULT_CPU_KV_BYTES = 1 << 30
# On an accelerator: the share of the memory left after loading weights given to the cache
# (the rest is headroom for activations, logits and the sampler).
ACCELERATOR_KV_FRACTION = 0.8


def resolve_dtype(dtype: str, device: str) -> str:
    """``"auto"`` -> ``"bfloat16"`` on CUDA, ``"float32"`` elsewhere (exact on the CPU); a
    named dtype is returned as it is. Anything else is a ValueError."""
    if dtype == "auto":
        return "bfloat16" if device.split(":")[0] == "cuda" else "float32"
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {DTYPES}, not {dtype!r}")
    return dtype


@dataclass
class EngineConfig:
    model_dir: str
    # "float32" | "bfloat16" (weights, activations and the KV cache) | "auto" (resolve_dtype:
    # bfloat16 on CUDA, float32 elsewhere; resolved here, so self.dtype is never "auto").
    dtype: str = "float32"
    device: str = "cpu"
    block_size: int = 16  # tokens per KV block
    # Bytes for the KV cache (both pools). None: on an accelerator a share of free memory;
    # on the CPU 1 GiB, capped to what max_num_seqs sequences of max_model_len need.
    kv_cache_memory: int | None = None
    max_num_seqs: int = 64  # running sequences per step
    max_num_batched_tokens: int = 2048  # new tokens per forward pass (decodes + prefill chunks)
    # While requests decode, a step's prefill tokens are bounded to keep the step near this
    # time (engine/step_budget.py): "auto" (twice the decode tokens' own time), milliseconds, "off".
    step_target: str = "auto"
    max_model_len: int | None = None  # None: the model's context, capped by what the cache holds
    max_waiting: int = 1024  # bound of the waiting queue (QueueFullError beyond it)
    enable_prefix_caching: bool = True
    dequantize_experts: bool = False
    # The model's kernel backend: "auto" (by device and CPU features, self-checked at load,
    # else the reference) or a name from model.kernels.BACKENDS ("reference", "native-cpu").
    kernels: str = "auto"
    seed: int = 0  # seeds the generator of requests that have no seed of their own

    def __post_init__(self) -> None:
        self.dtype = resolve_dtype(self.dtype, self.device)
        if self.block_size <= 0:
            raise ValueError("block_size must be positive")
        if self.max_num_seqs <= 0 or self.max_num_batched_tokens <= 0:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be positive")
        parse_step_target(self.step_target)  # ValueError on anything else
        if self.max_waiting < 0:
            raise ValueError("max_waiting must be >= 0")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError("kv_cache_memory must be positive")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError("max_model_len must be >= 2")
