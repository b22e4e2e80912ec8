"""``python -m model make-checkpoint|generate``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

OVERRIDE_FLAGS = {
    "--num-layers": "num_layers",
    "--hidden-size": "hidden_size",
    "--num-experts": "num_experts",
    "--experts-per-token": "experts_per_token",
    "--num-heads": "num_heads",
    "--num-kv-heads": "num_kv_heads",
    "--head-dim": "head_dim",
    "--intermediate-size": "intermediate_size",
    "--sliding-window": "sliding_window",
    "--vocab-size": "vocab_size",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m model")
    sub = parser.add_subparsers(dest="command", required=True)

    make = sub.add_parser("make-checkpoint", help="write a random checkpoint in a published layout")
    make.add_argument("--preset", default="tiny", choices=["tiny", "small", "20b", "120b"])
    make.add_argument("--layout", default="hf", choices=["hf", "original", "hf-bf16"])
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--out", required=True, type=Path)
    make.add_argument("--max-shard-bytes", type=int, default=None)
    for flag, field in OVERRIDE_FLAGS.items():
        make.add_argument(flag, dest=field, type=int, default=None)

    gen = sub.add_parser("generate", help="greedy continuation through the KV cache")
    gen.add_argument("--model", required=True, type=Path)
    gen.add_argument("--prompt-tokens", required=True, help="comma-separated token ids")
    gen.add_argument("--max-new-tokens", type=int, default=16)
    gen.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    gen.add_argument("--device", default="cpu")
    gen.add_argument("--block-size", type=int, default=16)
    gen.add_argument("--dequantize-experts", action="store_true")
    gen.add_argument("--kernels", default="reference", help="kernel backend: reference, native-cpu or auto")
    gen.add_argument(
        "--logits-out", type=Path, default=None, help="save prefill logits [prompt_len, vocab] .npy"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "make-checkpoint":
        from .checkpoint import make_checkpoint

        overrides = {field: getattr(args, field) for field in OVERRIDE_FLAGS.values()}
        out = make_checkpoint(
            args.out, preset=args.preset, layout=args.layout, seed=args.seed,
            max_shard_bytes=args.max_shard_bytes, progress=sys.stderr.isatty(), **overrides,
        )  # fmt: skip
        print(json.dumps({"path": str(out)}))
        return 0

    import torch

    from .config import ModelConfig
    from .generate import greedy_generate
    from .loader import load_model

    try:
        prompt = [int(t) for t in args.prompt_tokens.split(",") if t.strip()]
    except ValueError:
        print("error: --prompt-tokens must be comma-separated integers", file=sys.stderr)
        return 2
    vocab_size = ModelConfig.from_dir(args.model).vocab_size
    if not prompt or any(not 0 <= t < vocab_size for t in prompt):
        print(f"error: prompt must be non-empty ids in [0, {vocab_size})", file=sys.stderr)
        return 2
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    model = load_model(
        args.model,
        dtype=dtype,
        device=args.device,
        dequantize_experts=args.dequantize_experts,
        kernels=args.kernels,
    )
    tokens, prefill_logits = greedy_generate(
        model, prompt, args.max_new_tokens, block_size=args.block_size,
        return_prefill_logits=args.logits_out is not None,
    )  # fmt: skip
    if prefill_logits is not None:
        import numpy as np

        np.save(args.logits_out, prefill_logits.float().cpu().numpy())
    print(json.dumps({"tokens": tokens}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
