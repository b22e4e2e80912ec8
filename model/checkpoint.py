"""Random gpt-oss checkpoints in the published layouts and dtypes, for tests and benchmarks.

Every tensor is generated from its own seed (derived from the run seed and the tensor's
original-layout name, chunk by chunk along dim 0), so the HF, original and dequantized-HF
layouts made with the same seed hold exactly the same network, and huge tensors are made
and written a chunk at a time (the 20b preset is ~13.8 GB on disk, little in RAM).

Layouts:
- ``hf``: repo root, ``model.layers.N...``, experts packed MXFP4 (``*_blocks``/``*_scales``),
  sharded as ``model-0000k-of-0000n.safetensors`` + ``model.safetensors.index.json`` when large.
- ``original``: ``original/`` with ``block.N...`` names, original config keys and dtypes.json.
- ``hf-bf16``: the dequantized bf16 HF export (experts ``gate_up_proj`` [E, in, out], transposed).
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from .config import ORIGINAL_DIR_NAME, PRESETS, ModelConfig
from .mxfp4 import BYTES_PER_BLOCK, SCALE_BIAS, VALUES_PER_BLOCK, dequantize_mxfp4
from .safetensors_writer import TensorSpec, write_safetensors

LAYOUTS = ("hf", "original", "hf-bf16")
HF_SHARD_BYTES = 4_800_000_000  # HFV shards at 4.8 GB: the 20b gives 3 files
CHUNK_ELEMENTS = 1 << 24
# RMS of an FP4 value drawn uniformly over the 16 nibbles: sqrt(mean(v^2)) = sqrt(68.5/8).
FP4_UNIFORM_RMS = math.sqrt(68.5 / 8)


class _Canonical:
    """The random network, by original-layout tensor name, produced in dim-0 chunks."""

    def __init__(self, config: ModelConfig, seed: int) -> None:
        self.config = config
        self.seed = seed

    def _generator(self, name: str, chunk: int) -> torch.Generator:
        g = torch.Generator()
        g.manual_seed(zlib.crc32(f"{self.seed}:{name}:{chunk}".encode()))
        return g

    def _chunked(
        self,
        name: str,
        shape: tuple[int, ...],
        make: Callable[[tuple[int, ...], torch.Generator], torch.Tensor],
    ) -> Iterator[torch.Tensor]:
        row = math.prod(shape[1:])
        rows_per_chunk = max(1, CHUNK_ELEMENTS // max(row, 1))
        for i, start in enumerate(range(0, shape[0], rows_per_chunk)):
            n = min(rows_per_chunk, shape[0] - start)
            yield make((n, *shape[1:]), self._generator(name, i))

    def normal(
        self, name: str, shape: tuple[int, ...], std: float, mean: float = 0.0
    ) -> Iterator[torch.Tensor]:
        def make(s: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
            return (torch.randn(s, generator=g) * std + mean).to(torch.bfloat16)

        return self._chunked(name, shape, make)

    def fp4_blocks(self, name: str, shape: tuple[int, ...]) -> Iterator[torch.Tensor]:
        def make(s: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
            return torch.randint(0, 256, s, generator=g, dtype=torch.uint8)

        return self._chunked(name, shape, make)

    def fp4_scales(self, name: str, shape: tuple[int, ...], in_features: int) -> Iterator[torch.Tensor]:
        # Aim the dequantized weights at std ~ 1/sqrt(in) so activations stay O(1); the
        # exponent jitters by one so scales are not all equal.
        exponent = round(math.log2(1.0 / math.sqrt(in_features) / FP4_UNIFORM_RMS))

        def make(s: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
            jitter = torch.randint(-1, 1, s, generator=g, dtype=torch.int16)
            return (jitter + SCALE_BIAS + exponent).to(torch.uint8)

        return self._chunked(name, shape, make)

    def full(self, chunks: Iterator[torch.Tensor]) -> torch.Tensor:
        return torch.cat(list(chunks))

    # -- the network ----------------------------------------------------------------------
    def tensors(self) -> list[tuple[str, tuple[int, ...], torch.dtype, Callable[[], Iterator[torch.Tensor]]]]:
        """(original name, shape, dtype, chunk producer) for every tensor, in file order."""
        c = self.config
        h, e, i2 = c.hidden_size, c.num_experts, 2 * c.intermediate_size
        out: list[Any] = []

        def add_normal(name: str, shape: tuple[int, ...], std: float, mean: float = 0.0) -> None:
            out.append((name, shape, torch.bfloat16, lambda: self.normal(name, shape, std, mean)))

        add_normal("embedding.weight", (c.vocab_size, h), 1.0)
        for n in range(c.num_layers):
            p = f"block.{n}"
            add_normal(f"{p}.attn.norm.scale", (h,), 0.1, 1.0)
            add_normal(f"{p}.attn.qkv.weight", (c.qkv_dim, h), 1.0 / math.sqrt(h))
            add_normal(f"{p}.attn.qkv.bias", (c.qkv_dim,), 0.02)
            add_normal(f"{p}.attn.sinks", (c.num_heads,), 0.5)
            add_normal(f"{p}.attn.out.weight", (h, c.q_dim), 1.0 / math.sqrt(c.q_dim))
            add_normal(f"{p}.attn.out.bias", (h,), 0.02)
            add_normal(f"{p}.mlp.norm.scale", (h,), 0.1, 1.0)
            add_normal(f"{p}.mlp.gate.weight", (e, h), 1.0 / math.sqrt(h))
            add_normal(f"{p}.mlp.gate.bias", (e,), 0.1)
            for w, rows, cols in (("mlp1", i2, h), ("mlp2", h, c.intermediate_size)):
                bname, sname = f"{p}.mlp.{w}_weight.blocks", f"{p}.mlp.{w}_weight.scales"
                bshape = (e, rows, cols // VALUES_PER_BLOCK, BYTES_PER_BLOCK)
                sshape = (e, rows, cols // VALUES_PER_BLOCK)
                out.append((bname, bshape, torch.uint8, lambda b=bname, s=bshape: self.fp4_blocks(b, s)))
                out.append(
                    (sname, sshape, torch.uint8, lambda n_=sname, s=sshape, k=cols: self.fp4_scales(n_, s, k))
                )
                add_normal(f"{p}.mlp.{w}_bias", (e, rows), 0.02)
        add_normal("norm.scale", (h,), 0.1, 1.0)
        add_normal("unembedding.weight", (c.vocab_size, h), 1.0 / math.sqrt(h))
        return out


def _spec(name: str, shape: tuple[int, ...], dtype: torch.dtype, produce: Callable[[], Any]) -> TensorSpec:
    return TensorSpec(name=name, dtype=dtype, shape=tuple(shape), produce=produce)


def _hf_specs(canon: _Canonical, dequantized: bool) -> list[TensorSpec]:
    c = canon.config
    by_name = {name: (shape, dtype, prod) for name, shape, dtype, prod in canon.tensors()}
    specs: list[TensorSpec] = []

    def same(hf_name: str, orig_name: str) -> None:
        shape, dtype, prod = by_name[orig_name]
        specs.append(_spec(hf_name, shape, dtype, prod))

    same("model.embed_tokens.weight", "embedding.weight")
    splits = (("q_proj", 0, c.q_dim), ("k_proj", c.q_dim, c.kv_dim), ("v_proj", c.q_dim + c.kv_dim, c.kv_dim))
    for n in range(c.num_layers):
        p, hp = f"block.{n}", f"model.layers.{n}"
        same(f"{hp}.input_layernorm.weight", f"{p}.attn.norm.scale")
        for proj, start, size in splits:
            for kind in ("weight", "bias"):
                shape, dtype, prod = by_name[f"{p}.attn.qkv.{kind}"]

                def rows(prod=prod, start=start, size=size) -> Iterator[torch.Tensor]:
                    yield canon.full(prod())[start : start + size]

                specs.append(_spec(f"{hp}.self_attn.{proj}.{kind}", (size, *shape[1:]), dtype, rows))
        same(f"{hp}.self_attn.o_proj.weight", f"{p}.attn.out.weight")
        same(f"{hp}.self_attn.o_proj.bias", f"{p}.attn.out.bias")
        same(f"{hp}.self_attn.sinks", f"{p}.attn.sinks")
        same(f"{hp}.post_attention_layernorm.weight", f"{p}.mlp.norm.scale")
        same(f"{hp}.mlp.router.weight", f"{p}.mlp.gate.weight")
        same(f"{hp}.mlp.router.bias", f"{p}.mlp.gate.bias")
        for orig, hf in (("mlp1", "gate_up_proj"), ("mlp2", "down_proj")):
            bshape, _, bprod = by_name[f"{p}.mlp.{orig}_weight.blocks"]
            _, _, sprod = by_name[f"{p}.mlp.{orig}_weight.scales"]
            if dequantized:
                e, rows_, groups = bshape[0], bshape[1], bshape[2]

                def dense(bprod=bprod, sprod=sprod) -> Iterator[torch.Tensor]:
                    # [E, out, in] packed -> the HF export's [E, in, out], expert by expert
                    for blocks, scales in zip(bprod(), sprod(), strict=True):
                        yield dequantize_mxfp4(blocks, scales, torch.bfloat16).transpose(1, 2).contiguous()

                specs.append(
                    _spec(
                        f"{hp}.mlp.experts.{hf}", (e, groups * VALUES_PER_BLOCK, rows_), torch.bfloat16, dense
                    )
                )
            else:
                same(f"{hp}.mlp.experts.{hf}_blocks", f"{p}.mlp.{orig}_weight.blocks")
                same(f"{hp}.mlp.experts.{hf}_scales", f"{p}.mlp.{orig}_weight.scales")
            same(f"{hp}.mlp.experts.{hf}_bias", f"{p}.mlp.{orig}_bias")
    same("model.norm.weight", "norm.scale")
    same("lm_head.weight", "unembedding.weight")
    return specs


def _shard(specs: list[TensorSpec], max_bytes: int) -> list[list[TensorSpec]]:
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def _write_sharded(
    out_dir: Path,
    specs: list[TensorSpec],
    max_bytes: int,
    shard_name: Callable[[int, int], str],
    progress: bool,
) -> None:
    shards = _shard(specs, max_bytes)
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [shard_name(k, len(shards)) for k in range(len(shards))]
    )
    bar = _progress(sum(s.nbytes for s in specs), progress)
    for name, shard in zip(names, shards, strict=True):
        for spec in shard:
            spec.produce = _counting(spec.produce, bar)
        write_safetensors(out_dir / name, shard)
    if bar is not None:
        bar.close()
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(s.nbytes for s in specs)},
            "weight_map": {
                spec.name: name for name, shard in zip(names, shards, strict=True) for spec in shard
            },
        }
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _progress(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc="writing checkpoint")


def _counting(produce: Callable[[], Any], bar: Any) -> Callable[[], Iterator[torch.Tensor]]:
    def wrapped() -> Iterator[torch.Tensor]:
        for chunk in produce():
            if bar is not None:
                bar.update(chunk.numel() * chunk.element_size())
            yield chunk

    return wrapped


def make_checkpoint(
    out_dir: str | Path,
    preset: str = "tiny",
    layout: str = "hf",
    seed: int = 0,
    max_shard_bytes: int | None = None,
    progress: bool = False,
    **overrides: Any,
) -> Path:
    """Write a random checkpoint; returns ``out_dir`` (load it with ``load_model(out_dir)``)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose from {LAYOUTS}")
    config = PRESETS[preset].replace(**{k: v for k, v in overrides.items() if v is not None})
    out = Path(out_dir)
    canon = _Canonical(config, seed)
    if layout == "original":
        orig = out / ORIGINAL_DIR_NAME
        orig.mkdir(parents=True, exist_ok=True)
        (orig / "config.json").write_text(json.dumps(config.to_original_dict(), indent=2))
        tensors = canon.tensors()
        dtypes = {name: ("BF16" if dtype == torch.bfloat16 else "UE8" if name.endswith("scales") else "FP4")
                  for name, _, dtype, _ in tensors}  # fmt: skip
        (orig / "dtypes.json").write_text(json.dumps(dtypes, indent=2))
        specs = [_spec(name, shape, dtype, prod) for name, shape, dtype, prod in tensors]
        _write_sharded(
            orig, specs, max_shard_bytes or (1 << 62),
            lambda k, n: f"model--{k + 1:05d}-of-{n:05d}.safetensors", progress,
        )  # fmt: skip
        return out
    out.mkdir(parents=True, exist_ok=True)
    hf_config = config.to_hf_dict()
    if layout == "hf-bf16":
        del hf_config["quantization_config"]
    (out / "config.json").write_text(json.dumps(hf_config, indent=2))
    specs = _hf_specs(canon, dequantized=layout == "hf-bf16")
    # The published HF repos number shards from 0: model-00000-of-00002 ... model-00002-of-00002.
    _write_sharded(
        out, specs, max_shard_bytes or HF_SHARD_BYTES,
        lambda k, n: f"model-{k:05d}-of-{n - 1:05d}.safetensors", progress,
    )  # fmt: skip
    return out
