"""bf16 linears of decode and the greedy argmax: PyTorch / oneDNN against the native kernels.

    python bench/linear_kernel.py [--rows 1,4,16,64] [--screen-rows 1,2,4,8,16] [--runs 9]

Per weight shape of gpt-oss (the small preset's and gpt-oss-20b's attention projections and
unembedding) and row count: ``F.linear`` (oneDNN, reordering the weight every call), the
weight reordered once (``model.prepacked.PrepackedLinear``), and ``native_cpu.linear_interleaved``
on the weight laid out once for it (what the native backend serves with) and its fused argmax
(no logits written); then the argmax of [N, 201088] bf16 logits:
``greedy_argmax`` (the reference) against ``native_cpu.argmax_rows``; then the unembeddings'
greedy tokens through the 8-bit screen (``native_cpu.screened_argmax``) against the fused
argmax, with the groups of 16 outputs the screen left to recompute (per row, median; the native
backend stands the screen aside while that passes 1/32 of the head) and a check that the tokens
are the same. Runs alternate between the candidates; medians of --runs, and ratios taken in the
same run.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.kernels import native_cpu
from model.kernels.reference import greedy_argmax
from model.prepacked import PrepackedLinear, prepack_available

VOCAB = 201088
SHAPES = {  # name: (out, in)
    "small qkv": (5120, 640),
    "small o": (640, 4096),
    "small unembedding": (VOCAB, 640),
    "20b qkv": (5120, 2880),
    "20b o": (2880, 4096),
    "20b unembedding": (VOCAB, 2880),
}


def medians(fns: dict[str, Callable[[], object]], runs: int) -> dict[str, float]:
    """ms per call, the candidates interleaved run by run."""
    for f in fns.values():
        f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(runs):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: 1000 * statistics.median(v) for k, v in times.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,4,16,64")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--screen-rows", default="1,2,4,8,16")
    ap.add_argument("--runs", type=int, default=9)
    args = ap.parse_args()
    if not native_cpu.bf16_dot_available():
        print(f"native bf16 kernels unavailable here: {native_cpu.unavailable_reason() or 'no AVX-512 BF16'}")
        return 1
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, bf16, native ISA {native_cpu.isa()}")  # fmt: skip
    rows = [int(r) for r in args.rows.split(",")]
    g = torch.Generator().manual_seed(0)
    print("| weight [out, in] | rows | F.linear ms | prepacked ms | interleaved ms "
          "| interleaved argmax ms | interleaved / prepacked | GB/s interleaved |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for name in args.shapes.split(","):
        o, h = SHAPES[name]
        w = (torch.randn(o, h, generator=g) / h**0.5).bfloat16()
        packed = PrepackedLinear(w) if prepack_available(torch.device("cpu"), torch.bfloat16) else None
        inter = native_cpu.InterleavedLinear(w)
        for n in rows:
            x = torch.randn(n, h, generator=g).bfloat16()
            fns: dict[str, Callable[[], object]] = {
                "F.linear": lambda x=x, w=w: torch.nn.functional.linear(x, w)
            }
            if packed is not None:
                fns["prepacked"] = lambda x=x, p=packed: p(x)
            fns["interleaved"] = lambda x=x, p=inter: native_cpu.linear_interleaved(x, p)
            fns["argmax"] = lambda x=x, p=inter: native_cpu.linear_interleaved(x, p, argmax=True)
            t = medians(fns, args.runs)
            pre = t.get("prepacked", float("nan"))
            gbs = w.numel() * 2 / t["interleaved"] / 1e6
            print(f"| {name} [{o}, {h}] | {n} | {t['F.linear']:.3f} | {pre:.3f} "
                  f"| {t['interleaved']:.3f} | {t['argmax']:.3f} | {t['interleaved'] / pre:.2f} | {gbs:.1f} |")  # fmt: skip
    print()
    print("| logits | greedy_argmax ms | native argmax_rows ms | native / reference |")
    print("|---|---|---|---|")
    for n in rows:
        x = torch.randn(n, VOCAB, generator=g).bfloat16()
        cands = {"ref": lambda x=x: greedy_argmax(x), "native": lambda x=x: native_cpu.argmax_rows(x)}
        t = medians(cands, args.runs)
        print(f"| [{n}, {VOCAB}] bf16 | {t['ref']:.3f} | {t['native']:.3f} | {t['native'] / t['ref']:.2f} |")
    if native_cpu.screen_available():
        screen_table(args, g)
    return 0


def screen_table(args: argparse.Namespace, g: torch.Generator) -> None:
    print()
    print("| unembedding [out, in] | rows | fused argmax ms | screened ms | screened / fused "
          "| groups recomputed per row (of all) | same tokens |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for name in [s for s in args.shapes.split(",") if "unembedding" in s]:
        o, h = SHAPES[name]
        head = native_cpu.ScreenedHead((torch.randn(o, h, generator=g) / h**0.5).bfloat16())
        for n in [int(r) for r in args.screen_rows.split(",")]:
            x = torch.randn(n, h, generator=g).bfloat16()
            fns: dict[str, Callable[[], object]] = {
                "fused": lambda x=x, p=head: native_cpu.linear_interleaved(x, p, argmax=True),
                "screened": lambda x=x, p=head: native_cpu.screened_argmax(x, p),
            }
            recomputed = torch.empty(n, dtype=torch.int64)
            screened = native_cpu.screened_argmax(x, head, recomputed)
            if screened is None:  # declined (outlier features past two digits' rows)
                print(f"| {name} [{o}, {h}] | {n} | declined | | | | |")
                continue
            same = torch.equal(screened[0], fns["fused"]())
            t = medians(fns, args.runs)
            print(f"| {name} [{o}, {h}] | {n} | {t['fused']:.3f} | {t['screened']:.3f} "
                  f"| {t['screened'] / t['fused']:.2f} | {int(recomputed.float().median())} "
                  f"({head.weight.shape[0]}) | {same} |")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
