"""Model hyperparameters, read from either published config.json, plus size presets.

Two files describe the same network: the Hugging Face ``config.json`` at the repo root and
the original ``original/config.json`` (REF field names). ``ModelConfig`` is our own neutral
form; ``to_hf_dict`` / ``to_original_dict`` write them back in the published key names.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HF_CONFIG_NAME = "config.json"
ORIGINAL_DIR_NAME = "original"


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 201088
    hidden_size: int = 2880
    num_layers: int = 24
    num_heads: int = 64
    num_kv_heads: int = 8
    head_dim: int = 64
    intermediate_size: int = 2880
    num_experts: int = 32
    experts_per_token: int = 4
    sliding_window: int = 128
    rope_theta: float = 150000.0
    rope_scaling_factor: float = 32.0
    initial_context_length: int = 4096
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    swiglu_limit: float = 7.0
    swiglu_alpha: float = 1.702
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 131072
    eos_token_id: int = 200002
    pad_token_id: int = 199999
    # Which layers use the sliding window; None = the published pattern (even layers).
    layer_types: tuple[str, ...] | None = field(default=None)

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.hidden_size % 32 or self.intermediate_size % 32:
            raise ValueError("hidden_size and intermediate_size must be multiples of 32 (MXFP4 blocks)")
        if not 1 <= self.experts_per_token <= self.num_experts:
            raise ValueError(f"experts_per_token {self.experts_per_token} not in 1..{self.num_experts}")
        if self.head_dim % 2:
            raise ValueError("head_dim must be even (half-split RoPE)")
        if self.layer_types is not None and len(self.layer_types) != self.num_layers:
            raise ValueError("layer_types must have one entry per layer")

    # -- derived sizes ------------------------------------------------------------------
    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def qkv_dim(self) -> int:
        return self.q_dim + 2 * self.kv_dim

    @property
    def sm_scale(self) -> float:
        return 1.0 / math.sqrt(self.head_dim)

    def is_sliding(self, layer: int) -> bool:
        if self.layer_types is not None:
            return self.layer_types[layer] == "sliding_attention"
        return layer % 2 == 0

    @property
    def sliding_layers(self) -> list[int]:
        return [i for i in range(self.num_layers) if self.is_sliding(i)]

    @property
    def full_layers(self) -> list[int]:
        return [i for i in range(self.num_layers) if not self.is_sliding(i)]

    def replace(self, **overrides: Any) -> ModelConfig:
        return dataclasses.replace(self, **overrides)

    # -- published config files ---------------------------------------------------------
    def to_hf_dict(self) -> dict[str, Any]:
        """The Hugging Face config.json, with the keys and values the real repos publish."""
        layer_types = [
            "sliding_attention" if self.is_sliding(i) else "full_attention" for i in range(self.num_layers)
        ]
        return {
            "architectures": ["GptOssForCausalLM"],
            "attention_bias": True,
            "attention_dropout": 0.0,
            "eos_token_id": self.eos_token_id,
            "experts_per_token": self.experts_per_token,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "initial_context_length": self.initial_context_length,
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate_size,
            "layer_types": layer_types,
            "max_position_embeddings": self.max_position_embeddings,
            "model_type": "gpt_oss",
            "num_attention_heads": self.num_heads,
            "num_experts_per_tok": self.experts_per_token,
            "num_hidden_layers": self.num_layers,
            "num_key_value_heads": self.num_kv_heads,
            "num_local_experts": self.num_experts,
            "output_router_logits": False,
            "pad_token_id": self.pad_token_id,
            "quantization_config": {
                "modules_to_not_convert": [
                    "model.layers.*.self_attn",
                    "model.layers.*.mlp.router",
                    "model.embed_tokens",
                    "lm_head",
                ],
                "quant_method": "mxfp4",
            },
            "rms_norm_eps": self.rms_norm_eps,
            "rope_scaling": {
                "beta_fast": float(self.rope_beta_fast),
                "beta_slow": float(self.rope_beta_slow),
                "factor": float(self.rope_scaling_factor),
                "original_max_position_embeddings": self.initial_context_length,
                "rope_type": "yarn",
                "truncate": False,
            },
            "rope_theta": self.rope_theta,
            "router_aux_loss_coef": 0.9,
            "sliding_window": self.sliding_window,
            "swiglu_limit": self.swiglu_limit,
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
            "transformers_version": "4.55.0.dev0",
            "use_cache": True,
            "vocab_size": self.vocab_size,
        }

    def to_original_dict(self) -> dict[str, Any]:
        """original/config.json: the reference implementation's ModelConfig fields."""
        return {
            "num_hidden_layers": self.num_layers,
            "num_experts": self.num_experts,
            "experts_per_token": self.experts_per_token,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "swiglu_limit": self.swiglu_limit,
            "head_dim": self.head_dim,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "sliding_window": self.sliding_window,
            "initial_context_length": self.initial_context_length,
            "rope_theta": self.rope_theta,
            "rope_scaling_factor": self.rope_scaling_factor,
            "rope_ntk_alpha": self.rope_beta_slow,
            "rope_ntk_beta": self.rope_beta_fast,
        }

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ModelConfig:
        rope = d.get("rope_scaling") or d.get("rope_parameters") or {}
        theta = d.get("rope_theta", rope.get("rope_theta", 150000.0))
        layer_types = d.get("layer_types")
        num_layers = int(d["num_hidden_layers"])
        # Store layer_types only when they differ from the published even/odd pattern.
        default_types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)]
        if layer_types is not None and list(layer_types) == default_types:
            layer_types = None
        factor = float(rope.get("factor", 32.0))
        initial = int(rope.get("original_max_position_embeddings", d.get("initial_context_length", 4096)))
        eos = d.get("eos_token_id", 200002)
        if isinstance(eos, list):
            eos = eos[0]
        return cls(
            vocab_size=int(d["vocab_size"]),
            hidden_size=int(d["hidden_size"]),
            num_layers=num_layers,
            num_heads=int(d["num_attention_heads"]),
            num_kv_heads=int(d["num_key_value_heads"]),
            head_dim=int(d.get("head_dim") or d["hidden_size"] // d["num_attention_heads"]),
            intermediate_size=int(d["intermediate_size"]),
            num_experts=int(d.get("num_local_experts", d.get("num_experts", 32))),
            experts_per_token=int(d.get("num_experts_per_tok", d.get("experts_per_token", 4))),
            sliding_window=int(d.get("sliding_window") or 128),
            rope_theta=float(theta),
            rope_scaling_factor=factor,
            initial_context_length=initial,
            rope_beta_fast=float(rope.get("beta_fast", 32.0)),
            rope_beta_slow=float(rope.get("beta_slow", 1.0)),
            swiglu_limit=float(d.get("swiglu_limit", 7.0)),
            swiglu_alpha=float(d.get("swiglu_alpha", 1.702)),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
            max_position_embeddings=int(d.get("max_position_embeddings", int(initial * factor))),
            eos_token_id=int(eos if eos is not None else 200002),
            pad_token_id=int(d.get("pad_token_id") if d.get("pad_token_id") is not None else 199999),
            layer_types=tuple(layer_types) if layer_types is not None else None,
        )

    @classmethod
    def from_original_dict(cls, d: dict[str, Any]) -> ModelConfig:
        factor = float(d.get("rope_scaling_factor", 32.0))
        initial = int(d.get("initial_context_length", 4096))
        return cls(
            vocab_size=int(d["vocab_size"]),
            hidden_size=int(d["hidden_size"]),
            num_layers=int(d["num_hidden_layers"]),
            num_heads=int(d["num_attention_heads"]),
            num_kv_heads=int(d["num_key_value_heads"]),
            head_dim=int(d.get("head_dim", 64)),
            intermediate_size=int(d["intermediate_size"]),
            num_experts=int(d["num_experts"]),
            experts_per_token=int(d["experts_per_token"]),
            sliding_window=int(d.get("sliding_window", 128)),
            rope_theta=float(d.get("rope_theta", 150000.0)),
            rope_scaling_factor=factor,
            initial_context_length=initial,
            rope_beta_fast=float(d.get("rope_ntk_beta", 32.0)),
            rope_beta_slow=float(d.get("rope_ntk_alpha", 1.0)),
            swiglu_limit=float(d.get("swiglu_limit", 7.0)),
            max_position_embeddings=int(initial * factor),
        )

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelConfig:
        """Read config.json (HF) from ``path``; else original/config.json or an original dir."""
        path = Path(path)
        hf = path / HF_CONFIG_NAME
        if hf.is_file():
            d = json.loads(hf.read_text())
            if "num_hidden_layers" in d and "num_attention_heads" in d and "num_local_experts" in d:
                return cls.from_hf_dict(d)
            if "num_experts" in d and "experts_per_token" in d and "model_type" not in d:
                return cls.from_original_dict(d)  # path is itself an original/ dir
            return cls.from_hf_dict(d)
        orig = path / ORIGINAL_DIR_NAME / HF_CONFIG_NAME
        if orig.is_file():
            return cls.from_original_dict(json.loads(orig.read_text()))
        raise FileNotFoundError(f"no config.json in {path} nor in {path / ORIGINAL_DIR_NAME}")


PRESETS: dict[str, ModelConfig] = {
    # Tests: the real vocabulary (so the real tokenizer's ids are all valid), tiny everything else.
    "tiny": ModelConfig(
        vocab_size=201088,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        intermediate_size=64,
        num_experts=4,
        experts_per_token=2,
        sliding_window=16,
    ),
    # Benchmarks: the real head layout and routing, a fraction of the width and depth.
    "small": ModelConfig(
        vocab_size=201088,
        hidden_size=640,
        num_layers=8,
        num_heads=64,
        num_kv_heads=8,
        head_dim=64,
        intermediate_size=640,
        num_experts=32,
        experts_per_token=4,
        sliding_window=128,
    ),
    "20b": ModelConfig(num_layers=24, num_experts=32),
    "120b": ModelConfig(num_layers=36, num_experts=128),
}
