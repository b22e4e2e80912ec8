"""Random checkpoints are in the published layouts and dtypes; the loader reads them all
(and rejects broken ones with clear errors), and frees the mapped pages of what it copied; the
config round-trips."""

from __future__ import annotations

import ctypes
import json
import math
import mmap
import os
import struct
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from model.batch import BatchMetadata
from model.checkpoint import _Canonical, _hf_specs, make_checkpoint
from model.config import PRESETS, ModelConfig
from model.loader import load_model
from model.safetensors_reader import CheckpointError, SafetensorsDir
from model.safetensors_writer import TensorSpec, write_safetensors

SMALL = {"vocab_size": 512, "pad_token_id": 0, "eos_token_id": 1}


def tensors_of(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(f, "pt") as fh:
            for k in fh.keys():  # noqa: SIM118 - safe_open has no __iter__
                out[k] = fh.get_tensor(k)
    return out


def test_tiny_fixture_is_hf_layout_with_real_vocab(tiny_checkpoint_dir):
    cfg = json.loads((tiny_checkpoint_dir / "config.json").read_text())
    assert cfg["vocab_size"] == 201088 and cfg["model_type"] == "gpt_oss"
    assert cfg["quantization_config"]["quant_method"] == "mxfp4"
    assert cfg["rope_scaling"] == {
        "beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
        "original_max_position_embeddings": 4096, "rope_type": "yarn", "truncate": False,
    }  # fmt: skip
    t = tensors_of(tiny_checkpoint_dir)
    c = PRESETS["tiny"]
    assert len(t) == 19 * c.num_layers + 3  # spec §3(b)
    assert t["model.embed_tokens.weight"].shape == (201088, c.hidden_size)
    for name, tensor in t.items():
        packed = name.endswith("_blocks") or name.endswith("_scales")
        assert tensor.dtype == (torch.uint8 if packed else torch.bfloat16), name
    e, i2, h = c.num_experts, 2 * c.intermediate_size, c.hidden_size
    assert t["model.layers.0.mlp.experts.gate_up_proj_blocks"].shape == (e, i2, h // 32, 16)
    assert t["model.layers.0.mlp.experts.gate_up_proj_scales"].shape == (e, i2, h // 32)
    assert t["model.layers.1.mlp.experts.down_proj_blocks"].shape == (e, h, c.intermediate_size // 32, 16)
    assert t["model.layers.1.self_attn.sinks"].shape == (c.num_heads,)
    # Scales near 2^-4..2^-7 so the experts are reasonable.
    scales = t["model.layers.0.mlp.experts.gate_up_proj_scales"].int() - 127
    assert scales.min().item() >= -8 and scales.max().item() <= -3


def test_original_layout_names_dtypes_and_config(tmp_path):
    root = make_checkpoint(tmp_path, preset="tiny", layout="original", seed=0, num_layers=3, **SMALL)
    orig = root / "original"
    cfg = json.loads((orig / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 3 and cfg["rope_ntk_alpha"] == 1.0 and cfg["rope_ntk_beta"] == 32.0
    t = tensors_of(orig)
    assert len(t) == 15 * 3 + 3  # spec §3(a)
    dtypes = json.loads((orig / "dtypes.json").read_text())
    assert (
        dtypes["block.0.mlp.mlp1_weight.blocks"] == "FP4"
        and dtypes["block.0.mlp.mlp1_weight.scales"] == "UE8"
    )
    assert dtypes["block.2.attn.sinks"] == "BF16" and set(dtypes) == set(t)
    c = ModelConfig.from_dir(root)
    assert t["block.1.attn.qkv.weight"].shape == (c.qkv_dim, c.hidden_size)
    assert t["block.1.mlp.mlp1_bias"].shape == (c.num_experts, 2 * c.intermediate_size)


def test_layouts_hold_the_same_network(tmp_path):
    hf = tensors_of(make_checkpoint(tmp_path / "hf", preset="tiny", seed=4, **SMALL))
    orig = tensors_of(
        make_checkpoint(tmp_path / "o", preset="tiny", layout="original", seed=4, **SMALL) / "original"
    )
    other_seed = tensors_of(make_checkpoint(tmp_path / "s", preset="tiny", seed=5, **SMALL))
    qkv = torch.cat([hf[f"model.layers.1.self_attn.{p}_proj.weight"] for p in "qkv"])
    assert torch.equal(qkv, orig["block.1.attn.qkv.weight"])
    assert torch.equal(
        hf["model.layers.0.mlp.experts.down_proj_blocks"], orig["block.0.mlp.mlp2_weight.blocks"]
    )
    assert torch.equal(hf["lm_head.weight"], orig["unembedding.weight"])
    assert not torch.equal(hf["lm_head.weight"], other_seed["lm_head.weight"])


def test_sharded_checkpoint_with_index_loads_identically(tmp_path):
    single = make_checkpoint(tmp_path / "single", preset="tiny", seed=2, **SMALL)
    sharded = make_checkpoint(tmp_path / "sharded", preset="tiny", seed=2, max_shard_bytes=40_000, **SMALL)
    shards = sorted(p.name for p in sharded.glob("*.safetensors"))
    n = len(shards)
    assert n > 2 and shards[0] == f"model-00000-of-{n - 1:05d}.safetensors"
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    meta = _prefill_meta(12)
    ids = torch.arange(100, 112)
    a = load_model(single, dtype=torch.float32)(ids, meta, None)
    b = load_model(sharded, dtype=torch.float32)(ids, meta, None)
    assert torch.equal(a, b)


def _prefill_meta(n):
    from model.batch import BatchMetadata

    return BatchMetadata(
        positions=torch.arange(n), query_start=torch.tensor([0, n]), context_lens=torch.tensor([0]),
        full_block_table=None, sliding_block_table=None, logits_indices=torch.arange(n),
    )  # fmt: skip


def test_20b_preset_sizes_match_the_published_checkpoint():
    """The 20b original file is 13,761,300,984 bytes (spec §3): our tensors, minus header."""
    config = PRESETS["20b"]
    canon = _Canonical(config, 0)
    tensors = canon.tensors()
    total = sum(math.prod(s) * torch.empty((), dtype=d).element_size() for _, s, d, _ in tensors)
    assert len(tensors) == 363
    assert 0 <= 13_761_300_984 - total < 40_000
    hf_total = sum(spec.nbytes for spec in _hf_specs(canon, dequantized=False))
    assert hf_total == total
    assert PRESETS["120b"].num_experts == 128 and PRESETS["120b"].num_layers == 36


def test_config_round_trips_and_reads_transformers_style(tmp_path):
    c = PRESETS["20b"]
    assert ModelConfig.from_hf_dict(c.to_hf_dict()) == c
    assert ModelConfig.from_original_dict(c.to_original_dict()) == c
    assert [c.is_sliding(i) for i in range(4)] == [True, False, True, False]
    # transformers >= 5 writes rope_parameters (with rope_theta inside) instead of rope_scaling.
    d = c.to_hf_dict()
    rope = d.pop("rope_scaling")
    d.pop("rope_theta")
    d["rope_parameters"] = {**rope, "rope_theta": 150000.0}
    assert ModelConfig.from_hf_dict(d) == c


def _corrupt(tmp_path, name):
    path = make_checkpoint(tmp_path / name, preset="tiny", seed=0, **SMALL)
    return path, path / "model.safetensors"


def _rewrite_header(file, edit):
    raw = file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    new = json.dumps(header, separators=(",", ":")).encode()
    new += b" " * (n - len(new))
    assert len(new) == n
    file.write_bytes(raw[:8] + new + raw[8 + n :])


def test_clear_errors_for_broken_checkpoints(tmp_path):
    path, file = _corrupt(tmp_path, "missing")
    _rewrite_header(
        file,
        lambda h: h.__setitem__("model.layers.1.self_attn.sinks.x", h.pop("model.layers.1.self_attn.sinks")),
    )
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.1\.self_attn\.sinks'"):
        load_model(path)

    path, file = _corrupt(tmp_path, "dtype")
    _rewrite_header(file, lambda h: h["model.norm.weight"].__setitem__("dtype", "F8_E5M2"))
    with pytest.raises(CheckpointError, match="F8_E5M2"):
        load_model(path)

    path, file = _corrupt(tmp_path, "shape")
    cfg = json.loads((path / "config.json").read_text())
    cfg["num_attention_heads"] = 8  # the tensors hold 4 heads
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"has shape \[64, 64\], expected \[128, 64\]"):
        load_model(path)

    path, file = _corrupt(tmp_path, "truncated")
    with open(file, "r+b") as fh:
        fh.truncate(file.stat().st_size - 1000)
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(path)

    path, file = _corrupt(tmp_path, "wrongtype")
    _rewrite_header(
        file, lambda h: h["model.layers.0.mlp.experts.down_proj_scales"].__setitem__("dtype", "I8")
    )
    with pytest.raises(CheckpointError, match=r"down_proj_scales.*dtype"):
        load_model(path)

    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nowhere")


def test_repo_with_both_layouts_loads_the_hf_one(tmp_path):
    """A full download holds the HF files at the root and the original ones in original/."""
    root = make_checkpoint(tmp_path / "repo", preset="tiny", seed=6, **SMALL)
    make_checkpoint(tmp_path / "repo", preset="tiny", layout="original", seed=6, **SMALL)
    assert (root / "config.json").is_file() and (root / "original" / "model.safetensors").is_file()
    ids, meta = torch.arange(10, 30), _prefill_meta(20)
    both = load_model(root, dtype=torch.float32)(ids, meta, None)
    only_original = load_model(root / "original", dtype=torch.float32)(ids, meta, None)
    assert torch.equal(both, only_original)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * mmap.PAGESIZE


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads the RSS from /proc (Linux)")
def test_release_drops_a_tensors_pages_and_it_still_reads_back(tmp_path: Path) -> None:
    data = torch.arange(16 << 20, dtype=torch.int32).view(-1, 1024)  # 64 MB
    specs = [
        TensorSpec("small", torch.float32, (3,), lambda: [torch.ones(3)]),
        TensorSpec("big", torch.int32, tuple(data.shape), lambda: [data]),
    ]
    write_safetensors(tmp_path / "model.safetensors", specs)
    files = SafetensorsDir(tmp_path)
    small, big = files.get("small"), files.get("big")
    assert int(big.sum(dtype=torch.int64)) == int(data.sum(dtype=torch.int64))  # every page touched
    touched = _rss_bytes()
    files.release("big")
    assert touched - _rss_bytes() > 48 << 20  # most of the 64 MB left the process
    assert torch.equal(small, torch.ones(3))  # a neighbour keeps its page
    assert torch.equal(big, data)  # read back from the file
    files.release("missing")  # unknown names are nothing to release


def test_loading_releases_the_mapped_weights_a_copy_replaced(tmp_path, monkeypatch):
    """What the model holds a copy of is freed from the checkpoint's mapping as the copy is
    made (else both stay resident: 2 x 12 GB of experts on the 20b, 2.4 GB of head and
    projections): the native backend's experts, projections and head, the HF q/k/v once
    concatenated, every tensor converted to another dtype. Nothing still read is released
    (the embedding; the reference's experts and projections in bf16), and a released view
    read again faults its pages back from the file."""
    ckpt = make_checkpoint(tmp_path / "ck", preset="tiny", layout="hf", seed=4)
    released: list[str] = []
    plain = SafetensorsDir.release
    monkeypatch.setattr(
        SafetensorsDir, "release", lambda self, name: (released.append(name), plain(self, name))
    )

    def parts(names: list[str]) -> set[str]:
        return {n.split(".")[-2] if n.endswith(".weight") else n.split(".")[-1] for n in names}

    native = load_model(ckpt, torch.bfloat16, "cpu", kernels="native-cpu")
    layers_n = native.config.num_layers
    experts = [n for n in released if n.endswith(("_blocks", "_scales"))]
    assert len(experts) == len(set(experts)) == 4 * layers_n
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "lm_head"} <= parts(released)
    assert "embed_tokens" not in parts(released)

    released.clear()
    reference = load_model(ckpt, torch.bfloat16, "cpu", kernels="reference")
    assert not [n for n in released if n.endswith(("_blocks", "_scales"))]
    assert {"q_proj", "k_proj", "v_proj"} <= parts(released)
    assert not {"o_proj", "embed_tokens"} & parts(released)
    w = reference.weights
    if w.unembedding_prepacked is not None:  # the loaded head, read again after its release
        x = torch.randn(3, native.config.hidden_size).bfloat16()
        assert torch.equal(w.unembedding_prepacked(x), torch.nn.functional.linear(x, w.unembedding))

    released.clear()
    load_model(ckpt, torch.float32, "cpu", kernels="reference")  # bf16 on disk: every float copied
    assert {"q_proj", "o_proj", "embed_tokens", "lm_head"} <= parts(released)

    ids = torch.tensor([1, 2, 3])  # the native model still computes (its own copies)
    meta = BatchMetadata(
        positions=torch.arange(3), query_start=torch.tensor([0, 3]), context_lens=torch.tensor([0]),
        full_block_table=None, sliding_block_table=None, logits_indices=torch.tensor([2]),
        query_lens_cpu=[3], context_lens_cpu=[0],
    )  # fmt: skip
    assert torch.isfinite(native(ids, meta, None).float()).all()


def _cached_fraction(t: torch.Tensor) -> float:
    """The share of a view's pages in the page cache (``mincore``), read or not."""
    libc = ctypes.CDLL(None, use_errno=True)
    page = mmap.PAGESIZE
    start = t.data_ptr() // page * page
    n = -(-(t.data_ptr() + t.numel() * t.element_size() - start) // page)
    vec = (ctypes.c_ubyte * n)()
    assert libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(n * page), vec) == 0, ctypes.get_errno()
    return sum(b & 1 for b in vec) / n


def _drop_from_page_cache(directory: Path) -> None:
    for f in directory.glob("*.safetensors"):
        fd = os.open(f, os.O_RDONLY)
        os.fsync(fd)  # only clean pages can be dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def _cached_soon(t: torch.Tensor) -> float:
    deadline = time.monotonic() + 10
    while (got := _cached_fraction(t)) < 0.99 and time.monotonic() < deadline:
        time.sleep(0.05)
    return got


def test_read_ahead_brings_the_views_still_held_into_the_page_cache(tmp_path: Path) -> None:
    """Every view got and not released is read ahead, whole (Linux reads at most a few MB
    ahead per call); a released one is not."""
    specs = [
        TensorSpec(name, torch.int32, (4 << 20,), lambda: [torch.arange(4 << 20, dtype=torch.int32)])
        for name in ("held", "released")
    ]  # 16 MB each
    write_safetensors(tmp_path / "model.safetensors", specs)
    files = SafetensorsDir(tmp_path)
    held, released = files.get("held"), files.get("released")
    files.release("released")
    _drop_from_page_cache(tmp_path)
    assert _cached_fraction(held) < 0.1 and _cached_fraction(released) < 0.1
    files.read_ahead()
    assert _cached_soon(held) >= 0.99
    assert _cached_fraction(released) < 0.5


def test_loading_reads_ahead_what_the_model_reads_from_the_mapping(tmp_path: Path) -> None:
    """The embedding stays a view of the file (a few rows read per step): after loading, its
    pages are in the page cache, not left for a disk read at each row's first touch."""
    ckpt = make_checkpoint(tmp_path / "ck", preset="tiny", layout="hf", seed=5)
    _drop_from_page_cache(ckpt)
    model = load_model(ckpt, torch.bfloat16, "cpu")
    assert model.weights.embedding.numel() * 2 > 8 << 20  # past one read-ahead call
    assert _cached_soon(model.weights.embedding) >= 0.99
