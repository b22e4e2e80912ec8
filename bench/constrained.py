"""The cost of constrained decoding, on a random checkpoint, in one run:

    python bench/constrained.py [--preset small] [--concurrency 16] [--rounds 3]

- unconstrained decoding with the feature present (requests without a constraint, after the
  engine has served constrained ones: mask worker up, grammars compiled) against the same
  engine with the mask step switched off;
- every request constrained to a JSON Schema (through the server's own guide: Harmony turn,
  reasoning budget), output tokens/s, and the mean time per step spent filling masks (on the
  worker, overlapped with the forward pass).
Each ratio is the median of per-round ratios of runs side by side in time (A B, then B A), so a
machine whose speed drifts over minutes (a shared VM's does, by 20%) does not bias it; the
tok/s columns are medians. Greedy; ``c`` requests in flight as one batch.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.types import SamplingParams
from harmony import tokens
from harmony.tokenizer import load_tokenizer
from model.checkpoint import make_checkpoint
from server.guided import GrammarCompiler
from server.guided_grammar import FinalRule
from server.structured import RequestGuide, TurnRules

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 4},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}
PROMPT = "<|start|>user<|message|>Extract the person.<|end|><|start|>assistant"


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def run(engine: LLMEngine, params: list[SamplingParams], prompt: list[int]) -> tuple[float, int]:
    for i, p in enumerate(params):
        engine.add_request(f"r{i}-{time.monotonic_ns()}", prompt, p)
    out = 0
    t0 = time.perf_counter()
    while engine.has_unfinished():
        out += sum(len(o.token_ids) for o in engine.step())
    return time.perf_counter() - t0, out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--output-len", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    tokenizer = load_tokenizer()
    compiler = GrammarCompiler(tokenizer)
    prompt = tokenizer.encode_with_specials(PROMPT)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_checkpoint(Path(tmp), preset=args.preset, layout="hf", seed=0)
        engine = LLMEngine(EngineConfig(model_dir=str(ckpt), dtype=args.dtype, max_num_seqs=args.concurrency))
        c, n = args.concurrency, args.output_len

        def plain() -> list[SamplingParams]:
            return [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for _ in range(c)]

        guide = RequestGuide(TurnRules(FinalRule(schema=SCHEMA), constrained=True), max_reasoning_tokens=16)

        def constrained() -> list[SamplingParams]:
            return [
                SamplingParams(
                    temperature=0.0,
                    max_tokens=n,
                    stop_token_ids=[tokens.RETURN, tokens.CALL],
                    constraint=compiler.constraint(guide.guide(n)),
                )
                for _ in range(c)
            ]

        start_masks = engine._start_masks
        fill = engine.sampler.fill_masks
        fill_s: list[float] = []

        def timed_fill(seqs, masks):
            t = time.perf_counter()
            try:
                return fill(seqs, masks)
            finally:
                fill_s.append(time.perf_counter() - t)

        engine.sampler.fill_masks = timed_fill  # type: ignore[method-assign]
        run(engine, plain(), prompt)  # warm-up
        run(engine, constrained(), prompt)  # the feature present: worker started, grammar compiled
        on, off, guided, steps = [], [], [], []
        on_ratio, guided_ratio = [], []

        def unconstrained(feature: str) -> float:
            if feature == "off":
                engine._start_masks = lambda seqs: None  # type: ignore[method-assign]
            try:
                seconds, count = run(engine, plain(), prompt)
            finally:
                engine._start_masks = start_masks  # type: ignore[method-assign]
            (on if feature == "on" else off).append(count / seconds)
            return count / seconds

        for r in range(args.rounds):  # A B, B A: neither arm always runs first
            first, second = ("on", "off") if r % 2 == 0 else ("off", "on")
            tps = {first: unconstrained(first), second: unconstrained(second)}
            on_ratio.append(tps["on"] / tps["off"])
        for r in range(args.rounds):
            fill_s.clear()
            ref = unconstrained("off") if r % 2 == 0 else 0.0
            seconds, count = run(engine, constrained(), prompt)
            guided.append(count / seconds)
            steps.append(statistics.mean(fill_s) * 1e3)
            ref = ref or unconstrained("off")
            guided_ratio.append(guided[-1] / ref)
    med = statistics.median
    print(f"machine: {cpu_model()}, preset {args.preset} {args.dtype}, "
          f"c={c}, {n} output tokens, {args.rounds} rounds (medians)")  # fmt: skip
    print("| workload | output tok/s | ratio |")
    print("|---|---|---|")
    print(f"| unconstrained, mask step off | {med(off):.1f} | 1.00 |")
    print(f"| unconstrained, feature present | {med(on):.1f} | {med(on_ratio):.3f} |")
    print(f"| every request held to a JSON Schema | {med(guided):.1f} | {med(guided_ratio):.3f} |")
    print(f"per-round ratios, feature present / off: {' '.join(f'{x:.3f}' for x in on_ratio)}")
    print(
        f"mean mask fill per step ({c} rows, on the worker, overlapped with the forward): {med(steps):.2f} ms"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
