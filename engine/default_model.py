"""The embedded default model: `gpt-oss-tiny`, a tiny gpt-oss trained on synthetic Harmony
conversations (a demonstration: it has learned the skills of docs/demo-model.md and nothing else).

The package ships a compact artifact (engine/data/gpt-oss-tiny.safetensors: the embedding and
unembedding rows of the tokens the corpus uses plus one pooled row, experts packed in MXFP4).
On first use it is expanded into the cache folder as a standard HF checkpoint, which the normal
loader reads like any other: every unused unembedding row is the pooled row (so the
full-vocabulary distribution is exactly the trained one) and every unused embedding row the
pooled embedding. The expansion goes into a temporary folder next to the target and is renamed
into place, with a sha256 manifest; a cache folder whose manifest or files do not match (damaged,
partial, or from another artifact) is rewritten, never served.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger("engine.default_model")

DATA_DIR = Path(__file__).resolve().parent / "data"
ARTIFACT = DATA_DIR / "gpt-oss-tiny.safetensors"
ARTIFACT_CONFIG = DATA_DIR / "gpt-oss-tiny.json"
USED_IDS = "demo.used_token_ids"
MANIFEST = "manifest.json"
_FOLDER = "default-tiny"
_CHUNK_ROWS = 16384


def default_cache_root() -> Path:
    return Path.home() / ".cache" / "gptoss-server"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _artifact_digest(artifact: Path, config: Path) -> str:
    return hashlib.sha256((sha256_file(artifact) + sha256_file(config)).encode()).hexdigest()


def is_valid_checkpoint(folder: Path, artifact_digest: str) -> bool:
    """The folder holds exactly what the manifest lists, byte for byte, for this artifact."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"]
        if manifest.get("artifact") != artifact_digest or not files:
            return False
        return all(sha256_file(folder / name) == digest for name, digest in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def expand_artifact(artifact: Path, config_path: Path, out_dir: Path) -> None:
    """Compact artifact -> a standard HF checkpoint (config.json + model.safetensors) in out_dir."""
    import torch

    from model.safetensors_reader import SafetensorsDir
    from model.safetensors_writer import TensorSpec, write_safetensors

    config = json.loads(config_path.read_text())
    vocab = int(config["vocab_size"])
    files = SafetensorsDir(artifact.parent)
    used = files.get(USED_IDS).long()
    names = [n for n in files.names() if n != USED_IDS]

    def full_rows(compact: torch.Tensor) -> torch.Tensor:
        """[K+1, h] (last row pooled) -> [V, h]: used rows in place, every other row pooled."""
        out = compact[-1:].repeat(vocab, 1)
        out[used] = compact[:-1]
        return out

    specs = []
    for name in names:
        t = files.get(name)
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            t = full_rows(t)
        specs.append(TensorSpec(name, t.dtype, tuple(t.shape),
                                lambda t=t: (t[i : i + _CHUNK_ROWS] for i in range(0, t.shape[0], _CHUNK_ROWS))))  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    write_safetensors(out_dir / "model.safetensors", specs)


def _write_checkpoint(tmp: Path, digest: str, artifact: Path, config: Path) -> None:
    expand_artifact(artifact, config, tmp)
    files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
    (tmp / MANIFEST).write_text(json.dumps({"artifact": digest, "files": files}, indent=2))


def ensure_default_checkpoint(
    cache_root: Path | None = None, artifact: Path = ARTIFACT, config: Path = ARTIFACT_CONFIG
) -> Path:
    """-> the folder of the embedded default checkpoint, written (or rewritten) when needed."""
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    target = root / _FOLDER
    digest = _artifact_digest(artifact, config)
    if is_valid_checkpoint(target, digest):
        logger.info("serving the embedded default model gpt-oss-tiny from %s", target)
        return target
    root.mkdir(parents=True, exist_ok=True)
    if target.exists():
        logger.warning("the cached default model in %s is damaged, partial or outdated: rewriting it", target)
    else:
        logger.info("writing the embedded default model gpt-oss-tiny into %s", target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{_FOLDER}-", dir=root))
    try:
        _write_checkpoint(tmp, digest, artifact, config)
        for _ in range(3):
            if target.exists() and not is_valid_checkpoint(target, digest):
                trash = Path(tempfile.mkdtemp(prefix=f".{_FOLDER}-old-", dir=root))
                with contextlib.suppress(OSError):  # another process moved it first
                    os.rename(target, trash / "old")
                shutil.rmtree(trash, ignore_errors=True)
            try:
                os.rename(tmp, target)
                break
            except OSError:
                if is_valid_checkpoint(target, digest):
                    break  # another process finished first; its copy is identical
        else:
            raise OSError(f"could not put the default model in place at {target}")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
