"""Our model against transformers' GptOssForCausalLM on random checkpoints, in float32:
prefill logits at every position, and 64-token greedy continuations of prompts longer
than the sliding window. Vocab is cut to 1024 here only to keep the tests fast."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.batch import BatchMetadata
from model.checkpoint import make_checkpoint
from model.config import ModelConfig
from model.generate import greedy_generate
from model.loader import load_model

VOCAB = 1024
SMALL_VOCAB = {"vocab_size": VOCAB, "pad_token_id": VOCAB - 1, "eos_token_id": VOCAB - 2}
PROMPT_LEN = 300
NEW_TOKENS = 64

SHAPES = {
    # Odd sizes: 3 layers, 6 experts top-2, 6 query heads over 2 KV heads, window 16.
    "3layers-6experts-top2-gqa3": dict(
        num_layers=3, num_experts=6, experts_per_token=2, num_heads=6, num_kv_heads=2,
        head_dim=16, hidden_size=64, intermediate_size=64, sliding_window=16,
    ),
    # No GQA (MHA), top-4 of 8, window 32, wider head.
    "4layers-mha-8experts-top4-w32": dict(
        num_layers=4, num_experts=8, experts_per_token=4, num_heads=4, num_kv_heads=4,
        head_dim=32, hidden_size=96, intermediate_size=96, sliding_window=32,
    ),
    # 8 query heads per KV head like the real models, top-1, the real 128 window.
    "2layers-gqa8-top1-w128": dict(
        num_layers=2, num_experts=3, experts_per_token=1, num_heads=16, num_kv_heads=2,
        head_dim=8, hidden_size=64, intermediate_size=32, sliding_window=128,
    ),
}  # fmt: skip


def load_transformers(path: Path, packed: bool = True):
    from transformers import GptOssForCausalLM, Mxfp4Config

    kwargs = {"quantization_config": Mxfp4Config(dequantize=True)} if packed else {}
    model = GptOssForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager", **kwargs
    )
    model.eval()
    return model


def prefill_meta(n: int) -> BatchMetadata:
    return BatchMetadata(
        positions=torch.arange(n),
        query_start=torch.tensor([0, n]),
        context_lens=torch.tensor([0]),
        full_block_table=None,
        sliding_block_table=None,
        logits_indices=torch.arange(n),
    )


def max_relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """Per position: max |ours - ref| / max |ref|; the worst position."""
    return ((ours - ref).abs().amax(-1) / ref.abs().amax(-1)).max().item()


def random_prompt(seed: int, n: int = PROMPT_LEN) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n,), generator=g).tolist()


def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        # An explicit all-ones mask: otherwise generate() masks prompt tokens equal to the pad id.
        out = hf.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long), max_new_tokens=n, min_new_tokens=n, do_sample=False,
            eos_token_id=None, pad_token_id=VOCAB - 1,
        )  # fmt: skip
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("shape", list(SHAPES))
def test_prefill_and_greedy_match_transformers(tmp_path, shape):
    seed = list(SHAPES).index(shape) + 1
    ckpt = make_checkpoint(tmp_path / "ckpt", preset="tiny", seed=seed, **SHAPES[shape], **SMALL_VOCAB)
    hf = load_transformers(ckpt)
    ours = load_model(ckpt, dtype=torch.float32)
    prompt = random_prompt(seed)

    with torch.no_grad():
        ref_logits = hf(torch.tensor([prompt])).logits[0].float()
    logits = ours(torch.tensor(prompt), prefill_meta(len(prompt)), None)
    assert logits.shape == (PROMPT_LEN, VOCAB)
    assert max_relative_error(logits, ref_logits) < 1e-5

    tokens, cached_prefill = greedy_generate(ours, prompt, NEW_TOKENS, block_size=16)
    assert cached_prefill is not None
    assert max_relative_error(cached_prefill, ref_logits) < 1e-5
    assert tokens == hf_greedy(hf, prompt, NEW_TOKENS)
    assert len(set(tokens)) > 1  # a degenerate model would make this comparison weak


def original_to_hf(original_dir: Path, out_dir: Path) -> None:
    """Convert an original-layout checkpoint to the HF layout, written independently of our
    checkpoint writer from the HFV name mapping (qkv split by rows, everything else renamed)."""
    oc = json.loads((original_dir / "config.json").read_text())
    cfg = ModelConfig.from_original_dict(oc)
    hf_cfg = cfg.replace(**{k: v for k, v in SMALL_VOCAB.items() if k != "vocab_size"}).to_hf_dict()
    out_dir.mkdir(parents=True)
    (out_dir / "config.json").write_text(json.dumps(hf_cfg))
    src = load_file(original_dir / "model.safetensors")
    q, kv = oc["num_attention_heads"] * oc["head_dim"], oc["num_key_value_heads"] * oc["head_dim"]
    dst = {
        "model.embed_tokens.weight": src["embedding.weight"],
        "model.norm.weight": src["norm.scale"],
        "lm_head.weight": src["unembedding.weight"],
    }
    for n in range(oc["num_hidden_layers"]):
        o, h = f"block.{n}", f"model.layers.{n}"
        for kind in ("weight", "bias"):
            qkv = src[f"{o}.attn.qkv.{kind}"]
            dst[f"{h}.self_attn.q_proj.{kind}"] = qkv[:q].clone()
            dst[f"{h}.self_attn.k_proj.{kind}"] = qkv[q : q + kv].clone()
            dst[f"{h}.self_attn.v_proj.{kind}"] = qkv[q + kv :].clone()
            dst[f"{h}.self_attn.o_proj.{kind}"] = src[f"{o}.attn.out.{kind}"]
            dst[f"{h}.mlp.router.{kind}"] = src[f"{o}.mlp.gate.{kind}"]
        dst[f"{h}.self_attn.sinks"] = src[f"{o}.attn.sinks"]
        dst[f"{h}.input_layernorm.weight"] = src[f"{o}.attn.norm.scale"]
        dst[f"{h}.post_attention_layernorm.weight"] = src[f"{o}.mlp.norm.scale"]
        for orig, hf in (("mlp1", "gate_up_proj"), ("mlp2", "down_proj")):
            dst[f"{h}.mlp.experts.{hf}_blocks"] = src[f"{o}.mlp.{orig}_weight.blocks"]
            dst[f"{h}.mlp.experts.{hf}_scales"] = src[f"{o}.mlp.{orig}_weight.scales"]
            dst[f"{h}.mlp.experts.{hf}_bias"] = src[f"{o}.mlp.{orig}_bias"]
    save_file(dst, out_dir / "model.safetensors", metadata={"format": "pt"})


def test_original_layout_matches_transformers_on_converted_weights(tmp_path):
    shape = SHAPES["3layers-6experts-top2-gqa3"]
    root = make_checkpoint(
        tmp_path / "orig", preset="tiny", layout="original", seed=7, **shape, **SMALL_VOCAB
    )
    assert not (root / "config.json").exists() and (root / "original" / "dtypes.json").is_file()
    original_to_hf(root / "original", tmp_path / "converted")
    hf = load_transformers(tmp_path / "converted")
    prompt = random_prompt(7)
    with torch.no_grad():
        ref_logits = hf(torch.tensor([prompt])).logits[0].float()
    for path in (root, root / "original"):  # the repo root or the original/ folder itself
        ours = load_model(path, dtype=torch.float32)
        logits = ours(torch.tensor(prompt), prefill_meta(len(prompt)), None)
        assert max_relative_error(logits, ref_logits) < 1e-5
    tokens, _ = greedy_generate(ours, prompt, 32, return_prefill_logits=False)
    assert tokens == hf_greedy(hf, prompt, 32)


def test_dequantized_bf16_export_matches_transformers_and_packed(tmp_path):
    shape = SHAPES["3layers-6experts-top2-gqa3"]
    packed_dir = make_checkpoint(tmp_path / "packed", preset="tiny", seed=3, **shape, **SMALL_VOCAB)
    export_dir = make_checkpoint(
        tmp_path / "bf16", preset="tiny", layout="hf-bf16", seed=3, **shape, **SMALL_VOCAB
    )
    hf = load_transformers(export_dir, packed=False)
    assert hf.model.layers[0].mlp.experts.gate_up_proj.shape == (6, 64, 128)  # [E, in, out]
    prompt = random_prompt(3, 200)
    with torch.no_grad():
        ref_logits = hf(torch.tensor([prompt])).logits[0].float()
    meta = prefill_meta(len(prompt))
    from_export = load_model(export_dir, dtype=torch.float32)(torch.tensor(prompt), meta, None)
    assert max_relative_error(from_export, ref_logits) < 1e-5
    packed = load_model(packed_dir, dtype=torch.float32)
    assert torch.equal(packed(torch.tensor(prompt), meta, None), from_export)
    # Dequantizing once at load gives the same network as dequantizing per use.
    once = load_model(packed_dir, dtype=torch.float32, dequantize_experts=True)
    assert not once.weights.layers[0].experts.packed
    assert torch.equal(once(torch.tensor(prompt), meta, None), from_export)


def test_bfloat16_model_tracks_float32(tmp_path):
    """bf16 weights/activations (fp32 router, norms and softmax) stay close to fp32."""
    ckpt = make_checkpoint(tmp_path / "ckpt", preset="tiny", seed=5, **SMALL_VOCAB)
    prompt = random_prompt(5, 64)
    meta = prefill_meta(len(prompt))
    ref = load_model(ckpt, dtype=torch.float32)(torch.tensor(prompt), meta, None)
    low = load_model(ckpt, dtype=torch.bfloat16)(torch.tensor(prompt), meta, None)
    assert low.dtype == torch.bfloat16  # logits come in the model dtype
    low = low.float()
    assert max_relative_error(low, ref) < 0.1
    agree = (low.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert agree > 0.8
