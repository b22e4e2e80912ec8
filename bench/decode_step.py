"""Decode steps of the real engine with one op of the ``native-cpu`` backend in the reference's
PyTorch code or in the native kernel, alternated in one run (A B A B), so the two are compared
on the same machine state.

    python bench/decode_step.py --model CKPT [--op attention|norm_rope|head] [--batch 1,16,64]
        [--context 128,512] [--rounds 6] [--steps 8]

One ``LLMEngine`` (bf16, ``native-cpu``) per (batch, context): B requests with seeded prompts
of the given length prefill, then decode greedily; every --steps decode steps the op switches
between "reference" and "native" (the backend's default): ``attention`` = the decode
attention (the backend's ``attention_dtypes``), ``norm_rope`` = RMSNorm and RoPE, ``head`` =
the LM head as the backend lays it out (``linear_interleaved``, "native") or the reference's
oneDNN-prepacked head with its rows padded to HEAD_MIN_ROWS. Prints the median forward time of a decode step per
setting and their ratio; contexts grow by --rounds x --steps x 2 tokens over a case, the
same for both settings.
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.types import SamplingParams
from model.kernels import ReferenceKernels
from model.prepacked import HEAD_MIN_ROWS, PrepackedLinear, prepack_available
from model.transformer import GptOssModel


def op_switch(model: GptOssModel, op: str) -> Callable[[bool], None]:
    """A function that puts ``op`` of the model on its native / new (True) or reference path."""
    kernels = model.kernels
    if op == "head":
        weights = model.weights
        native = weights.unembedding_prepacked
        if native is None or not prepack_available(weights.unembedding.device, weights.unembedding.dtype):
            raise SystemExit("no native head to compare with oneDNN's here (bf16 on the CPU)")
        onednn = PrepackedLinear(weights.unembedding, HEAD_MIN_ROWS)

        def head(on: bool) -> None:
            weights.unembedding_prepacked = native if on else onednn

        return head
    if op == "attention":
        if not hasattr(kernels, "attention_dtypes"):
            raise SystemExit(f"backend {kernels.name} has no native attention to compare")
        native = kernels.attention_dtypes

        def attention(on: bool) -> None:
            kernels.attention_dtypes = native if on else ()

        return attention

    def norm_rope(on: bool) -> None:  # an instance attribute hides the backend's method
        for name in ("rms_norm", "rope"):
            if on:
                vars(kernels).pop(name, None)
            else:
                setattr(kernels, name, getattr(ReferenceKernels, name).__get__(kernels))

    return norm_rope


def run_case(
    model: str, op: str, batch: int, context: int, rounds: int, steps: int
) -> dict[str, list[float]]:
    engine = LLMEngine(
        EngineConfig(model, dtype="bfloat16", kernels="native-cpu", max_num_seqs=max(batch, 1))
    )
    switch = op_switch(engine.model, op)
    rng = random.Random(batch * 7919 + context)
    for i in range(batch):
        prompt = [rng.randrange(1000, 100000) for _ in range(context)]
        # Room for the decode steps that run while later prompts still prefill, so every
        # request is still decoding when the timed steps start.
        params = SamplingParams(temperature=0, max_tokens=1024, ignore_eos=True)
        engine.add_request(f"r{i}", prompt, params)
    while engine.scheduler.waiting or any(s.num_uncomputed_tokens > 1 for s in engine.scheduler.running):
        engine.step()  # prefill (and the first decode steps of early finishers) untimed
    for _ in range(2):
        engine.step()  # warm-up
    times: dict[str, list[float]] = {"reference": [], "native": []}
    for _ in range(rounds):
        for name, on in (("reference", False), ("native", True)):
            switch(on)
            for _ in range(steps):
                before = engine.timing.forward_s
                engine.step()
                times[name].append((engine.timing.forward_s - before) * 1000)
    switch(True)
    if len(engine.scheduler.running) != batch:
        raise SystemExit(f"only {len(engine.scheduler.running)} of {batch} requests were decoding")
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="checkpoint folder")
    ap.add_argument("--op", choices=("attention", "norm_rope", "head"), default="attention")
    ap.add_argument("--batch", default="1,16,64")
    ap.add_argument("--context", default="128,512")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}")  # fmt: skip
    print(f"op: {args.op}")
    print()
    print("| batch | context | reference step ms | native step ms | native / reference |")
    print("|---|---|---|---|---|")
    for b in (int(x) for x in args.batch.split(",")):
        for ctx in (int(x) for x in args.context.split(",")):
            t = run_case(args.model, args.op, b, ctx, args.rounds, args.steps)
            r, n = statistics.median(t["reference"]), statistics.median(t["native"])
            print(f"| {b} | {ctx} | {r:.2f} | {n:.2f} | {n / r:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
