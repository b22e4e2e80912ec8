"""One layer's MoE with MXFP4 experts: the reference path against the native CPU kernel.

    python bench/moe_kernel.py [--tokens 1,4,16,64,256] [--runs 7] [--dtype bf16]

Random packed experts at gpt-oss-20b shapes (hidden 2880, intermediate 2880, 32 experts,
top-4; scales near the checkpoint's), a random router. Both sides include the routing:
the reference is ``model.layers.moe`` on packed ``ExpertWeights`` (each routed expert
dequantized to a bf16 matrix per use, then matmuls), native is ``route`` +
``model.kernels.native_cpu.moe_experts``. Runs alternate reference / native; medians of
--runs. The native path's bandwidth counts the packed bytes (nibbles and scales) of the
distinct experts the batch routes to, read once per step.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.config import ModelConfig
from model.kernels import native_cpu
from model.layers import ExpertWeights, moe, route


def random_experts(config: ModelConfig, seed: int) -> ExpertWeights:
    """Packed MXFP4 experts with uniform nibbles and scales that keep activations O(1)."""
    g = torch.Generator().manual_seed(seed)
    e, h, i = config.num_experts, config.hidden_size, config.intermediate_size

    def scales(rows: int, fan_in: int) -> torch.Tensor:
        centre = 127 + round(math.log2(1.0 / (2.93 * math.sqrt(fan_in))))
        return torch.randint(centre - 1, centre + 2, (e, rows, fan_in // 32), generator=g, dtype=torch.uint8)

    return ExpertWeights(
        mlp1_bias=torch.randn(e, 2 * i, generator=g) * 0.1,
        mlp2_bias=torch.randn(e, h, generator=g) * 0.1,
        mlp1_blocks=torch.randint(0, 256, (e, 2 * i, h // 32, 16), generator=g, dtype=torch.uint8),
        mlp1_scales=scales(2 * i, h),
        mlp2_blocks=torch.randint(0, 256, (e, h, i // 32, 16), generator=g, dtype=torch.uint8),
        mlp2_scales=scales(h, i),
    )


def cpu_description() -> tuple[str, str]:
    model, flags = platform.processor() or "?", ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("?", "", "x86_64"):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                wanted = ("avx2", "avx512f", "avx512bw", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")
                have = set(line.split(":", 1)[1].split())
                flags = " ".join(f for f in wanted if f in have)
                break
    except OSError:
        pass
    return model, flags


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", default="1,4,16,64,256")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--isa", choices=native_cpu.ISAS, default=None, help="cap the native path")
    parser.add_argument(
        "--dense",
        action="store_true",
        help="also time the experts dequantized at load (--dequantize-experts: dense, oneDNN-prepacked in bf16)",
    )
    args = parser.parse_args()

    if not native_cpu.available():
        raise SystemExit(f"native kernel unavailable: {native_cpu.unavailable_reason()}")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    config = ModelConfig(hidden_size=2880, intermediate_size=2880, num_experts=32, experts_per_token=4)
    experts = random_experts(config, seed=0)
    started = time.perf_counter()
    packed = native_cpu.PackedExperts.from_expert_weights(experts)
    pack_s = time.perf_counter() - started
    g = torch.Generator().manual_seed(1)
    router_w = torch.randn(config.num_experts, config.hidden_size, generator=g)
    router_b = torch.randn(config.num_experts, generator=g) * 0.1

    model, flags = cpu_description()
    print(
        f"cpu: {model} ({os.cpu_count()} cpus; {flags}); torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(
        f"native: isa {native_cpu.isa() if args.isa is None else args.isa}, build {native_cpu.build_info()}"
    )
    print(f"packed layer: {packed.nbytes / 1e6:.1f} MB (re-laid out in {pack_s:.2f} s); dtype {args.dtype}")
    dense = None
    if args.dense:
        dense = random_experts(config, seed=0)
        dense.dequantize_all(dtype)
        if dtype == torch.bfloat16:
            from model.prepacked import prepack_available

            if prepack_available(torch.device("cpu"), dtype):
                dense.prepack()
    print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print()
    dense_head = (" dense ms |", "---:|") if dense is not None else ("", "")
    print(f"| T | distinct experts | reference ms | native ms | speed-up | native GB/s |{dense_head[0]}")
    print(f"|---:|---:|---:|---:|---:|---:|{dense_head[1]}")
    alpha, limit = config.swiglu_alpha, config.swiglu_limit
    for t in (int(v) for v in args.tokens.split(",")):
        y = torch.randn(t, config.hidden_size, generator=g).to(dtype)
        distinct = int(torch.unique(route(y, router_w, router_b, config.experts_per_token)[1]).numel())

        def reference(y: torch.Tensor = y) -> torch.Tensor:
            return moe(y, experts, router_w, router_b, config)

        def native(y: torch.Tensor = y) -> torch.Tensor:
            w, i = route(y, router_w, router_b, config.experts_per_token)
            return native_cpu.moe_experts(y, w, i, packed, alpha, limit, isa=args.isa)

        with torch.inference_mode():
            ref_out, nat_out = reference(), native()  # warm-up, and a sanity check
            rel = ((nat_out.float() - ref_out.float()).abs().max() / ref_out.float().abs().max()).item()
            assert rel < 5e-2, f"native and reference disagree at T={t}: {rel}"
            runs = args.runs if t <= 64 else max(3, args.runs // 2)
            timed: list[tuple[object, list[float]]] = [(reference, []), (native, [])]
            if dense is not None:

                def dense_moe(y: torch.Tensor = y, dense: ExpertWeights = dense) -> torch.Tensor:
                    return moe(y, dense, router_w, router_b, config)

                dense_moe()
                timed.append((dense_moe, []))
            for _ in range(runs):
                for fn, times in timed:
                    t0 = time.perf_counter()
                    fn()  # type: ignore[operator]
                    times.append(time.perf_counter() - t0)
        ref_ms, nat_ms = (statistics.median(times) * 1e3 for _, times in timed[:2])
        gbs = distinct * packed.expert_nbytes() / (nat_ms / 1e3) / 1e9
        dense_cell = f" {statistics.median(timed[2][1]) * 1e3:.1f} |" if dense is not None else ""
        print(
            f"| {t} | {distinct} | {ref_ms:.1f} | {nat_ms:.2f} | {ref_ms / nat_ms:.1f}x | {gbs:.1f} |{dense_cell}",
            flush=True,
        )
    print()
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
