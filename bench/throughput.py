"""Engine throughput against transformers' static batching, on a random ``small`` checkpoint.

    python bench/throughput.py --concurrency 1,4,16,64 [--json]

A seeded workload of requests (prompt lengths uniform in --prompt-len, output lengths in
--output-len, ``ignore_eos``, greedy) is served at each concurrency level:
- by the engine, closed loop: ``c`` requests in flight, the next one submitted as soon as
  one finishes, in arrival order;
- by transformers' ``generate``, in static batches of ``c`` requests in arrival order, each
  batch left-padded and run until its longest output (as static batching must; only the
  tokens each request asked for are counted).
Output tokens/s, time to first token (engine: from submission; transformers: from the
start of the request's batch), their ratio, and the fraction of this machine's matmul
roofline the engine reached (model FLOPs of every token it computed, prefill included,
attention scores excluded, against a large matmul timed in the same run). Separately, the
engine's per-step overhead (everything but the forward pass) at batch 64 decode.
With --json the last line is a JSON object with those figures.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import platform
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.types import SamplingParams
from model.config import ModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class Request:
    prompt: list[int]
    output_len: int


@dataclass
class LevelResult:
    tok_s: float
    ttft_p50_s: float
    elapsed_s: float
    output_tokens: int
    computed_tokens: int = 0
    itl_p50_s: float = float("nan")  # engine only: gaps between a request's tokens
    itl_p99_s: float = float("nan")


def make_workload(
    n: int, prompt_range: tuple[int, int], output_range: tuple[int, int], seed: int
) -> list[Request]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        p = rng.randint(*prompt_range)
        out.append(Request([rng.randrange(0, 200_000) for _ in range(p)], rng.randint(*output_range)))
    return out


def level_workload(workload: list[Request], concurrency: int, per_slot: int) -> list[Request]:
    return workload[: per_slot * concurrency] if per_slot else workload


def layer_params_per_token(c: ModelConfig) -> int:
    """Weights one token multiplies through in the layers: attention projections, router
    and its k experts (embedding lookup and unembedding excluded)."""
    attn = c.hidden_size * c.qkv_dim + c.q_dim * c.hidden_size
    router = c.num_experts * c.hidden_size
    experts = c.experts_per_token * (
        c.hidden_size * 2 * c.intermediate_size + c.intermediate_size * c.hidden_size
    )
    return c.num_layers * (attn + router + experts)


def workload_flops(c: ModelConfig, workload: list[Request]) -> float:
    """Model FLOPs the workload needs, counted once (recomputation after a preemption is
    not useful work and is not counted): every position a request feeds through the layers
    (its prompt and every output token but the last) costs 2 x the layer weights plus the
    attention matmuls over the keys it sees (QK and PV: 4 x q_dim per key, the window on
    sliding layers); every output token costs one unembedding (2 x vocab x hidden), as the
    model computes logits only for rows that yield a token."""
    layer = 2 * layer_params_per_token(c)
    head = 2 * c.vocab_size * c.hidden_size
    n_full, n_sliding = len(c.full_layers), len(c.sliding_layers)
    total = 0.0
    for r in workload:
        n = len(r.prompt) + r.output_len - 1  # positions fed through the layers
        keys_full = n * (n + 1) / 2  # position t sees t + 1 keys
        w = c.sliding_window or n
        m = min(n, w)
        keys_sliding = m * (m + 1) / 2 + (n - m) * w
        total += (
            n * layer + 4 * c.q_dim * (n_full * keys_full + n_sliding * keys_sliding) + r.output_len * head
        )
    return total


def matmul_roofline(dtype: torch.dtype, device: torch.device, n: int, repeats: int = 10) -> float:
    """Best FLOP/s of an n x n x n matmul over ``repeats`` runs (a shared machine has slow
    moments; the best run is what the hardware can do)."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def engine_config(args: argparse.Namespace, model_dir: Path, max_num_seqs: int) -> EngineConfig:
    return EngineConfig(
        model_dir=str(model_dir),
        dtype=args.dtype,
        device=args.device,
        block_size=args.block_size,
        kv_cache_memory=args.kv_cache_memory,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        dequantize_experts=not args.packed_experts,
        kernels=args.kernels,
        step_target=args.step_target,
    )


