"""Model-level benchmark: load time, resident memory, prefill and decode tokens/s at batch 1.

    python bench/model_bench.py --presets small,20b --workdir /tmp/gptoss-bench

Checkpoints are random (``python -m model make-checkpoint``), written under --workdir
(never in the repo) and reused across runs. Every measurement runs in a fresh child
process so that its resident memory (peak RSS) is its own. For the ``small`` preset the same
checkpoint is also run through transformers' GptOssForCausalLM (MXFP4 dequantized at load,
bf16); transformers cannot hold the 20b (42 GB in bf16) in this machine's memory.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _rss_gb() -> tuple[float, float]:
    """(current RSS, peak RSS) of this process in GB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    with open("/proc/self/statm") as f:
        current = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9
    return current, peak


def _prompt(n: int, vocab: int) -> list[int]:
    import random

    rng = random.Random(0)
    return [rng.randrange(min(vocab, 199998)) for _ in range(n)]


def _summary(impl: str, load_s: float, rss_loaded: float, prompt_len: int, prefills: list[float],
             steps: list[float], tokens: list[int]) -> dict:  # fmt: skip
    """The machine is shared: report the best prefill and the median decode step."""
    rss, peak = _rss_gb()
    return {
        "impl": impl,
        "load_s": load_s,
        "rss_after_load_gb": rss_loaded,
        "rss_gb": rss,
        "peak_rss_gb": peak,
        "prefill_tok_s": prompt_len / min(prefills),
        "decode_tok_s": 1.0 / statistics.median(steps),
        "tokens": tokens,
    }


def child_ours(model_dir: Path, prompt_len: int, decode: int, repeats: int, dequantize: bool) -> dict:
    import torch

    from model.generate import greedy_generate
    from model.loader import load_model

    t0 = time.perf_counter()
    model = load_model(model_dir, dtype=torch.bfloat16, dequantize_experts=dequantize, progress=False)
    load_s = time.perf_counter() - t0
    rss_loaded, _ = _rss_gb()
    prompt = _prompt(prompt_len, model.config.vocab_size)
    greedy_generate(model, prompt[:8], 2, return_prefill_logits=False)  # warm-up
    prefills: list[float] = []
    steps: list[float] = []
    for _ in range(repeats):
        times: list[float] = []
        last = [time.perf_counter()]

        def on_step(step: int, logits, times=times, last=last) -> None:
            now = time.perf_counter()
            times.append(now - last[0])
            last[0] = now

        # on_step(i) fires once the distribution of token i exists: step 0 ends the prefill.
        tokens, _ = greedy_generate(model, prompt, decode + 1, return_prefill_logits=False, on_step=on_step)
        prefills.append(times[0])
        steps += times[1:]
    impl = "ours (packed MXFP4)" if not dequantize else "ours (experts dequantized at load)"
    return _summary(impl, load_s, rss_loaded, prompt_len, prefills, steps, tokens)


def child_transformers(model_dir: Path, prompt_len: int, decode: int, repeats: int) -> dict:
    import torch
    from transformers import GptOssForCausalLM, Mxfp4Config

    t0 = time.perf_counter()
    model = GptOssForCausalLM.from_pretrained(
        model_dir, dtype=torch.bfloat16, quantization_config=Mxfp4Config(dequantize=True),
        attn_implementation="eager",
    )  # fmt: skip
    model.eval()
    load_s = time.perf_counter() - t0
    rss_loaded, _ = _rss_gb()
    prompt = torch.tensor([_prompt(prompt_len, model.config.vocab_size)])
    prefills: list[float] = []
    steps: list[float] = []
    with torch.no_grad():
        model(prompt[:, :8])  # warm-up
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = model(prompt, use_cache=True)
            prefills.append(time.perf_counter() - t0)
            cache = out.past_key_values
            token = out.logits[0, -1].argmax()
            tokens = [int(token)]
            for _ in range(decode):
                t0 = time.perf_counter()
                out = model(token.view(1, 1), past_key_values=cache, use_cache=True)
                cache = out.past_key_values
                token = out.logits[0, -1].argmax()
                tokens.append(int(token))
                steps.append(time.perf_counter() - t0)
    return _summary(
        "transformers (bf16, dequantized)", load_s, rss_loaded, prompt_len, prefills, steps, tokens
    )


