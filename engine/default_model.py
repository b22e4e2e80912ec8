"""The embedded default model: a tiny random-weight gpt-oss checkpoint, generated once and cached.

It lets the server (``python -m server`` without ``--model``) run the whole pipeline on a fresh machine without downloads.
Generation goes into a temporary folder next to the target and is renamed into place, so
two servers starting at once never see a half-written checkpoint.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger("engine.default_model")

DEFAULT_PRESET = "tiny"
DEFAULT_SEED = 0
_FOLDER = "default-tiny"


def default_cache_root() -> Path:
    return Path.home() / ".cache" / "gptoss-server"


def ensure_default_checkpoint(cache_root: Path | None = None) -> Path:
    from model.checkpoint import make_checkpoint  # torch-heavy: import only when needed

    root = Path(cache_root) if cache_root is not None else default_cache_root()
    target = root / _FOLDER
    if (target / "config.json").exists():
        logger.warning(
            "serving the embedded default model from %s: its weights are RANDOM (output is noise)", target
        )
        return target
    root.mkdir(parents=True, exist_ok=True)
    logger.warning(
        "generating the embedded default model (RANDOM weights, preset %r) in %s", DEFAULT_PRESET, target
    )
    tmp = Path(tempfile.mkdtemp(prefix=f".{_FOLDER}-", dir=root))
    try:
        make_checkpoint(tmp, preset=DEFAULT_PRESET, layout="hf", seed=DEFAULT_SEED)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").exists():
                raise
            # Another process finished first; its copy is identical (same preset and seed).
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.warning("serving the embedded default model: its weights are RANDOM (output is noise)")
    return target
