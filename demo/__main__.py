"""python -m demo train|export  (build step of the demonstration model; see docs/demo-model.md)."""

from __future__ import annotations

import argparse
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m demo")
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train from a seed on CPU")
    t.add_argument("--out", type=Path, default=Path("demo-run"))
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--minutes", type=float, default=20.0)
    t.add_argument("--examples", type=int, default=60000)
    e = sub.add_parser("export", help="write the compact artifact and/or a standard HF checkpoint")
    e.add_argument("--run", type=Path, default=Path("demo-run"))
    e.add_argument("--artifact", type=Path, default=Path("engine/data/gpt-oss-tiny.safetensors"))
    e.add_argument("--checkpoint", type=Path, default=None)
    args = ap.parse_args()
    if args.cmd == "train":
        from demo.train import train

        train(args.out, seed=args.seed, minutes=args.minutes, examples=args.examples)
    else:
        from demo.export import expand_artifact, write_artifact

        write_artifact(args.run / "trained.pt", args.artifact)
        if args.checkpoint is not None:
            expand_artifact(args.artifact, args.checkpoint)


if __name__ == "__main__":
    main()