def run_child(kind: str, model_dir: Path, prompt_len: int, decode: int, repeats: int, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--model", str(model_dir),
           "--prompt-len", str(prompt_len), "--decode-tokens", str(decode), "--repeats", str(repeats), "--threads", str(threads)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        return {"impl": kind, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ensure_checkpoint(workdir: Path, preset: str) -> tuple[Path, float | None]:
    path = workdir / f"{preset}-hf-seed0"
    if (path / "config.json").is_file() and (path / ".complete").is_file():
        return path, None
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run(
        [sys.executable, "-m", "model", "make-checkpoint", "--preset", preset, "--seed", "0", "--out", str(path)],
        check=True, env=env,
    )  # fmt: skip
    (path / ".complete").write_text("ok")
    return path, time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="small", help="comma-separated: small,20b")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/gptoss-bench"))
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--decode-tokens-20b", type=int, default=4)
    p.add_argument("--prompt-len-20b", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="prefill+decode runs per model (not for 20b: 1)")
    p.add_argument("--threads", type=int, default=0, help="torch threads in the children (0 = default)")
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--child", choices=["ours", "ours-dequant", "transformers"])
    p.add_argument("--model", type=Path)
    args = p.parse_args()

    if args.child:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        if args.child == "transformers":
            result = child_transformers(args.model, args.prompt_len, args.decode_tokens, args.repeats)
        else:
            result = child_ours(
                args.model, args.prompt_len, args.decode_tokens, args.repeats, args.child == "ours-dequant"
            )
        print(json.dumps(result))
        return 0

    import torch

    args.workdir.mkdir(parents=True, exist_ok=True)
    print(f"# machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__} threads {torch.get_num_threads()}, python {platform.python_version()}")  # fmt: skip
    header = "| preset | implementation | load s | RSS GB (after load / peak) | prompt, decoded | prefill tok/s | decode tok/s |"
    rows = []
    for preset in args.presets.split(","):
        path, made_s = ensure_checkpoint(args.workdir, preset)
        size_gb = sum(f.stat().st_size for f in path.glob("*.safetensors")) / 1e9
        print(f"# {preset}: {path} ({size_gb:.2f} GB)" + (f", written in {made_s:.0f}s" if made_s else ""))
        decode = args.decode_tokens if preset != "20b" else args.decode_tokens_20b
        prompt_len = args.prompt_len if preset != "20b" else args.prompt_len_20b
        kinds = ["ours"]
        if preset != "20b":
            kinds += ["ours-dequant"] + ([] if args.skip_transformers else ["transformers"])
        repeats = args.repeats if preset != "20b" else 1
        results = [run_child(kind, path, prompt_len, decode, repeats, args.threads) for kind in kinds]
        for r in results:
            if "error" in r:
                rows.append(f"| {preset} | {r['impl']} | error: {r['error']} | | | | |")
                continue
            rows.append(
                f"| {preset} | {r['impl']} | {r['load_s']:.1f} | {r['rss_after_load_gb']:.2f} / {r['peak_rss_gb']:.2f} "
                f"| {prompt_len}, {decode} | {r['prefill_tok_s']:.1f} | {r['decode_tok_s']:.2f} |"
            )
        ok = [r for r in results if "tokens" in r]
        if len(ok) > 1:
            same = all(r["tokens"][:4] == ok[0]["tokens"][:4] for r in ok)
            print(f"# {preset}: first 4 greedy tokens agree across implementations (bf16): {same}")
    print(header)
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
