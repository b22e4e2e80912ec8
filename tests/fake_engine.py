"""A fake engine for in-process API tests, and a raw ASGI driver to talk to the app.

``FakeEngine`` implements ``engine.types.EngineClient`` without a model: each request's reply
is Harmony (or any) text chosen by a function of the prompt, written one token per output
with the real engine's rules (stop ids end it with "stop", ``max_tokens`` with "length").
A reply can fail after some tokens with an ``EngineFailure``, or ``add_request`` can refuse.
It records what it was asked (requests, aborts), so tests check the pipeline's rules directly.

``call`` drives the ASGI app itself (httpx's ASGI transport buffers streams): it returns the
status, headers and body frames, and can disconnect after some frames, as a client that leaves.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from engine.types import EngineError, EngineFailure, EngineStats, RequestOutput, SamplingParams
from harmony.tokenizer import load_tokenizer


@dataclass
class Reply:
    text: str  # what the "model" writes (special tokens as text)
    fail_after: int | None = None  # tokens written before ``failure`` ends the request
    failure: EngineFailure | None = None
    delay: float = 0.0  # seconds per token


@dataclass
class FakeEngine:
    reply: Callable[[list[int], SamplingParams], Reply] = lambda prompt, params: Reply(
        "<|channel|>final<|message|>OK<|return|>"
    )
    max_model_len: int = 512
    refuse: EngineError | None = None  # raised by add_request
    requests: dict[str, tuple[list[int], SamplingParams]] = field(default_factory=dict)
    aborted: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    alive: bool = False

    # -- EngineClient --------------------------------------------------------------------------
    def start(self) -> None:
        self.alive = True

    def shutdown(self) -> None:
        self.alive = False

    @property
    def is_alive(self) -> bool:
        return self.alive

    weights_bytes = 0
    kv_cache_bytes = 0
    kv_cache_tokens = 0

    def stats(self) -> EngineStats:
        return EngineStats(num_running=len(self.requests) - len(self.finished) - len(self.aborted))

    def add_request(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        if self.refuse is not None:
            raise self.refuse
        self.requests[request_id] = (list(prompt_ids), params)
        return self._outputs(request_id, list(prompt_ids), params, self.reply(list(prompt_ids), params))

    def abort(self, request_id: str) -> None:
        if request_id not in self.aborted:
            self.aborted.append(request_id)

    async def _outputs(
        self, rid: str, prompt: list[int], params: SamplingParams, reply: Reply
    ) -> AsyncIterator[RequestOutput]:
        ids = load_tokenizer().encode_with_specials(reply.text)
        written = 0

        def out(tokens: list[int], **kw: Any) -> RequestOutput:
            return RequestOutput(
                request_id=rid,
                token_ids=tokens,
                num_prompt_tokens=len(prompt),
                num_output_tokens=written,
                logprobs=None,
                **kw,
            )

        try:
            while True:
                await asyncio.sleep(reply.delay)
                if rid in self.aborted:
                    yield out([], finish_reason="abort")
                    return
                if reply.fail_after is not None and written >= reply.fail_after:
                    yield out([], finish_reason="error", error=reply.failure)
                    return
                token = ids[written % len(ids)] if ids else 0
                written += 1
                if token in params.stop_token_ids and not params.ignore_eos:
                    yield out([token], finish_reason="stop", stop_token_id=token)
                    return
                if written >= params.max_tokens:
                    yield out([token], finish_reason="length")
                    return
                yield out([token])
        finally:
            self.finished.append(rid)


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    frames: list[bytes]  # body messages as sent

    @property
    def body(self) -> bytes:
        return b"".join(self.frames)

    def json(self) -> Any:
        return json.loads(self.body)

    def sse(self) -> list[str]:
        """The ``data:`` payloads of an SSE body, in order."""
        return [e[len("data: ") :] for e in self.body.decode().split("\n\n") if e.startswith("data: ")]


async def call(
    app: Any,
    method: str,
    path: str,
    body: Any = None,
    *,
    raw: bytes | None = None,
    headers: dict[str, str] | None = None,
    disconnect_after_frames: int | None = None,
    disconnect_after_seconds: float | None = None,
    timeout: float = 30.0,
) -> Answer:
    data = raw if raw is not None else (b"" if body is None else json.dumps(body).encode())
    hdrs = {"content-type": "application/json", **(headers or {})}
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in hdrs.items()],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }
    gone = asyncio.Event()
    sent_request = False
    answer = Answer(0, {}, [])

    async def receive() -> dict:
        nonlocal sent_request
        if not sent_request:
            sent_request = True
            return {"type": "http.request", "body": data, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            answer.status = message["status"]
            answer.headers = {k.decode().lower(): v.decode() for k, v in message.get("headers", [])}
        elif message["type"] == "http.response.body":
            if message.get("body"):
                answer.frames.append(message["body"])
            if disconnect_after_frames is not None and len(answer.frames) >= disconnect_after_frames:
                gone.set()
            if not message.get("more_body", False):
                gone.set()

    async def leave_later() -> None:
        assert disconnect_after_seconds is not None
        await asyncio.sleep(disconnect_after_seconds)
        gone.set()

    leaving = asyncio.create_task(leave_later()) if disconnect_after_seconds is not None else None
    try:
        await asyncio.wait_for(app(scope, receive, send), timeout)
    finally:
        if leaving is not None:
            leaving.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await leaving
    return answer
