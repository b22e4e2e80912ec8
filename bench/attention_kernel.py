"""Decode attention over the paged KV cache: the reference path against the native CPU kernel.

    python bench/attention_kernel.py [--batch 1,16,64] [--context 128,512] [--runs 9]

One layer's decode step at gpt-oss shapes (64 query heads, 8 KV heads, head size 64, block
size 16, a full-attention layer): B sequences of the given context length, their blocks
scattered over the cache. The reference is ``model.paged_attention.attend_decode_group``
(the group's blocks gathered into one padded copy, two matmuls); native is
``native_cpu.paged_decode_attention`` (the blocks read where they are). Runs alternate
reference / native; medians of --runs, and the ratio of the two in the same run.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.kernels import native_cpu
from model.paged_attention import DecodeGroup, attend_decode_group

KV_HEADS, GROUP, HEAD_DIM, BLOCK = 8, 8, 64, 16
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def case(batch: int, context: int, dtype: torch.dtype, seed: int) -> tuple:
    g = torch.Generator().manual_seed(seed)
    nblk = -(-(context + 1) // BLOCK)
    num_blocks = batch * nblk + 8
    kc = torch.randn(KV_HEADS, num_blocks, BLOCK, HEAD_DIM, generator=g).to(dtype)
    vc = torch.randn(KV_HEADS, num_blocks, BLOCK, HEAD_DIM, generator=g).to(dtype)
    q = torch.randn(batch, KV_HEADS * GROUP, HEAD_DIM, generator=g).to(dtype)
    blocks = torch.randperm(num_blocks, generator=g)[: batch * nblk]
    mask = torch.zeros(batch, nblk * BLOCK, dtype=torch.bool)
    mask[:, : context + 1] = True
    sinks = torch.randn(KV_HEADS * GROUP, generator=g)
    group = DecodeGroup(rows=torch.arange(batch), blocks=blocks, mask=mask)
    return group, q, kc, vc, sinks


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", default="1,16,64")
    ap.add_argument("--context", default="128,512")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--runs", type=int, default=9)
    args = ap.parse_args()
    if not native_cpu.available():
        print(f"native kernels unavailable: {native_cpu.unavailable_reason()}")
        return 1
    dtype = DTYPES[args.dtype]
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, {args.dtype}, native ISA {native_cpu.isa()}")  # fmt: skip
    print()
    print("| batch | context | reference ms | native ms | speed-up | native GB/s (K+V read once) |")
    print("|---|---|---|---|---|---|")
    for b in (int(x) for x in args.batch.split(",")):
        for ctx in (int(x) for x in args.context.split(",")):
            group, q, kc, vc, sinks = case(b, ctx, dtype, seed=b * 7919 + ctx)
            out_ref, out_nat = torch.empty_like(q), torch.empty_like(q)
            ref, nat = [], []
            for _ in range(args.runs + 1):  # the first pair warms up
                t = time.perf_counter()
                attend_decode_group(group, q, kc, vc, sinks, 0.125, out_ref)
                ref.append(time.perf_counter() - t)
                t = time.perf_counter()
                native_cpu.paged_decode_attention(q, kc, vc, group.rows, group.blocks, group.mask, sinks, 0.125,
                                                  out_nat)  # fmt: skip
                nat.append(time.perf_counter() - t)
            err = (out_ref.float() - out_nat.float()).abs().max().item()
            assert err < 0.05, f"native and reference differ by {err}"
            r, n = statistics.median(ref[1:]) * 1000, statistics.median(nat[1:]) * 1000
            nbytes = 2 * b * (ctx + 1) * KV_HEADS * HEAD_DIM * kc.element_size()
            print(f"| {b} | {ctx} | {r:.3f} | {n:.3f} | {r / n:.2f}x | {nbytes / (n / 1000) / 1e9:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
