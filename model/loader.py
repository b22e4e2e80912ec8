"""Load a gpt-oss checkpoint into ``GptOssModel``.

Understands the HF layout with packed MXFP4 experts, the HF dequantized bf16 export
(experts transposed to [E, in, out]) and the original layout (``original/``, ``block.N``),
single file or sharded. Tensors stay memory-mapped when dtype and device allow it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from .config import ORIGINAL_DIR_NAME, ModelConfig
from .kernels import REFERENCE, select_kernels
from .layers import ExpertWeights
from .mxfp4 import BYTES_PER_BLOCK, VALUES_PER_BLOCK
from .safetensors_reader import CheckpointError, SafetensorsDir
from .transformer import GptOssModel, LayerWeights, ModelWeights

PROGRESS_MIN_BYTES = 1 << 30


def _find_layout(path: Path) -> tuple[str, Path, ModelConfig]:
    """-> (layout 'hf' | 'original', weights directory, config)."""
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    hf_has_weights = any(path.glob("*.safetensors"))
    if (path / "config.json").is_file() and hf_has_weights:
        config = ModelConfig.from_dir(path)
        raw = json.loads((path / "config.json").read_text())
        if "model_type" not in raw and "num_experts" in raw:
            return "original", path, config  # path is an original/ directory itself
        return "hf", path, config
    orig = path / ORIGINAL_DIR_NAME
    if (orig / "config.json").is_file():
        return "original", orig, ModelConfig.from_dir(path)
    raise CheckpointError(f"{path}: no config.json with safetensors, and no {ORIGINAL_DIR_NAME}/ directory")


def _check_dtype(name: str, t: torch.Tensor, allowed: tuple[torch.dtype, ...]) -> None:
    if t.dtype not in allowed:
        raise CheckpointError(f"tensor {name!r} has dtype {t.dtype}, expected one of {allowed}")


FLOATS = (torch.bfloat16, torch.float16, torch.float32)


def load_model(
    path: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    dequantize_experts: bool = False,
    progress: bool = True,
    kernels: str = REFERENCE,
) -> GptOssModel:
    """``kernels``: a backend name or ``auto`` (model/kernels/select.py); a backend other
    than the reference is checked against it on the loaded weights before it is used. The
    default is the reference, the oracle whose results every other test and tool compares
    with; the engine's own default (``EngineConfig.kernels``) is ``auto``."""
    layout, wdir, config = _find_layout(Path(path))
    files = SafetensorsDir(wdir)
    device = torch.device(device)
    c = config
    h, e = c.hidden_size, c.num_experts
    bar = None
    if progress and files.nbytes() >= PROGRESS_MIN_BYTES:
        from tqdm import tqdm

        bar = tqdm(total=c.num_layers + 2, desc=f"loading {Path(path).name}", unit="layer")

    def get(name: str, shape: tuple[int, ...], to: torch.dtype | None = dtype) -> torch.Tensor:
        t = files.get(name, shape)
        if to is None:
            _check_dtype(name, t, (torch.uint8,))
            out = t.to(device)
        else:
            _check_dtype(name, t, FLOATS)
            out = t.to(device=device, dtype=to)
        if out.data_ptr() != t.data_ptr():  # a copy (another dtype or device): the file's pages can go
            files.release(name)
        return out

    if layout == "hf":
        names = _hf_names
    else:
        names = _original_names
    n = names(-1)
    embedding = get(n["embedding"], (c.vocab_size, h))
    if bar is not None:
        bar.update(1)
    layers = []
    for li in range(c.num_layers):
        n = names(li)
        if layout == "hf":
            qkv_w = torch.cat([
                get(n["q.weight"], (c.q_dim, h)), get(n["k.weight"], (c.kv_dim, h)), get(n["v.weight"], (c.kv_dim, h)),
            ])  # fmt: skip
            qkv_b = torch.cat(
                [get(n["q.bias"], (c.q_dim,)), get(n["k.bias"], (c.kv_dim,)), get(n["v.bias"], (c.kv_dim,))]
            )
            for key in ("q.weight", "k.weight", "v.weight"):  # read into the concatenation
                files.release(n[key])
        else:
            qkv_w = get(n["qkv.weight"], (c.qkv_dim, h))
            qkv_b = get(n["qkv.bias"], (c.qkv_dim,))
        experts = _load_experts(files, n, c, get, dtype)
        if dequantize_experts:
            experts.dequantize_all(dtype)
        layers.append(
            LayerWeights(
                attn_norm=get(n["attn_norm"], (h,), torch.float32),
                qkv_weight=qkv_w,
                qkv_bias=qkv_b,
                sinks=get(n["sinks"], (c.num_heads,), torch.float32),
                out_weight=get(n["out.weight"], (h, c.q_dim)),
                out_bias=get(n["out.bias"], (h,)),
                mlp_norm=get(n["mlp_norm"], (h,), torch.float32),
                router_weight=get(n["router.weight"], (e, h), torch.float32),
                router_bias=get(n["router.bias"], (e,), torch.float32),
                experts=experts,
            )
        )
        if bar is not None:
            bar.update(1)
    n = names(-1)
    weights = ModelWeights(
        embedding=embedding,
        layers=layers,
        norm=get(n["norm"], (h,), torch.float32),
        unembedding=get(n["unembedding"], (c.vocab_size, h)),
    )
    if bar is not None:
        bar.update(1)
        bar.close()
    chosen = select_kernels(kernels, device, dtype, config, weights)
    model = GptOssModel(config, weights, dtype, chosen)

    loaded = {
        "experts": ("mlp1.blocks", "mlp1.scales", "mlp2.blocks", "mlp2.scales"),
        "qkv": ("qkv.weight",) if layout != "hf" else (),  # the HF q, k, v went above
        "out": ("out.weight",),
        "unembedding": ("unembedding",),
    }

    def release(part: str, layer: int) -> None:
        for key in loaded[part]:
            files.release(names(layer)[key])

    # The kernels' one-time preparation (reference: a no-op off the CPU or outside bf16).
    # What a backend copies into its own layout is released from the mapping as it goes:
    # otherwise both stay resident, the experts layer by layer (2 x 12 GB on the 20b), and
    # the pages read while copying the head and projections (2.4 GB on the 20b).
    model.prepack(released=release)
    # What the model still reads from the mapping (the embedding, biases; the reference's
    # experts) is read ahead last, so that it is the page cache's newest. Never read at load,
    # and with the experts streamed through the cache since, each first touch of a page would
    # be a disk read: the embedding's rows cost 4-5 ms each on the 20b, 16 ms of a 231 ms
    # batch-4 step.
    files.read_ahead()
    return model


