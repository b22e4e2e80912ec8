"""Memory-mapped safetensors reading (single file or sharded), with clear errors.

Tensors are views of a private (copy-on-write) mapping of the file: nothing is read until
used, and the pages are the OS page cache's, so a 13.8 GB checkpoint costs only the pages
the model touches.
"""

from __future__ import annotations

import json
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from .safetensors_writer import SAFETENSORS_DTYPES

READ_AHEAD_STEP = 2 << 20  # bytes per MADV_WILLNEED call (see read_ahead)

# The format's dtype names, read side (the writer owns the table).
DTYPES: dict[str, torch.dtype] = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}


class CheckpointError(ValueError):
    """The checkpoint on disk is not what the model needs (missing, wrong, truncated)."""


@dataclass
class _Entry:
    file: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets in the file
    end: int


class SafetensorsDir:
    """All tensors of the ``*.safetensors`` files of a directory (or listed by an index)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            files = sorted({directory / f for f in weight_map.values()})
            for f in files:
                if not f.is_file():
                    raise CheckpointError(f"{index} lists {f.name}, which does not exist")
        else:
            files = sorted(directory.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"no .safetensors files in {directory}")
        self.entries: dict[str, _Entry] = {}
        self._maps: dict[Path, mmap.mmap] = {}
        self._views: dict[str, None] = {}  # handed out by get() and not released: in load order
        for f in files:
            self._read_header(f)

    def _read_header(self, path: Path) -> None:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: truncated (no safetensors header)")
            (header_len,) = struct.unpack("<Q", raw)
            if header_len > size - 8 or header_len > 100_000_000:
                raise CheckpointError(f"{path}: truncated or not safetensors (header length {header_len})")
            try:
                header = json.loads(fh.read(header_len))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from e
        data_start = 8 + header_len
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype = info.get("dtype")
            if dtype not in DTYPES:
                raise CheckpointError(
                    f"{path}: tensor {name} has dtype {dtype!r}, which this loader does not support"
                )
            begin, end = info["data_offsets"]
            shape = tuple(int(d) for d in info["shape"])
            expected = torch.empty((), dtype=DTYPES[dtype]).element_size()
            for d in shape:
                expected *= d
            if end - begin != expected:
                raise CheckpointError(f"{path}: tensor {name} byte range does not match its shape {shape}")
            if data_start + end > size:
                raise CheckpointError(
                    f"{path}: truncated file ({size} bytes; tensor {name} needs {data_start + end})"
                )
            if name in self.entries:
                raise CheckpointError(f"tensor {name} appears in both {self.entries[name].file} and {path}")
            self.entries[name] = _Entry(path, dtype, shape, data_start + begin, data_start + end)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def names(self) -> list[str]:
        return list(self.entries)

    def nbytes(self) -> int:
        return sum(e.end - e.begin for e in self.entries.values())

    def release(self, name: str) -> None:
        """Drop this tensor's pages from the process's memory (``MADV_DONTNEED`` on the whole
        pages inside its byte range) once nothing reads its view any more: e.g. experts a
        kernel backend copied into a layout of its own, which would otherwise stay resident
        beside the copy. The mapping is private and never written, so a later read of the
        view would only fault the pages back in from the file."""
        self._views.pop(name, None)
        entry = self.entries.get(name)
        buf = self._maps.get(entry.file) if entry is not None else None
        if entry is None or buf is None:
            return
        page = mmap.PAGESIZE
        start = -(-entry.begin // page) * page  # inward: never a neighbour's page
        end = entry.end // page * page
        if end > start:
            buf.madvise(mmap.MADV_DONTNEED, start, end - start)

    def read_ahead(self) -> None:
        """Start reading every view still held (handed out by ``get`` and not released) into
        the page cache (``MADV_WILLNEED``). A view read a few rows at a time, such as the
        embedding, would otherwise pay a disk read at the first touch of each page that left
        the cache. Asynchronous, and the pages count in no process's memory until read."""
        page = mmap.PAGESIZE
        for name in self._views:
            entry = self.entries[name]
            buf = self._maps[entry.file]
            # Linux reads ahead at most a few MB per call (the device's readahead window), so
            # a larger range goes in steps of 2 MB.
            for start in range(entry.begin // page * page, entry.end, READ_AHEAD_STEP):
                buf.madvise(mmap.MADV_WILLNEED, start, min(READ_AHEAD_STEP, entry.end - start))

    def get(self, name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """The tensor as a zero-copy view of the mapped file; checks its shape if given."""
        entry = self.entries.get(name)
        if entry is None:
            raise CheckpointError(f"missing tensor {name!r} in checkpoint {self.directory}")
        if shape is not None and tuple(shape) != entry.shape:
            raise CheckpointError(f"tensor {name!r} has shape {list(entry.shape)}, expected {list(shape)}")
        buf = self._maps.get(entry.file)
        if buf is None:
            with open(entry.file, "rb") as fh:
                buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
            self._maps[entry.file] = buf
        dtype = DTYPES[entry.dtype]
        count = (entry.end - entry.begin) // torch.empty((), dtype=dtype).element_size()
        if count == 0:
            return torch.empty(entry.shape, dtype=dtype)
        flat = torch.frombuffer(buf, dtype=dtype, count=count, offset=entry.begin)
        self._views[name] = None
        return flat.view(entry.shape)
