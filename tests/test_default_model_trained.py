"""The embedded trained default (engine/default_model.py): the shipped artifact expands into a
standard checkpoint the normal loader reads, and a damaged or partial cache folder is detected
and rewritten, never served."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from demo.export import write_artifact
from demo.model import TinyGptOss
from engine import default_model as dm
from model.config import ModelConfig
from model.loader import load_model
from model.safetensors_reader import SafetensorsDir

SMALL = ModelConfig(
    vocab_size=512, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16,
    intermediate_size=32, num_experts=4, experts_per_token=2, sliding_window=8,
)  # fmt: skip
USED = [0, 5, 17, 200, 511]


def export(model: TinyGptOss, folder: Path) -> tuple[Path, Path]:
    """A run folder of `model` exported as the artifact the package ships -> (weights, config)."""
    trained = folder / "run" / "trained.pt"
    trained.parent.mkdir(parents=True)
    torch.save({"state": model.state(), "used": USED, "seed": 0, "config": SMALL.to_hf_dict()}, trained)
    artifact = folder / "artifact" / "gpt-oss-tiny.safetensors"
    write_artifact(trained, artifact)
    return artifact, artifact.with_suffix(".json")


@pytest.fixture
def small_artifact(tmp_path: Path) -> tuple[Path, Path]:
    return export(TinyGptOss(SMALL, len(USED), seed=0), tmp_path)


def ensure(tmp_path: Path, art: tuple[Path, Path]) -> Path:
    return dm.ensure_default_checkpoint(tmp_path / "cache", artifact=art[0], config=art[1])


def test_shipped_artifact_is_small_and_expands_to_a_loadable_checkpoint(tmp_path: Path) -> None:
    assert dm.ARTIFACT.stat().st_size + dm.ARTIFACT_CONFIG.stat().st_size < 10 * 2**20
    folder = dm.ensure_default_checkpoint(tmp_path)
    model = load_model(folder, torch.float32)
    assert model.config.vocab_size == 201088
    assert json.loads((folder / "config.json").read_text())["model_type"] == "gpt_oss"
    assert dm.ensure_default_checkpoint(tmp_path) == folder


def test_unused_rows_are_the_pooled_row(tmp_path: Path, small_artifact: tuple[Path, Path]) -> None:
    folder = ensure(tmp_path, small_artifact)
    compact = SafetensorsDir(small_artifact[0].parent)
    full = SafetensorsDir(folder)
    for name in ("lm_head.weight", "model.embed_tokens.weight"):
        c, f = compact.get(name), full.get(name)
        assert f.shape == (SMALL.vocab_size, SMALL.hidden_size)
        assert torch.equal(f[USED], c[:-1])
        unused = [i for i in range(SMALL.vocab_size) if i not in USED]
        assert torch.equal(f[unused], c[-1:].expand(len(unused), -1))
    assert "demo.used_token_ids" not in full.names()
    load_model(folder, torch.float32)


def test_valid_cache_is_served_as_is(tmp_path: Path, small_artifact: tuple[Path, Path]) -> None:
    folder = ensure(tmp_path, small_artifact)
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert ensure(tmp_path, small_artifact) == folder
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temporary folder left


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


@pytest.mark.parametrize(
    "damage",
    [
        lambda d: _flip_byte(d / "model.safetensors"),
        lambda d: _truncate(d / "model.safetensors"),
        lambda d: (d / "model.safetensors").unlink(),
        lambda d: (d / "config.json").write_text("{}"),
        lambda d: (d / "manifest.json").unlink(),
        lambda d: (d / "manifest.json").write_text("not json"),
    ],
    ids=["flipped-byte", "truncated", "missing-weights", "wrong-config", "no-manifest", "bad-manifest"],
)
def test_damaged_cache_is_rewritten(tmp_path: Path, small_artifact: tuple[Path, Path], damage) -> None:
    folder = ensure(tmp_path, small_artifact)
    good = {p.name: p.read_bytes() for p in folder.iterdir()}
    damage(folder)
    assert not dm.is_valid_checkpoint(folder, dm._artifact_digest(*small_artifact))
    assert ensure(tmp_path, small_artifact) == folder
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == good
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]
    load_model(folder, torch.float32)


def test_folder_from_another_artifact_is_rewritten(tmp_path: Path, small_artifact: tuple[Path, Path]) -> None:
    folder = ensure(tmp_path, small_artifact)
    config = json.loads(small_artifact[1].read_text())
    config["rope_theta"] = 12345.0
    small_artifact[1].write_text(json.dumps(config))
    ensure(tmp_path, small_artifact)
    assert json.loads((folder / "config.json").read_text())["rope_theta"] == 12345.0


def test_a_random_checkpoint_left_by_an_older_version_is_replaced(
    tmp_path: Path, small_artifact: tuple[Path, Path]
) -> None:
    from model.checkpoint import make_checkpoint

    old = tmp_path / "cache" / "default-tiny"
    make_checkpoint(old, preset="tiny", layout="hf", seed=0)
    ensure(tmp_path, small_artifact)
    assert json.loads((old / "config.json").read_text())["hidden_size"] == SMALL.hidden_size
    assert (old / "manifest.json").exists()


def test_served_checkpoint_computes_what_was_trained(
    tmp_path: Path, small_artifact: tuple[Path, Path]
) -> None:
    """The training network (fused attention with the sink as an extra key, straight-through
    MXFP4 experts, compact vocabulary + pooled class) and the served checkpoint give the same
    next-token distribution: the used tokens' log-probabilities, and the pooled class's as the
    log of the summed probability of every unused token. The sliding window (8) is shorter
    than the sequence, so both attention kinds are exercised."""
    from model.batch import BatchMetadata

    trained = TinyGptOss(SMALL, len(USED), seed=0)
    with torch.no_grad():
        for name, p in trained.named().items():
            if name.endswith(("sinks", "bias")):  # away from their zero init, so they matter
                p.normal_(0, 0.5)
            if not name.endswith(("gate_up_proj", "down_proj")):  # the artifact stores them in bf16
                p.copy_(p.to(torch.bfloat16).float())
    art = export(trained, tmp_path / "second")
    served = load_model(ensure(tmp_path, art), torch.float32)
    compact = torch.tensor([0, 1, 2, 3, 4, 2, 1, 0, 3, 3, 4, 1, 2, 0, 0, 4, 3, 2, 1, 1])
    n = len(compact)
    with torch.no_grad():
        ours = torch.log_softmax(trained.logits(trained.hidden(compact[None], torch.zeros(1, n) == 0))[0], -1)
    meta = BatchMetadata(
        positions=torch.arange(n), query_start=torch.tensor([0, n]), context_lens=torch.tensor([0]),
        full_block_table=None, sliding_block_table=None, logits_indices=torch.arange(n),
    )  # fmt: skip
    full = torch.log_softmax(served.forward(torch.tensor(USED)[compact], meta).float(), -1)
    unused = torch.ones(SMALL.vocab_size, dtype=torch.bool)
    unused[USED] = False
    theirs = torch.cat([full[:, USED], torch.logsumexp(full[:, unused], -1, keepdim=True)], -1)
    torch.testing.assert_close(ours, theirs, atol=2e-4, rtol=0)
