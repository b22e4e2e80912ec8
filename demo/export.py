"""Trained weights -> the compact artifact (used vocabulary rows + the pooled row, experts
packed MXFP4) -> a standard HF checkpoint (every unused unembedding row = the pooled row, so
the full-vocabulary distribution equals the trained one; unused embedding rows are zero)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from demo.train import mxfp4_codes
from model.mxfp4 import BYTES_PER_BLOCK, SCALE_BIAS
from model.safetensors_reader import SafetensorsDir
from model.safetensors_writer import TensorSpec, write_safetensors


def _pack(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[E, out, in] fp32 -> blocks [E, out, in/32, 16] uint8 (low nibble = even element), scales."""
    nibbles, exp, _ = mxfp4_codes(w)
    n = nibbles.reshape(*w.shape[:-1], w.shape[-1] // 32, BYTES_PER_BLOCK, 2)
    blocks = (n[..., 0] | (n[..., 1] << 4)).to(torch.uint8)
    return blocks.contiguous(), (exp + SCALE_BIAS).to(torch.uint8).contiguous()


def _write(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    specs = [TensorSpec(name=k, dtype=v.dtype, shape=tuple(v.shape), produce=lambda v=v: iter([v.contiguous()]))
             for k, v in tensors.items()]  # fmt: skip
    write_safetensors(path, specs)


def write_artifact(trained: Path, artifact: Path) -> None:
    ck = torch.load(trained)
    out: dict[str, torch.Tensor] = {}
    for name, value in ck["state"].items():
        if name.endswith(("gate_up_proj", "down_proj")):
            out[name + "_blocks"], out[name + "_scales"] = _pack(value.float())
        else:
            out[name] = value.float()
    out["demo.used_token_ids"] = torch.tensor(ck["used"], dtype=torch.int64)
    _write(artifact, out)
    (artifact.with_suffix(".json")).write_text(json.dumps(ck["config"], indent=2))


def expand_artifact(artifact: Path, out_dir: Path) -> None:
    files = SafetensorsDir(artifact.parent)
    config = json.loads(artifact.with_suffix(".json").read_text())
    used = files.get("demo.used_token_ids")
    vocab = config["vocab_size"]
    tensors = {n: files.get(n) for n in files.names() if n != "demo.used_token_ids"}
    emb, head = tensors["model.embed_tokens.weight"], tensors["lm_head.weight"]
    full_emb = torch.zeros(vocab, emb.shape[1])
    full_emb[used] = emb[:-1]
    full_head = head[-1:].repeat(vocab, 1)
    full_head[used] = head[:-1]
    tensors["model.embed_tokens.weight"], tensors["lm_head.weight"] = full_emb, full_head
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    _write(out_dir / "model.safetensors", tensors)