def run_engine_level(engine: LLMEngine, workload: list[Request], concurrency: int) -> LevelResult:
    params = [SamplingParams(temperature=0, max_tokens=r.output_len, ignore_eos=True) for r in workload]
    next_req = 0
    in_flight = 0
    ttfts: list[float] = []
    gaps: list[float] = []
    output_tokens = 0
    before = engine.stats().num_batched_tokens
    t0 = time.perf_counter()
    while next_req < len(workload) or engine.has_unfinished():
        while in_flight < concurrency and next_req < len(workload):
            engine.add_request(f"r{next_req}", workload[next_req].prompt, params[next_req])
            next_req += 1
            in_flight += 1
        for out in engine.step():
            output_tokens += len(out.token_ids)
            if out.finished:
                in_flight -= 1
                assert out.metrics is not None and out.metrics.time_to_first_token is not None
                ttfts.append(out.metrics.time_to_first_token)
                times = out.metrics.token_times
                gaps.extend(b - a for a, b in itertools.pairwise(times))
    elapsed = time.perf_counter() - t0
    computed = engine.stats().num_batched_tokens - before
    assert engine.block_manager.all_free()
    itl = statistics.quantiles(gaps, n=100) if len(gaps) > 1 else [float("nan")] * 99
    return LevelResult(output_tokens / elapsed, statistics.median(ttfts), elapsed, output_tokens, computed,
                       statistics.median(gaps) if gaps else float("nan"), itl[98])  # fmt: skip


def decode_overhead_ms(engine: LLMEngine, batch: int, steps: int) -> tuple[float, float, float]:
    """(overhead, sampler, forward) ms per step of ``batch`` sequences all decoding, each the
    median over ``steps`` steps (this machine has slow moments); the overhead is everything
    but the forward pass (scheduler, batch building, sampler, bookkeeping)."""
    for i in range(batch):
        engine.add_request(f"o{i}", [1000 + i, 2000 + i, 3000 + i, 4000 + i],
                           SamplingParams(temperature=0, max_tokens=steps + 2, ignore_eos=True))  # fmt: skip
    engine.step()  # the prefill
    engine.step()
    t = engine.timing
    overhead, sampler, forward = [], [], []
    for _ in range(steps):
        tot0, fwd0, smp0 = t.total_s, t.forward_s, t.sampler_s
        engine.step()
        forward.append((t.forward_s - fwd0) * 1000)
        overhead.append((t.total_s - tot0) * 1000 - forward[-1])
        sampler.append((t.sampler_s - smp0) * 1000)
    while engine.has_unfinished():
        engine.step()
    return statistics.median(overhead), statistics.median(sampler), statistics.median(forward)


class _FirstCall:
    """A logits processor that notes when generate() produced its first logits."""

    def __init__(self) -> None:
        self.time: float | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.time is None:
            self.time = time.perf_counter()
        return scores