def _load_experts(
    files: SafetensorsDir,
    n: dict[str, str],
    c: ModelConfig,
    get: Callable[..., torch.Tensor],
    dtype: torch.dtype,
) -> ExpertWeights:
    h, e, inter = c.hidden_size, c.num_experts, c.intermediate_size
    mlp1_bias = get(n["mlp1.bias"], (e, 2 * inter))
    mlp2_bias = get(n["mlp2.bias"], (e, h))
    if n["mlp1.blocks"] in files:
        return ExpertWeights(
            mlp1_bias=mlp1_bias,
            mlp2_bias=mlp2_bias,
            mlp1_blocks=get(n["mlp1.blocks"], (e, 2 * inter, h // VALUES_PER_BLOCK, BYTES_PER_BLOCK), None),
            mlp1_scales=get(n["mlp1.scales"], (e, 2 * inter, h // VALUES_PER_BLOCK), None),
            mlp2_blocks=get(n["mlp2.blocks"], (e, h, inter // VALUES_PER_BLOCK, BYTES_PER_BLOCK), None),
            mlp2_scales=get(n["mlp2.scales"], (e, h, inter // VALUES_PER_BLOCK), None),
        )
    if "mlp1.dense" in n and n["mlp1.dense"] in files:
        # The HF dequantized export: [E, in, out], already the ``x @ w`` order we use.
        return ExpertWeights(
            mlp1_bias=mlp1_bias,
            mlp2_bias=mlp2_bias,
            mlp1_dense=get(n["mlp1.dense"], (e, h, 2 * inter)),
            mlp2_dense=get(n["mlp2.dense"], (e, inter, h)),
        )
    raise CheckpointError(f"missing tensor {n['mlp1.blocks']!r} (nor a dequantized {n.get('mlp1.dense')!r})")


def _hf_names(layer: int) -> dict[str, str]:
    if layer < 0:
        return {
            "embedding": "model.embed_tokens.weight",
            "norm": "model.norm.weight",
            "unembedding": "lm_head.weight",
        }
    p = f"model.layers.{layer}"
    ex = f"{p}.mlp.experts"
    return {
        "attn_norm": f"{p}.input_layernorm.weight",
        "q.weight": f"{p}.self_attn.q_proj.weight",
        "q.bias": f"{p}.self_attn.q_proj.bias",
        "k.weight": f"{p}.self_attn.k_proj.weight",
        "k.bias": f"{p}.self_attn.k_proj.bias",
        "v.weight": f"{p}.self_attn.v_proj.weight",
        "v.bias": f"{p}.self_attn.v_proj.bias",
        "out.weight": f"{p}.self_attn.o_proj.weight",
        "out.bias": f"{p}.self_attn.o_proj.bias",
        "sinks": f"{p}.self_attn.sinks",
        "mlp_norm": f"{p}.post_attention_layernorm.weight",
        "router.weight": f"{p}.mlp.router.weight",
        "router.bias": f"{p}.mlp.router.bias",
        "mlp1.blocks": f"{ex}.gate_up_proj_blocks",
        "mlp1.scales": f"{ex}.gate_up_proj_scales",
        "mlp1.bias": f"{ex}.gate_up_proj_bias",
        "mlp1.dense": f"{ex}.gate_up_proj",
        "mlp2.blocks": f"{ex}.down_proj_blocks",
        "mlp2.scales": f"{ex}.down_proj_scales",
        "mlp2.bias": f"{ex}.down_proj_bias",
        "mlp2.dense": f"{ex}.down_proj",
    }


def _original_names(layer: int) -> dict[str, str]:
    if layer < 0:
        return {"embedding": "embedding.weight", "norm": "norm.scale", "unembedding": "unembedding.weight"}
    p = f"block.{layer}"
    return {
        "attn_norm": f"{p}.attn.norm.scale",
        "qkv.weight": f"{p}.attn.qkv.weight",
        "qkv.bias": f"{p}.attn.qkv.bias",
        "out.weight": f"{p}.attn.out.weight",
        "out.bias": f"{p}.attn.out.bias",
        "sinks": f"{p}.attn.sinks",
        "mlp_norm": f"{p}.mlp.norm.scale",
        "router.weight": f"{p}.mlp.gate.weight",
        "router.bias": f"{p}.mlp.gate.bias",
        "mlp1.blocks": f"{p}.mlp.mlp1_weight.blocks",
        "mlp1.scales": f"{p}.mlp.mlp1_weight.scales",
        "mlp1.bias": f"{p}.mlp.mlp1_bias",
        "mlp2.blocks": f"{p}.mlp.mlp2_weight.blocks",
        "mlp2.scales": f"{p}.mlp.mlp2_weight.scales",
        "mlp2.bias": f"{p}.mlp.mlp2_bias",
    }
