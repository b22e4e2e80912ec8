"""python -m demo train|export|eval  (build step of the demonstration model; docs/demo-model.md)."""

from __future__ import annotations

import argparse
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m demo")
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train from a seed on CPU")
    t.add_argument("--out", type=Path, default=Path("demo-run"))
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--steps", type=int, default=9000)
    t.add_argument("--minutes", type=float, default=58.0, help="time budget (the schedule anneals within it)")
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--batch-tokens", type=int, default=4096)
    e = sub.add_parser("export", help="write the compact artifact and/or a standard HF checkpoint")
    e.add_argument("--run", type=Path, default=Path("demo-run"))
    e.add_argument("--artifact", type=Path, default=Path("engine/data/gpt-oss-tiny.safetensors"))
    e.add_argument("--checkpoint", type=Path, default=None)
    v = sub.add_parser("eval", help="held-out accuracy per skill through the real engine")
    v.add_argument("--checkpoint", type=Path, required=True, help="an HF checkpoint folder or a run folder")
    v.add_argument("--per-skill", type=int, default=50)
    v.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    if args.cmd == "train":
        from demo.train import train

        train(args.out, seed=args.seed, steps=args.steps, minutes=args.minutes, batch_tokens=args.batch_tokens,
              lr=args.lr)  # fmt: skip
    elif args.cmd == "export":
        from demo.export import expand_artifact, write_artifact

        write_artifact(args.run / "trained.pt", args.artifact)
        if args.checkpoint is not None:
            expand_artifact(args.artifact, args.checkpoint)
    else:
        from demo.eval import main as eval_main

        eval_main(args.checkpoint, per_skill=args.per_skill, seed=args.seed)


if __name__ == "__main__":
    main()
