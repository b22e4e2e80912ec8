"""Serving benchmark for any OpenAI-compatible server, through HTTP:

    python bench/serving.py --base-url http://127.0.0.1:8000/v1 [--model M] \\
        [--concurrency 1,4,16] [--prompt-tokens 128] [--max-tokens 128] [--server-pid PID]

Every request is a streamed ``/v1/completions`` whose prompt is a list of token ids, so two
servers given the same checkpoint compute the same work whatever their chat templates (and a
random model's garbage never reaches a chat parser: llama-server answers 500 on chat requests
of a random gpt-oss). ``ignore_eos`` and ``min_tokens`` hold each request to ``--max-tokens``. Prompts come from
a seed, differ per request and per level (no prefix-cache hits across levels), and the same
seed gives every server the same prompts.

At each concurrency level ``c`` exactly ``c`` requests are in flight until ``--requests``
(default 2c, at least 4) have finished. Printed per level: output tok/s over the level's wall
time, time to first token and inter-token latency (p50, p99, in ms), errors. A request whose
connection fails before any answer is sent again (up to twice, as the OpenAI SDKs do), and
the count of such requests printed below the table. With ``--server-pid`` the server's peak
resident memory (VmHWM) is printed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

# Ordinary o200k tokens (below the special-token range, past the byte tokens): any such id
# is a valid prompt token for gpt-oss on every server.
PROMPT_TOKEN_RANGE = (1_000, 199_000)
# A request whose connection fails before any answer (refused, or closed unanswered, which
# llama-server does now and then to a fresh connection) is sent again, as the OpenAI SDKs do
# (two retries by default); its latencies still count from the first attempt.
CONNECT_ATTEMPTS = 3
CONNECT_RETRY_S = 0.05


@dataclass
class RequestResult:
    ttft_s: float | None = None
    gaps_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    error: str | None = None
    retries: int = 0  # attempts whose connection failed before any answer


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


async def sse_lines(resp: httpx.Response) -> AsyncIterator[str]:
    """The stream's lines as SSE defines them (split at LF, CR dropped), not as str.splitlines
    does (httpx's aiter_lines also breaks at U+2028, U+0085..., which a server may leave raw
    inside a JSON string: llama-server does)."""
    buf = b""
    async for data in resp.aiter_bytes():
        buf += data
        *lines, buf = buf.split(b"\n")
        for line in lines:
            yield line.rstrip(b"\r").decode("utf-8", errors="replace")
    if buf:
        yield buf.rstrip(b"\r").decode("utf-8", errors="replace")


async def one_request(
    client: httpx.AsyncClient, url: str, model: str, prompt: list[int], max_tokens: int
) -> RequestResult:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        # As the peer harness (../shared/peer/loadgen.py) sends it too: a server that treats
        # the hold as a logits processor pays for it here as well.
        "min_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    result = RequestResult()
    t0 = last = time.perf_counter()
    chunks = 0
    for attempt in range(CONNECT_ATTEMPTS):
        answered = False
        try:
            async with client.stream("POST", url, json=body) as resp:
                answered = True
                if resp.status_code != 200:
                    result.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                    return result
                async for line in sse_lines(resp):
                    if not line.startswith("data:") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[5:])
                    if event.get("usage"):
                        result.output_tokens = event["usage"].get("completion_tokens", 0)
                    if not any(c.get("text") for c in event.get("choices", [])):
                        continue
                    now = time.perf_counter()
                    if result.ttft_s is None:
                        result.ttft_s = now - t0
                    else:
                        result.gaps_s.append(now - last)
                    last = now
                    chunks += 1
            break
        except (httpx.ConnectError, httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError) as exc:
            if answered or attempt + 1 == CONNECT_ATTEMPTS:
                result.error = f"{type(exc).__name__}: {exc}"
                break
            result.retries += 1
            await asyncio.sleep(CONNECT_RETRY_S)
        except (httpx.HTTPError, json.JSONDecodeError) as exc:
            result.error = f"{type(exc).__name__}: {exc}"
            break
    result.output_tokens = result.output_tokens or chunks
    return result


@dataclass
class LevelResult:
    concurrency: int
    requests: int
    wall_s: float
    results: list[RequestResult]

    def row(self) -> str:
        ok = [r for r in self.results if r.error is None]
        out = sum(r.output_tokens for r in ok)
        ttft = [r.ttft_s * 1e3 for r in ok if r.ttft_s is not None]
        itl = [g * 1e3 for r in ok for g in r.gaps_s]
        return (
            f"| {self.concurrency} | {self.requests} | {out / self.wall_s:.1f} | "
            f"{percentile(ttft, 0.5):.0f} | {percentile(ttft, 0.99):.0f} | "
            f"{percentile(itl, 0.5):.1f} | {percentile(itl, 0.99):.1f} | {len(self.results) - len(ok)} |"
        )


async def run_level(args: argparse.Namespace, concurrency: int, prompts: list[list[int]]) -> LevelResult:
    url = args.base_url.rstrip("/") + "/completions"
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=args.timeout, headers=headers, limits=limits) as client:
        queue = list(prompts)
        results: list[RequestResult] = []

        async def worker() -> None:
            while queue:
                prompt = queue.pop()
                results.append(await one_request(client, url, args.model, prompt, args.max_tokens))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return LevelResult(concurrency, len(prompts), wall, results)


def peak_rss_gib(pid: int) -> float | None:
    status = Path(f"/proc/{pid}/status")
    if not status.exists():
        return None
    for line in status.read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8000/v1")
    ap.add_argument("--model", default=None, help="default: the first of /v1/models")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--concurrency", default="1,4,16", help="comma-separated levels")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--requests", type=int, default=None, help="per level; default 2c, at least 4")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--server-pid", type=int, default=None)
    args = ap.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    rng = random.Random(args.seed)
    lo, hi = PROMPT_TOKEN_RANGE

    def prompts(n: int) -> list[list[int]]:
        return [[rng.randrange(lo, hi) for _ in range(args.prompt_tokens)] for _ in range(n)]

    if args.model is None:
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        models = httpx.get(args.base_url.rstrip("/") + "/models", headers=headers, timeout=args.timeout)
        args.model = models.raise_for_status().json()["data"][0]["id"]
    asyncio.run(run_level(args, 1, prompts(1)))  # warm-up: first-request costs out of the table
    print(
        f"{args.base_url} model={args.model} prompt {args.prompt_tokens} tokens, "
        f"{args.max_tokens} output tokens (ignore_eos), greedy, streamed"
    )
    print(
        "| concurrency | requests | output tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | errors |"
    )
    print("|---|---|---|---|---|---|---|---|")
    errors: list[str] = []
    retried = 0
    for c in levels:
        n = args.requests or max(4, 2 * c)
        level = asyncio.run(run_level(args, c, prompts(n)))
        print(level.row(), flush=True)
        errors += [f"c={c}: {r.error}" for r in level.results if r.error is not None]
        retried += sum(r.retries > 0 for r in level.results)
    for e in errors[:5]:  # what failed, so a count in the table can be told from a bug
        print(f"error: {e}")
    if retried:
        print(f"requests sent again after their connection failed unanswered: {retried}")
    if args.server_pid is not None:
        rss = peak_rss_gib(args.server_pid)
        print(f"server peak RSS (VmHWM): {rss:.2f} GiB" if rss is not None else "server pid not found")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
