"""The server's configuration: one dataclass, filled by ``server.cli`` from flags and env vars."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

REASONING_EFFORTS = ("low", "medium", "high")

# The embedded default model's public name (README examples use it).
DEFAULT_MODEL_NAME = "gpt-oss-tiny-random"

_BYTE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "t": 1000**4,
    "tb": 1000**4,
    "tib": 1024**4,
}


def parse_bytes(text: str) -> int:
    """``"2GiB"`` -> 2147483648, ``"512MB"`` -> 512000000, ``"1e9"`` -> 1000000000."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    if not match:
        raise ValueError(f"not a size: {text!r} (examples: 2GiB, 512MiB, 1e9)")
    number, unit = match.groups()
    factor = _BYTE_UNITS.get(unit.lower())
    if factor is None:
        raise ValueError(f"unknown size unit {unit!r} in {text!r} (use B, KiB, MiB, GiB, KB, MB, GB)")
    value = int(float(number) * factor)
    if value <= 0:
        raise ValueError(f"size must be positive: {text!r}")
    return value


@dataclass
class ServerSettings:
    host: str = "0.0.0.0"
    port: int = 8000
    model: str | None = None  # checkpoint folder; None = the embedded random-weight default
    served_model_name: list[str] = field(default_factory=list)  # empty = derived from the model
    dtype: str = "auto"  # auto = bfloat16 on CUDA, float32 elsewhere (exact on CPU)
    device: str = "cpu"
    kv_cache_memory: int | None = None  # bytes; None = the engine's default
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    max_waiting: int = 1024
    enable_prefix_caching: bool = True
    dequantize_experts: bool = False
    seed: int = 0
    cache_dir: Path | None = None  # embedded default model cache; None = ~/.cache/gptoss-server
    max_body_bytes: int = 4 * 1024 * 1024
    api_keys: list[str] = field(default_factory=list)
    log_level: str = "info"
    log_requests: bool = False  # log prompt and completion text (off: privacy)
    drain_timeout: float = 30.0  # seconds in-flight requests get after SIGTERM
    default_reasoning_effort: str = "medium"
    # Test-only: a JSON file of scripted outputs replacing the sampler's choice (see server.scripted).
    scripted_tokens: Path | None = None

    def model_names(self) -> list[str]:
        if self.served_model_name:
            return list(self.served_model_name)
        if self.model is None:
            return [DEFAULT_MODEL_NAME]
        return [Path(self.model).resolve().name or "gpt-oss"]
