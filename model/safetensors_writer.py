"""Streaming safetensors writer: tensors are produced and written one at a time, so a
13.8 GB checkpoint never sits in memory. The format is an 8-byte little-endian header
length, a JSON header (name -> dtype, shape, data_offsets), then the raw bytes.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.int16: "I16",
    torch.int32: "I32",
    torch.int64: "I64",
    torch.bool: "BOOL",
}


@dataclass
class TensorSpec:
    """A tensor to write: its name, dtype, shape and a producer of its data in chunks along
    dim 0 (the chunks, concatenated, must give exactly ``shape``)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    produce: Callable[[], Iterable[torch.Tensor]]

    @property
    def nbytes(self) -> int:
        n = torch.tensor([], dtype=self.dtype).element_size()
        for d in self.shape:
            n *= d
        return n


def write_safetensors(path: Path, specs: list[TensorSpec], metadata: dict[str, str] | None = None) -> None:
    header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for spec in specs:
        header[spec.name] = {
            "dtype": SAFETENSORS_DTYPES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # data starts 8-byte aligned
    tmp = path.with_suffix(path.suffix + ".partial")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for spec in specs:
            written = 0
            for chunk in _checked_chunks(spec):
                data = chunk.contiguous().reshape(-1).view(torch.uint8).numpy()
                f.write(memoryview(data))
                written += data.nbytes
            if written != spec.nbytes:
                raise RuntimeError(f"{spec.name}: producer wrote {written} bytes, expected {spec.nbytes}")
    tmp.replace(path)


def _checked_chunks(spec: TensorSpec) -> Iterator[torch.Tensor]:
    for chunk in spec.produce():
        if chunk.dtype != spec.dtype or tuple(chunk.shape[1:]) != tuple(spec.shape[1:]):
            raise RuntimeError(
                f"{spec.name}: chunk {chunk.dtype}{tuple(chunk.shape)} does not fit {spec.shape}"
            )
        yield chunk.cpu()
