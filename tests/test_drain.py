"""Graceful drain on SIGTERM (issue 6): the real server as a subprocess, long scripted streams.

The scripted token source sleeps per token so streams last a predictable time while the real
engine and model run underneath.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time

import httpx
import pytest
from server_process import ServerProcess

SCRIPT = {"rules": [], "default": "<|channel|>final<|message|>" + "tick " * 4000, "delay_seconds": 0.005}


def start_server(tiny_checkpoint_dir, tmp_path, drain_timeout: float) -> ServerProcess:
    script = tmp_path / "script.json"
    script.write_text(json.dumps(SCRIPT))
    args = [
        "--model", str(tiny_checkpoint_dir),
        "--drain-timeout", str(drain_timeout),
        "--kv-cache-memory", "64MiB",
        "--max-model-len", "4096",
    ]  # fmt: skip
    return ServerProcess(args, script=script).start()


async def open_stream(client: httpx.AsyncClient, max_tokens: int, started: asyncio.Event, out: list) -> None:
    body = {"messages": [{"role": "user", "content": "count"}], "max_tokens": max_tokens, "stream": True}
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        buffer = ""
        async for text in r.aiter_text():
            buffer += text
            while "\n\n" in buffer:
                event, buffer = buffer.split("\n\n", 1)
                out.append(event)
                if '"content":"tick' in event:
                    started.set()
        assert buffer == "", "the stream ended mid-event"


def parse(events: list[str]) -> tuple[list[dict], list[dict]]:
    assert events and events[-1] == "data: [DONE]", events[-3:]
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    errors = [p["error"] for p in payloads if "error" in p]
    return [p for p in payloads if "error" not in p], errors


async def drive(server: ServerProcess, n: int, max_tokens: int, during_drain) -> tuple[list[list[str]], dict]:
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
        outs: list[list[str]] = [[] for _ in range(n)]
        started = [asyncio.Event() for _ in range(n)]
        tasks = [asyncio.create_task(open_stream(client, max_tokens, started[i], outs[i])) for i in range(n)]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), timeout=30)
        info = await during_drain(client)
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=60)
        return outs, info


def test_sigterm_lets_open_streams_finish_then_exits_0(tiny_checkpoint_dir, tmp_path):
    server = start_server(tiny_checkpoint_dir, tmp_path, drain_timeout=30)
    try:

        async def during_drain(client: httpx.AsyncClient) -> dict:
            signalled = time.monotonic()
            server.signal(signal.SIGTERM)
            ready = None
            while time.monotonic() - signalled < 1.0:
                ready = await client.get("/ready")
                if ready.status_code == 503:
                    break
                await asyncio.sleep(0.02)
            flipped_after = time.monotonic() - signalled
            refused = await client.post(
                "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
            )
            return {
                "ready": ready,
                "flipped_after": flipped_after,
                "refused": refused,
                "signalled": signalled,
            }

        outs, info = asyncio.run(drive(server, n=3, max_tokens=50, during_drain=during_drain))
        assert info["ready"].status_code == 503 and info["flipped_after"] < 1.0
        assert info["refused"].status_code == 503
        assert info["refused"].headers["retry-after"]
        assert info["refused"].json()["error"]["code"] == "draining"
        for events in outs:
            chunks, errors = parse(events)
            assert errors == []
            assert chunks[-1]["choices"][0]["finish_reason"] == "length"
            text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
            assert text.count("tick") == 50 - 3  # the whole stream: 50 tokens, 3 of them the header
        assert server.wait(timeout=30) == 0
    finally:
        server.stop()


@pytest.mark.parametrize("how", ["timeout", "second_sigterm"])
def test_drain_aborts_leftovers_with_an_error_event(tiny_checkpoint_dir, tmp_path, how):
    drain_timeout = 1.0 if how == "timeout" else 60.0
    server = start_server(tiny_checkpoint_dir, tmp_path, drain_timeout=drain_timeout)
    try:

        async def during_drain(client: httpx.AsyncClient) -> dict:
            signalled = time.monotonic()
            server.signal(signal.SIGTERM)
            if how == "second_sigterm":
                await asyncio.sleep(0.3)
                server.signal(signal.SIGTERM)
            return {"signalled": signalled}

        outs, info = asyncio.run(drive(server, n=3, max_tokens=3000, during_drain=during_drain))
        elapsed = time.monotonic() - info["signalled"]
        assert elapsed < (drain_timeout if how == "timeout" else 0.3) + 5
        for events in outs:
            chunks, errors = parse(events)
            assert len(errors) == 1 and errors[0]["code"] == "draining"
            assert events[-2].startswith('data: {"error"')  # the error, then [DONE]
            assert all(c["choices"][0]["finish_reason"] is None for c in chunks if c["choices"])
        assert server.wait(timeout=15) == 0
    finally:
        server.stop()


def test_sigterm_while_the_model_loads_exits_promptly(tiny_checkpoint_dir, tmp_path):
    """A load that does not finish (here: weights behind a FIFO nobody writes, as a hung
    network mount would be) must not keep the process alive after SIGTERM: the pod would
    otherwise sit until the kubelet's SIGKILL. Not ready while loading, exit 0 on SIGTERM."""
    import os

    stuck = tmp_path / "stuck_ckpt"
    stuck.mkdir()
    (stuck / "config.json").write_bytes((tiny_checkpoint_dir / "config.json").read_bytes())
    os.mkfifo(stuck / "model.safetensors")
    server = ServerProcess(["--model", str(stuck)]).start(until="/health")
    try:
        assert httpx.get(server.url + "/health").json()["status"] == "loading"
        assert httpx.get(server.url + "/ready").status_code == 503
        signalled = time.monotonic()
        server.signal(signal.SIGTERM)
        assert server.wait(timeout=20) == 0
        assert time.monotonic() - signalled < 20
    finally:
        server.stop(timeout=5)
