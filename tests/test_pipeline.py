"""The generation pipeline's rules, in process: the real app (middleware, routes, adapters,
pipeline) over a fake engine (tests/fake_engine.py), driven through raw ASGI calls.

Covered: the order of events and chunks, finish reasons, usage, every failure before the first
byte (a status) and after it (an error event, then [DONE]), abort on disconnect and on a stop
string, the drain, the output-limit rule, the JSON nesting limit, and stream == non-stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest
from fake_engine import FakeEngine, Reply, call

from engine.types import (
    EngineDeadError,
    EngineFailure,
    FailureKind,
    InvalidRequestError,
    PromptTooLongError,
    QueueFullError,
)
from server.app import create_app
from server.json_depth import MAX_JSON_DEPTH, json_depth
from server.settings import ServerSettings

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
TOOL_CALL = (
    "<|channel|>analysis<|message|>Need the tool.<|end|><|start|>assistant to=functions.get_weather"
    '<|channel|>commentary <|constrain|>json<|message|>{"city": "Paris"}<|call|>'
)
ANSWER = "<|channel|>analysis<|message|>Think.<|end|><|start|>assistant<|channel|>final<|message|>Hello there!<|return|>"


def chat(text: str = "hi", **kw: object) -> dict:
    return {"messages": [{"role": "user", "content": text}], **kw}


@contextlib.asynccontextmanager
async def serving(engine: FakeEngine, **settings: object) -> AsyncIterator[object]:
    app = create_app(replace(ServerSettings(), **settings), engine=engine)
    async with app.router.lifespan_context(app):
        state = app.state.server
        for _ in range(600):
            if state.ready or state.load_error:
                break
            await asyncio.sleep(0.01)
        assert state.ready, state.load_error
        yield app


def run(engine: FakeEngine, body: dict, path: str = "/v1/chat/completions", **kw: object):
    async def main():
        async with serving(engine) as app:
            return await call(app, "POST", path, body, **kw)

    return asyncio.run(main())


def chunks(answer) -> list[dict]:
    payloads = answer.sse()
    assert payloads[-1] == "[DONE]", payloads[-3:]
    return [json.loads(p) for p in payloads[:-1]]


# -- order, finish, usage ------------------------------------------------------------------------


def test_stream_order_per_choice_and_usage_last():
    engine = FakeEngine(reply=lambda p, s: Reply(TOOL_CALL if s.seed == 7 else ANSWER))
    body = chat(tools=[WEATHER], n=3, seed=6, stream=True, stream_options={"include_usage": True})
    events = chunks(run(engine, body))
    assert all(c["object"] == "chat.completion.chunk" and "usage" in c for c in events)
    *per_choice, usage = events
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] > 0
    assert all(c["usage"] is None for c in per_choice)
    for i in range(3):
        mine = [c["choices"][0] for c in per_choice if c["choices"][0]["index"] == i]
        assert mine[0]["delta"] == {"role": "assistant"}
        assert [m["finish_reason"] for m in mine] == [None] * (len(mine) - 1) + [mine[-1]["finish_reason"]]
        assert mine[-1]["delta"] == {}
    finishes = {c["choices"][0]["index"]: c["choices"][0]["finish_reason"] for c in per_choice}
    assert finishes == {0: "stop", 1: "tool_calls", 2: "stop"}  # seeds 6, 7, 8


def test_non_stream_is_the_fold_of_the_stream():
    for text in (
        ANSWER,
        TOOL_CALL,
        "<|channel|>final<|message|>a<|end|><|start|>assistant<|channel|>final<|message|>b",
    ):
        for n in (1, 2):
            engine = FakeEngine(reply=lambda p, s, text=text: Reply(text))
            body = chat(tools=[WEATHER], n=n, max_tokens=40)
            whole = run(engine, body).json()
            streamed = chunks(run(engine, {**body, "stream": True}))
            for i in range(n):
                deltas = [c["choices"][0]["delta"] for c in streamed if c["choices"][0]["index"] == i]
                message = whole["choices"][i]["message"]
                assert "".join(d.get("content", "") for d in deltas) == (message["content"] or "")
                assert "".join(d.get("reasoning", "") for d in deltas) == (message["reasoning"] or "")
                args = "".join(tc["function"]["arguments"] for d in deltas for tc in d.get("tool_calls", []))
                assert args == "".join(tc["function"]["arguments"] for tc in message["tool_calls"] or [])
                assert [c["choices"][0]["finish_reason"] for c in streamed if c["choices"][0]["index"] == i][
                    -1
                ] == whole["choices"][i]["finish_reason"]


def test_finish_reasons_and_usage():
    r = run(FakeEngine(reply=lambda p, s: Reply(ANSWER)), chat(n=2)).json()
    assert [c["finish_reason"] for c in r["choices"]] == ["stop", "stop"]
    usage = r["usage"]
    prompt_len = usage["prompt_tokens"]
    assert prompt_len > 0 and usage["total_tokens"] == prompt_len + usage["completion_tokens"]
    assert usage["completion_tokens_details"]["reasoning_tokens"] == 2 * 3  # "Think" "." <|end|>, per choice
    r = run(FakeEngine(reply=lambda p, s: Reply(ANSWER)), chat(max_tokens=3)).json()
    assert r["choices"][0]["finish_reason"] == "length" and r["usage"]["completion_tokens"] == 3
    r = run(FakeEngine(reply=lambda p, s: Reply(TOOL_CALL)), chat(tools=[WEATHER])).json()
    assert r["choices"][0]["finish_reason"] == "tool_calls"
    assert r["choices"][0]["message"]["content"] is None
    # Completions: each prompt's tokens once, every choice's output.
    r = run(FakeEngine(), {"prompt": [[1, 2, 3], [4, 5]], "n": 2, "max_tokens": 2}, "/v1/completions").json()
    assert r["usage"]["prompt_tokens"] == 5 and r["usage"]["completion_tokens"] == 8
    assert [c["index"] for c in r["choices"]] == [0, 1, 2, 3]


def test_a_stop_string_ends_the_choice_and_aborts_its_engine_request():
    engine = FakeEngine(
        reply=lambda p, s: Reply("<|channel|>final<|message|>one two STOP three four five", delay=0.001)
    )
    r = run(engine, chat(stop=["STOP"], max_tokens=100)).json()
    assert r["choices"][0]["message"]["content"] == "one two "
    assert r["choices"][0]["finish_reason"] == "stop"
    assert list(engine.aborted) == list(engine.requests)


# -- failures before the first byte ---------------------------------------------------------------

REFUSALS = [
    (PromptTooLongError("too long"), 400, "context_length_exceeded"),
    (InvalidRequestError("bad"), 400, None),
    (QueueFullError("full"), 429, "queue_full"),
    (EngineDeadError("dead"), 503, "engine_dead"),
]


@pytest.mark.parametrize(("refusal", "status", "code"), REFUSALS)
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_a_refusal_is_a_status_before_anything_streams(refusal, status, code, stream, path):
    body = chat(stream=stream) if path.endswith("chat/completions") else {"prompt": "hi", "stream": stream}
    answer = run(FakeEngine(refuse=refusal), body, path)
    assert answer.status == status
    error = answer.json()["error"]
    assert error["code"] == code and error["message"]
    if status in (429, 503):
        assert int(answer.headers["retry-after"]) > 0


# -- failures after the first byte -----------------------------------------------------------------

FAILURES = [
    (FailureKind.STEP_FAILED, 500, None),
    (FailureKind.ENGINE_DEAD, 503, "engine_dead"),
    (FailureKind.QUEUE_FULL, 429, "queue_full"),
    (FailureKind.SHUTDOWN, 503, "draining"),
]


@pytest.mark.parametrize(("kind", "status", "code"), FAILURES)
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_a_failure_mid_stream_is_an_error_event_then_done(kind, status, code, path):
    reply = Reply(ANSWER, fail_after=4, failure=EngineFailure(kind, "boom"))
    body = chat(stream=True) if path.endswith("chat/completions") else {"prompt": "hi", "stream": True}
    answer = run(FakeEngine(reply=lambda p, s: reply), body, path)
    assert answer.status == 200
    payloads = answer.sse()
    assert payloads[-1] == "[DONE]"
    error = json.loads(payloads[-2])["error"]
    assert error["code"] == code
    if status == 500:  # a fault: the client gets the request id, not the internals
        assert "boom" not in error["message"] and "request id" in error["message"]
    assert error["type"] == {500: "server_error", 503: "service_unavailable", 429: "rate_limit_error"}[status]
    # Non-streaming, the same failure is the HTTP status.
    answer = run(FakeEngine(reply=lambda p, s: reply), {**body, "stream": False}, path)
    assert answer.status == status and answer.json()["error"]["code"] == code


# -- disconnect and drain --------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_leaves_aborts_its_generation(stream):
    engine = FakeEngine(
        reply=lambda p, s: Reply("<|channel|>final<|message|>tick ", delay=0.01), max_model_len=50_000
    )
    kw = {"disconnect_after_frames": 3} if stream else {"disconnect_after_seconds": 0.2}
    run(engine, chat(n=2, max_tokens=10_000, stream=stream), **kw)
    assert len(engine.requests) == 2 and sorted(engine.aborted) == sorted(engine.requests)


def test_drain_timeout_aborts_streams_with_an_error_event_and_refuses_new_work():
    engine = FakeEngine(
        reply=lambda p, s: Reply("<|channel|>final<|message|>tick ", delay=0.01), max_model_len=50_000
    )

    async def main():
        async with serving(engine) as app:
            state = app.state.server
            stream = asyncio.create_task(
                call(app, "POST", "/v1/chat/completions", chat(stream=True, max_tokens=10_000))
            )
            while not engine.requests:
                await asyncio.sleep(0.01)
            await state.drain.drain(timeout=0.1)  # nothing finishes in time: aborted
            refused = await call(app, "POST", "/v1/chat/completions", chat())
            return await stream, refused

    answer, refused = asyncio.run(main())
    payloads = answer.sse()
    assert payloads[-1] == "[DONE]" and json.loads(payloads[-2])["error"]["code"] == "draining"
    assert refused.status == 503 and refused.json()["error"]["code"] == "draining"
    assert engine.aborted == list(engine.requests)


# -- the output limit -------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_an_output_limit_beyond_the_context_is_a_400_naming_it(field):
    engine = FakeEngine(max_model_len=300)
    prompt_len = run(engine, chat()).json()["usage"]["prompt_tokens"]
    room = 300 - prompt_len
    assert run(FakeEngine(max_model_len=300), chat(**{field: room})).status == 200
    answer = run(FakeEngine(max_model_len=300), chat(**{field: room + 1}))
    assert answer.status == 400
    error = answer.json()["error"]
    assert error["param"] == field and error["code"] == "context_length_exceeded"
    assert "maximum context length is 300 tokens" in error["message"]
    assert f"{prompt_len} in the messages, {room + 1} in the completion" in error["message"]


def test_completions_limit_beyond_the_context_is_a_400():
    answer = run(FakeEngine(max_model_len=50), {"prompt": [1] * 10, "max_tokens": 41}, "/v1/completions")
    assert answer.status == 400 and answer.json()["error"]["param"] == "max_tokens"
    assert (
        run(FakeEngine(max_model_len=50), {"prompt": [1] * 10, "max_tokens": 40}, "/v1/completions").status
        == 200
    )


def test_without_a_limit_a_request_gets_the_room_capped_by_the_setting():
    async def main(max_output_tokens: int, max_model_len: int) -> int:
        engine = FakeEngine(
            max_model_len=max_model_len, reply=lambda p, s: Reply("<|channel|>final<|message|>x")
        )
        async with serving(engine, max_output_tokens=max_output_tokens) as app:
            r = (await call(app, "POST", "/v1/chat/completions", chat())).json()
        ((prompt, params),) = engine.requests.values()
        assert r["usage"]["completion_tokens"] == params.max_tokens
        return params.max_tokens, max_model_len - len(prompt)

    limit, room = asyncio.run(main(max_output_tokens=20, max_model_len=500))
    assert limit == 20
    limit, room = asyncio.run(main(max_output_tokens=10_000, max_model_len=500))
    assert limit == room


# -- JSON nesting ----------------------------------------------------------------------------------

JSON_ROUTES = ["/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize"]


def nested(depth: int, where: str) -> bytes:
    """A body about ``depth`` levels deep at its deepest, through a tool's JSON Schema or an
    unknown field (built as text: json.dumps itself would recurse too deep)."""
    if where == "schema":  # each schema level nests two JSON levels ("properties", then "x")
        levels = max(0, depth - 5) // 2
        deep = '{"type":"object","properties":{"x":' * levels + '{"type":"string"}' + "}}" * levels
        body = chat(tools=[{"type": "function", "function": {"name": "f", "parameters": "DEEP"}}])
    else:
        deep = "[" * (depth - 2) + "1" + "]" * (depth - 2)
        body = {**chat(), "prompt": "hi", "tokens": [1], "extra": "DEEP"}
    return json.dumps(body).replace('"DEEP"', deep).encode()


@pytest.mark.parametrize("route", JSON_ROUTES)
@pytest.mark.parametrize("where", ["schema", "unknown"])
def test_any_nesting_is_answered_and_beyond_the_limit_is_a_400(route, where):
    async def main():
        async with serving(FakeEngine()) as app:
            answers = {}
            for target in (
                MAX_JSON_DEPTH - 2,
                MAX_JSON_DEPTH - 1,
                MAX_JSON_DEPTH,
                MAX_JSON_DEPTH + 1,
                300,
                5000,
            ):
                body = nested(target, where)
                answers[json_depth(body)] = await call(app, "POST", route, raw=body)
            return answers

    answers = asyncio.run(main())
    assert min(answers) <= MAX_JSON_DEPTH < min(d for d in answers if d > MAX_JSON_DEPTH)
    for depth, answer in answers.items():
        assert answer.status < 500, (depth, answer.body[:300])
        if depth > MAX_JSON_DEPTH:
            assert answer.status == 400 and answer.json()["error"]["code"] == "json_too_deep", depth
        else:
            assert answer.status in (200, 400), depth
            assert answer.json().get("error", {}).get("code") != "json_too_deep"


# -- the Responses adapter on the same pipeline ------------------------------------------------------


def response_events(answer) -> list[dict]:
    frames = [f for f in answer.body.decode().split("\n\n") if f]
    return [json.loads(f.split("\n")[1].removeprefix("data: ")) for f in frames]


@pytest.mark.parametrize(("kind", "status", "code"), FAILURES)
def test_a_responses_failure_mid_stream_is_response_failed(kind, status, code):
    reply = Reply(ANSWER, fail_after=4, failure=EngineFailure(kind, "boom"))
    answer = run(FakeEngine(reply=lambda p, s: reply), {"input": "hi", "stream": True}, "/v1/responses")
    events = response_events(answer)
    assert answer.status == 200 and [e["sequence_number"] for e in events] == list(range(len(events)))
    assert [e["type"] for e in events].count("response.failed") == 1 and events[-1][
        "type"
    ] == "response.failed"
    assert events[-1]["response"]["status"] == "failed" and events[-1]["response"]["error"]["code"]
    opened = [e["item"]["id"] for e in events if e["type"] == "response.output_item.added"]
    closed = [e["item"]["id"] for e in events if e["type"] == "response.output_item.done"]
    assert opened == closed  # no item is left open
    answer = run(FakeEngine(reply=lambda p, s: reply), {"input": "hi"}, "/v1/responses")
    assert answer.status == status and answer.json()["error"]["code"] == code


def test_a_responses_client_that_leaves_aborts_and_nothing_is_stored():
    engine = FakeEngine(
        reply=lambda p, s: Reply("<|channel|>final<|message|>tick ", delay=0.01), max_model_len=50_000
    )

    async def main():
        async with serving(engine) as app:
            body = {"input": "hi", "stream": True, "max_output_tokens": 10_000}
            await call(app, "POST", "/v1/responses", body, disconnect_after_frames=4)
            return await app.state.server.response_store.stats()

    stats = asyncio.run(main())
    assert engine.aborted == list(engine.requests) and stats.entries == 0