def run_transformers_level(
    hf: object, workload: list[Request], concurrency: int, pad_id: int, device: torch.device
) -> LevelResult:
    from transformers import LogitsProcessorList

    ttfts: list[float] = []
    useful = 0
    t0 = time.perf_counter()
    for start in range(0, len(workload), concurrency):
        batch = workload[start : start + concurrency]
        width = max(len(r.prompt) for r in batch)
        ids = torch.tensor([[pad_id] * (width - len(r.prompt)) + r.prompt for r in batch], device=device)
        mask = torch.tensor(
            [[0] * (width - len(r.prompt)) + [1] * len(r.prompt) for r in batch], device=device
        )
        longest = max(r.output_len for r in batch)
        first = _FirstCall()
        tb = time.perf_counter()
        with torch.inference_mode():
            hf.generate(  # type: ignore[attr-defined]
                ids, attention_mask=mask, max_new_tokens=longest, min_new_tokens=longest, do_sample=False,
                eos_token_id=None, pad_token_id=pad_id, logits_processor=LogitsProcessorList([first]),
            )  # fmt: skip
        assert first.time is not None
        ttfts.extend([first.time - tb] * len(batch))
        useful += sum(r.output_len for r in batch)
    elapsed = time.perf_counter() - t0
    return LevelResult(useful / elapsed, statistics.median(ttfts), elapsed, useful)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", default="1,4,16,64", help="comma list of levels")
    ap.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--requests-per-slot", type=int, default=0,
                    help="serve only the first N*c requests at level c (0 = all): shortens low levels")  # fmt: skip
    ap.add_argument("--prompt-len", default="32,512", help="min,max prompt tokens")
    ap.add_argument("--output-len", default="16,256", help="min,max output tokens")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--model-dir", help="an existing checkpoint (default: a random one of --preset in a temp dir)"
    )
    ap.add_argument("--preset", default="small")
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES),
                    help="weights, activations and KV cache of both systems (bfloat16: the fast CPU setting)")  # fmt: skip
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--kv-cache-memory", type=int, default=None)
    ap.add_argument(
        "--packed-experts", action="store_true", help="keep experts MXFP4 (default: dequantize at load)"
    )
    ap.add_argument("--kernels", default="auto", help="kernel backend: auto, reference, native-cpu")
    ap.add_argument("--step-target", default="auto", help="the engine's step target: auto, off, or ms")
    ap.add_argument(
        "--overhead-steps", type=int, default=20, help="decode steps timed for the batch-64 overhead (median)"
    )
    ap.add_argument("--roofline-size", type=int, default=2048)
    ap.add_argument("--skip-transformers", action="store_true")
    args = ap.parse_args(argv)

    levels = [int(x) for x in args.concurrency.split(",") if x]
    prompt_range = tuple(int(x) for x in args.prompt_len.split(","))
    output_range = tuple(int(x) for x in args.output_len.split(","))
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    tmp = None
    if args.model_dir:
        model_dir = Path(args.model_dir)
    else:
        from model.checkpoint import make_checkpoint

        tmp = tempfile.TemporaryDirectory(prefix="bench_throughput_")
        model_dir = make_checkpoint(Path(tmp.name), preset=args.preset, layout="hf", seed=args.seed)
    workload = make_workload(args.num_requests, prompt_range, output_range, args.seed)  # type: ignore[arg-type]

    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    print(f"workload: {len(workload)} requests, prompts {prompt_range}, outputs {output_range}, greedy, ignore_eos; "
          f"{sum(len(r.prompt) for r in workload)} prompt / {sum(r.output_len for r in workload)} output tokens")  # fmt: skip
    roofline = matmul_roofline(dtype, device, args.roofline_size)
    print(f"matmul roofline ({args.roofline_size}^3 {args.dtype}): {roofline / 1e9:.1f} GFLOP/s")

    # Engine: one model, a fresh engine (and KV cache) per level.
    base = LLMEngine(engine_config(args, model_dir, max([*levels, 64])))
    model = base.model
    model_config = base.model_config
    base.add_request("warmup", list(range(1, 40)), SamplingParams(temperature=0, max_tokens=4))
    while base.has_unfinished():
        base.step()
    overhead_ms, sampler_ms, forward_ms = decode_overhead_ms(base, 64, args.overhead_steps)
    print(f"engine overhead at batch 64 decode (median step): {overhead_ms:.2f} ms, of which sampler {sampler_ms:.2f} ms "
          f"(forward {forward_ms:.1f} ms/step)")  # fmt: skip
    overhead1_ms, sampler1_ms, forward1_ms = decode_overhead_ms(base, 1, args.overhead_steps)
    print(f"engine overhead at batch 1 decode (median step): {overhead1_ms:.2f} ms, of which sampler {sampler1_ms:.2f} ms "
          f"(forward {forward1_ms:.1f} ms/step)")  # fmt: skip
    del base
    engine_results: dict[int, LevelResult] = {}
    for c in levels:
        engine = LLMEngine(engine_config(args, model_dir, c), model=model)
        engine_results[c] = r = run_engine_level(
            engine, level_workload(workload, c, args.requests_per_slot), c
        )
        print(f"engine c={c}: {r.tok_s:.2f} tok/s, ttft p50 {r.ttft_p50_s:.2f} s, itl p50 {r.itl_p50_s * 1000:.1f} ms "
              f"p99 {r.itl_p99_s * 1000:.1f} ms, {r.elapsed_s:.1f} s, {r.computed_tokens} tokens computed",
              flush=True)  # fmt: skip
        del engine
    del model
    gc.collect()
    # Measured again after the engine's runs; the higher of the two counts (the stricter).
    roofline = max(roofline, matmul_roofline(dtype, device, args.roofline_size))
    print(f"matmul roofline after the engine runs: {roofline / 1e9:.1f} GFLOP/s (the higher of the two)")

    hf_results: dict[int, LevelResult] = {}
    if not args.skip_transformers:
        from transformers import GptOssForCausalLM, Mxfp4Config

        hf = GptOssForCausalLM.from_pretrained(
            model_dir,
            dtype=dtype,
            attn_implementation="eager",
            quantization_config=Mxfp4Config(dequantize=True),
        ).to(device)
        hf.eval()
        pad_id = ModelConfig.from_dir(model_dir).pad_token_id
        for c in levels:
            hf_results[c] = r = run_transformers_level(
                hf, level_workload(workload, c, args.requests_per_slot), c, pad_id, device
            )
            print(
                f"transformers c={c}: {r.tok_s:.2f} tok/s, ttft p50 {r.ttft_p50_s:.2f} s, {r.elapsed_s:.1f} s",
                flush=True,
            )

    print()
    print(
        "| concurrency | engine tok/s | transformers tok/s | ratio | engine TTFT p50 (s) | transformers TTFT p50 (s) "
        "| engine ITL p50 (ms) | ITL p99 (ms) | p99/p50 | roofline fraction |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    summary: dict[str, dict[str, float | None]] = {}
    for c in levels:
        e = engine_results[c]
        h = hf_results.get(c)
        level_flops = workload_flops(model_config, level_workload(workload, c, args.requests_per_slot))
        fraction = level_flops / e.elapsed_s / roofline
        ratio = e.tok_s / h.tok_s if h else None
        summary[str(c)] = {
            "engine_tok_s": round(e.tok_s, 3),
            "transformers_tok_s": round(h.tok_s, 3) if h else None,
            "ratio": round(ratio, 3) if ratio is not None else None,
            "ttft_p50_s": round(e.ttft_p50_s, 3),
            "transformers_ttft_p50_s": round(h.ttft_p50_s, 3) if h else None,
            "itl_p50_ms": round(e.itl_p50_s * 1000, 2),
            "itl_p99_ms": round(e.itl_p99_s * 1000, 2),
            "roofline_fraction": round(fraction, 4),
        }
        print(f"| {c} | {e.tok_s:.2f} | {h.tok_s if h else float('nan'):.2f} | {ratio or float('nan'):.2f} | "
              f"{e.ttft_p50_s:.2f} | {h.ttft_p50_s if h else float('nan'):.2f} | {e.itl_p50_s * 1000:.1f} | "
              f"{e.itl_p99_s * 1000:.1f} | {e.itl_p99_s / e.itl_p50_s:.2f} | {fraction:.3f} |")  # fmt: skip
    if args.json:
        print(json.dumps({
            "levels": summary,
            "overhead_ms_per_step_b64": round(overhead_ms, 3),
            "sampler_ms_per_step_b64": round(sampler_ms, 3),
            "scheduler_ms_per_step_b64": round(overhead_ms - sampler_ms, 3),
            "overhead_ms_per_step_b1": round(overhead1_ms, 3),
            "sampler_ms_per_step_b1": round(sampler1_ms, 3),
        }))  # fmt: skip
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
