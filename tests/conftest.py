"""Shared fixtures: random gpt-oss checkpoints made in temporary directories."""

from __future__ import annotations

from pathlib import Path

import pytest

from model.checkpoint import make_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoint_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny HF-layout checkpoint (preset "tiny": real 201088 vocab, hidden 64, 2 layers,
    4 experts top-2, window 16, packed MXFP4 experts), seed 0."""
    return make_checkpoint(tmp_path_factory.mktemp("tiny_ckpt"), preset="tiny", layout="hf", seed=0)
