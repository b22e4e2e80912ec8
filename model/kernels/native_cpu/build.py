"""How this process gets the native library: loaded from the per-machine cache, or compiled
into it once with torch's extension builder (never at import; see the package docstring)."""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# The MoE kernel's paths, slowest first; the C++ side numbers them the same way.
ISAS: tuple[str, ...] = ("generic", "avx2", "avx512_bf16", "avx512_vnni", "amx")

_DIR = Path(__file__).resolve().parent
_COMPILED = ("moe.cpp", "attention.cpp", "linear.cpp", "head.cpp", "norm_rope.cpp")
_SOURCES = (*_COMPILED, "tile_generic.h", "bf16.h", "runs.h", "interleaved.h")
_CFLAGS = ("-O3", "-fopenmp", "-std=c++17")
_LDFLAGS = ("-fopenmp",)
_OK_MARKER = "built.ok"
_STALE_LOCK_SECONDS = 600  # a build takes about a minute


@dataclass
class _State:
    loaded: bool = False
    settled: bool = False  # the attempt is over (loaded or not); set last
    attempted: bool = False
    reason: str | None = None
    info: dict[str, Any] = field(default_factory=dict)
    best: int = 0


_state = _State()
_lock = threading.Lock()


def _cache_root() -> Path:
    root = os.environ.get("GPTOSS_KERNEL_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "gptoss-server" / "kernels"


def _build_key() -> str:
    h = hashlib.sha256()
    for name in _SOURCES:
        h.update(name.encode())
        h.update((_DIR / name).read_bytes())
    for part in (torch.__version__, sys.version, platform.machine(), " ".join(_CFLAGS + _LDFLAGS)):
        h.update(part.encode())
    return h.hexdigest()[:16]


def _load() -> None:
    """Loads the extension once per process: from the cache, else compiled into it."""
    # Every op wrapper asks (via ``available``) on every call: once the attempt is over, the
    # answer is read without the lock, which would otherwise be taken several times per layer.
    if _state.settled:
        return
    with _lock:
        if _state.attempted:
            return
        _state.attempted = True
        try:
            build_dir, library = _library()
            name = library.stem
            started = time.perf_counter()
            compiled = False
            if (build_dir / _OK_MARKER).is_file() and library.is_file():
                torch.ops.load_library(str(library))
            else:
                from torch.utils.cpp_extension import load

                build_dir.mkdir(parents=True, exist_ok=True)
                # torch's build lock outlives a process killed mid-build (a server stopped
                # during its first minute), and every later build would wait on it forever.
                lock = build_dir / "lock"
                if lock.exists() and time.time() - lock.stat().st_mtime > _STALE_LOCK_SECONDS:
                    lock.unlink(missing_ok=True)
                load(
                    name=name,
                    sources=[str(_DIR / name) for name in _COMPILED],
                    extra_cflags=list(_CFLAGS),
                    extra_ldflags=list(_LDFLAGS),
                    build_directory=str(build_dir),
                    is_python_module=False,
                    verbose=False,
                )
                (build_dir / _OK_MARKER).write_text(f"torch {torch.__version__}\n")
                compiled = True
            _state.best = int(torch.ops.gptoss_native.cpu_isa())
            _state.info = {
                "path": str(library),
                "compiled": compiled,
                "seconds": time.perf_counter() - started,
                "isa": ISAS[_state.best],
            }
            _state.loaded = True
        except Exception as exc:  # no compiler, no ninja, a failed build: the portable path stays
            message = str(exc).strip().splitlines()
            _state.reason = f"{type(exc).__name__}: {' / '.join(message[-3:]) if message else ''}"
        _state.settled = True


def _library() -> tuple[Path, Path]:
    key = _build_key()
    build_dir = _cache_root() / key
    return build_dir, build_dir / f"gptoss_native_moe_{key}.so"


def is_built() -> bool:
    """Whether this machine's cache already holds the built library (loading it then takes
    milliseconds; building it takes about a minute of one core)."""
    try:
        build_dir, library = _library()
    except OSError:
        return False
    return (build_dir / _OK_MARKER).is_file() and library.is_file()


def build_in_background() -> threading.Thread:
    """Builds (and loads) the library on a daemon thread, so a start that did not wait for it
    finds it built the next time."""
    thread = threading.Thread(target=_load, name="native-moe-build", daemon=True)
    thread.start()
    return thread


def available() -> bool:
    """True when the native kernel is loaded on this machine (compiles it on first call)."""
    _load()
    return _state.loaded


def unavailable_reason() -> str | None:
    """Why ``available()`` is False (None while it is True or before the first attempt)."""
    return _state.reason


def build_info() -> dict[str, Any]:
    """How this process got the library: path, compiled (False = loaded from the cache),
    seconds, isa. Empty when unavailable."""
    _load()
    return dict(_state.info)


def settled_isa() -> int:
    """The best path this CPU runs (an index into ISAS; 0 until the library is loaded)."""
    _load()
    return _state.best
