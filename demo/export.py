"""Trained weights -> the compact artifact the package ships (engine/data/gpt-oss-tiny.*):
the used vocabulary rows plus the pooled row, experts packed MXFP4 as in the HF checkpoints,
every other tensor bf16 (as the published gpt-oss checkpoints). engine/default_model.py
expands it into a standard HF checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from demo.model import mxfp4_codes
from engine.default_model import USED_IDS
from engine.default_model import expand_artifact as _expand
from model.mxfp4 import BYTES_PER_BLOCK, SCALE_BIAS
from model.safetensors_writer import TensorSpec, write_safetensors


def pack_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[E, out, in] fp32 -> blocks [E, out, in/32, 16] uint8 (low nibble = even element), scales."""
    nibbles, exp, _ = mxfp4_codes(w)
    n = nibbles.reshape(*w.shape[:-1], w.shape[-1] // 32, BYTES_PER_BLOCK, 2)
    blocks = (n[..., 0] | (n[..., 1] << 4)).to(torch.uint8)
    return blocks.contiguous(), (exp + SCALE_BIAS).to(torch.uint8).contiguous()


def write_artifact(trained: Path, artifact: Path) -> None:
    ck = torch.load(trained)
    out: dict[str, torch.Tensor] = {}
    for name, value in ck["state"].items():
        if name.endswith(("gate_up_proj", "down_proj")):
            out[name + "_blocks"], out[name + "_scales"] = pack_mxfp4(value.float())
        else:
            out[name] = value.to(torch.bfloat16)
    out[USED_IDS] = torch.tensor(ck["used"], dtype=torch.int64)
    artifact.parent.mkdir(parents=True, exist_ok=True)
    specs = [
        TensorSpec(k, v.dtype, tuple(v.shape), lambda v=v: iter([v.contiguous()])) for k, v in out.items()
    ]
    write_safetensors(artifact, specs)
    artifact.with_suffix(".json").write_text(json.dumps(ck["config"], indent=2) + "\n")


def expand_artifact(artifact: Path, out_dir: Path) -> None:
    _expand(artifact, artifact.with_suffix(".json"), out_dir)
