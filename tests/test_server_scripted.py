"""Exact reasoning / tool-call / stop-string output through the real server, engine and model.

Random weights rarely write valid Harmony, so the server runs with scripted sampling
(``tests/scripted_server.py``): the engine still schedules, the model still runs, only the
sampler's choice is replaced. Everything downstream (parser, mapping, SSE, SDK) is real.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_process import ServerProcess

API_KEY = "test-key-123"
MODEL = "gpt-oss-test"

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME_TOOL = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
}

SCRIPT = {
    "rules": [
        # Rules are tried in order against the prompt after the last user message.
        {
            "match": "TOOLRESULT:sunny",
            "output": "<|channel|>analysis<|message|>The tool says sunny.<|end|>"
            "<|start|>assistant<|channel|>final<|message|>It is sunny in Paris.<|return|>",
        },
        {
            "match": "SCRIPT:weather",
            "output": "<|channel|>analysis<|message|>User wants the weather. Call the tool.<|end|>"
            "<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json"
            '<|message|>{"city": "Paris"}<|call|>',
        },
        {
            "match": "SCRIPT:two_calls",
            "output": "<|channel|>commentary<|message|>Checking both.<|end|>"
            "<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json"
            '<|message|>{"city": "Oslo"}<|call|>',
        },
        {
            "match": "SCRIPT:stop",
            "output": "<|channel|>analysis<|message|>Say it.<|end|>"
            "<|start|>assistant<|channel|>final<|message|>Hello world. STOP never shown<|return|>",
        },
        {
            "match": "SCRIPT:specials",
            "output": "<|channel|>final<|message|>A<|reserved_200013|>B<|constrain|>C<|endoftext|>D<|return|>",
        },
        {"match": "SCRIPT:unicode", "output": "<|channel|>final<|message|>naïve café 東京 🚀<|return|>"},
        {
            "match": "SCRIPT:slow",
            "output": "<|channel|>final<|message|>tick ",
            "repeat": True,
            "delay_seconds": 0.02,
        },
    ],
    "default": "<|channel|>analysis<|message|>Thinking.<|end|>"
    "<|start|>assistant<|channel|>final<|message|>Hello!<|return|>",
}


@pytest.fixture(scope="module")
def server(tiny_checkpoint_dir, tmp_path_factory):
    script = tmp_path_factory.mktemp("script") / "script.json"
    script.write_text(json.dumps(SCRIPT))
    args = [
        "--model", str(tiny_checkpoint_dir),
        "--api-key", API_KEY,
        "--served-model-name", MODEL,
        "--max-num-seqs", "2",
        "--max-waiting", "2",
        "--kv-cache-memory", "64MiB",
        "--max-model-len", "2048",
    ]  # fmt: skip
    with ServerProcess(args, api_key=API_KEY, script=script) as srv:
        yield srv


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=30)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_reasoning_and_content_non_streaming(client, server):
    r = client.chat.completions.create(model=MODEL, messages=user("hello"), reasoning_effort="high")
    choice = r.choices[0]
    assert choice.message.content == "Hello!"
    assert choice.message.reasoning == "Thinking."
    assert choice.message.model_extra["reasoning_content"] == "Thinking."
    assert choice.finish_reason == "stop"
    assert choice.message.tool_calls is None
    # "Thinking" "." "<|end|>" are analysis tokens; headers are not.
    assert r.usage.completion_tokens_details.reasoning_tokens == 3
    scripted = httpx.post(
        server.url + "/tokenize", json={"prompt": SCRIPT["default"]}, headers=server.headers
    )
    assert r.usage.completion_tokens == scripted.json()["count"]


def test_tool_call_non_streaming_then_tool_result_turn(client):
    messages = user("SCRIPT:weather what's the weather in Paris?")
    r = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL])
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.reasoning == "User wants the weather. Call the tool."
    assert not choice.message.content
    (call,) = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function"
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}

    # Second turn: the assistant message (with reasoning) and the tool result go back in.
    messages += [
        {
            "role": "assistant",
            "content": None,
            "reasoning": choice.message.reasoning,
            "tool_calls": [call.model_dump()],
        },
        {"role": "tool", "tool_call_id": call.id, "content": "TOOLRESULT:sunny 21C"},
    ]
    r2 = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL])
    assert r2.choices[0].message.content == "It is sunny in Paris."
    assert r2.choices[0].message.reasoning == "The tool says sunny."
    assert r2.choices[0].finish_reason == "stop"


def test_tool_call_streaming_sdk(client):
    stream = client.chat.completions.create(
        model=MODEL,
        messages=user("SCRIPT:weather"),
        tools=[WEATHER_TOOL],
        stream=True,
        stream_options={"include_usage": True},
    )
    reasoning, content, finish, usage = "", "", None, None
    calls: dict[int, dict] = {}
    first_delta_role = None
    content_deltas: list[str] = []
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
            assert chunk.choices == []
            continue
        (c,) = chunk.choices
        if first_delta_role is None:
            first_delta_role = c.delta.role
        reasoning += getattr(c.delta, "reasoning", None) or ""
        content += c.delta.content or ""
        if c.delta.content is not None:
            content_deltas.append(c.delta.content)
        for tc in c.delta.tool_calls or []:
            entry = calls.setdefault(tc.index, {"id": None, "name": None, "arguments": ""})
            if tc.id:
                assert entry["id"] is None, "the id comes once, on the first chunk of a call"
                entry["id"], entry["name"] = tc.id, tc.function.name
            entry["arguments"] += tc.function.arguments or ""
        finish = c.finish_reason or finish
    assert first_delta_role == "assistant"
    assert "" not in content_deltas, "no empty content delta in a tool-call stream"
    assert reasoning == "User wants the weather. Call the tool."
    assert content == ""
    assert finish == "tool_calls"
    assert list(calls) == [0]
    assert calls[0]["id"].startswith("call_") and calls[0]["name"] == "get_weather"
    assert json.loads(calls[0]["arguments"]) == {"city": "Paris"}
    assert usage is not None and usage.completion_tokens_details.reasoning_tokens > 0


def test_preamble_then_call(client):
    """<|call|> is a stop token: a turn holds at most one call; a preamble before it is content."""
    r = client.chat.completions.create(
        model=MODEL, messages=user("SCRIPT:two_calls"), tools=[WEATHER_TOOL, TIME_TOOL]
    )
    m = r.choices[0].message
    assert m.content == "Checking both."
    (call,) = m.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Oslo"}
    assert r.choices[0].finish_reason == "tool_calls"


def test_stream_equals_non_stream_raw_sse(server):
    body = {"messages": user("SCRIPT:two_calls"), "tools": [WEATHER_TOOL, TIME_TOOL], "stream": True}
    with httpx.stream(
        "POST", server.url + "/v1/chat/completions", json=body, headers=server.headers, timeout=30
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-request-id"]
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: ") and "\n" not in e for e in events[:-1])
    chunks = [json.loads(e[len("data: ") :]) for e in events[:-2]]
    assert {c["id"] for c in chunks} == {chunks[0]["id"]}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0] == {"role": "assistant"}  # no `content` key where there is no content
    assert all(d.get("content", None) != "" for d in deltas)
    calls = [tc for d in deltas for tc in d.get("tool_calls", [])]
    assert calls[0]["id"].startswith("call_") and calls[0]["function"]["name"] == "get_weather"
    assert all("id" not in tc and tc["index"] == 0 for tc in calls[1:])
    arguments = "".join(tc["function"]["arguments"] for tc in calls)
    assert json.loads(arguments) == {"city": "Oslo"}
    assert "".join(d.get("content", "") for d in deltas) == "Checking both."
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + ["tool_calls"]


def test_stop_string_truncates_final_channel(client):
    r = client.chat.completions.create(model=MODEL, messages=user("SCRIPT:stop"), stop=["STOP"])
    assert r.choices[0].message.content == "Hello world. "
    assert r.choices[0].message.reasoning == "Say it."
    assert r.choices[0].finish_reason == "stop"
    stream = client.chat.completions.create(
        model=MODEL, messages=user("SCRIPT:stop"), stop="STOP", stream=True
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Hello world. "
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_special_tokens_never_reach_content(client):
    r = client.chat.completions.create(model=MODEL, messages=user("SCRIPT:specials"))
    assert r.choices[0].message.content == "ABCD"
    r = client.chat.completions.create(model=MODEL, messages=user("SCRIPT:unicode"), stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in r if c.choices) == "naïve café 東京 🚀"


def test_async_sdk_concurrent_streams(server):
    async def main():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)

        async def one():
            stream = await client.chat.completions.create(
                model=MODEL, messages=user("SCRIPT:weather"), tools=[WEATHER_TOOL], stream=True
            )
            args = ""
            async for chunk in stream:
                for tc in chunk.choices[0].delta.tool_calls or [] if chunk.choices else []:
                    args += tc.function.arguments or ""
            return args

        results = await asyncio.gather(*(one() for _ in range(2)))
        r = await client.chat.completions.create(model=MODEL, messages=user("hi"), n=2)
        await client.close()
        return results, r

    results, r = asyncio.run(main())
    assert [json.loads(a) for a in results] == [{"city": "Paris"}] * 2
    assert [c.message.content for c in r.choices] == ["Hello!", "Hello!"]
    assert [c.index for c in r.choices] == [0, 1]


def test_auth(server):
    url = server.url
    r = httpx.get(url + "/v1/models")
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "invalid_api_key"
    assert "x-request-id" in r.headers
    assert httpx.get(url + "/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(url + "/v1/models", headers={"Authorization": API_KEY}).status_code == 401
    assert httpx.get(url + "/v1/models", headers=server.headers).status_code == 200
    for probe in ("/health", "/ready", "/metrics"):
        assert httpx.get(url + probe).status_code == 200, probe
    bad = openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    # Refused before routing, still counted under the route they asked for (bounded labels:
    # a path no route serves is "unmatched").
    assert httpx.get(url + "/v1/models/some-model").status_code == 401
    assert httpx.post(url + "/v1/nothing-here", json={}).status_code == 401
    counts = {
        (s.labels["endpoint"], s.labels["status"]): s.value
        for family in text_string_to_metric_families(httpx.get(url + "/metrics").text)
        if family.name == "gptoss_requests"
        for s in family.samples
        if s.name == "gptoss_requests_total"
    }
    assert counts[("/v1/models", "401")] >= 4
    assert counts[("/v1/models/{model_id:path}", "401")] >= 1
    assert counts[("unmatched", "401")] >= 1


def test_queue_full_is_429_with_retry_after(server):
    """--max-num-seqs 2 --max-waiting 2: once 2 run and 2 wait, the next request is refused.
    The streams last ~20 s (1000 slow tokens), so a slow machine cannot see them finish before
    all six are opened; closing them aborts them."""

    async def main():
        async with httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=30) as c:
            body = {"messages": user("SCRIPT:slow"), "max_tokens": 1000, "stream": True}
            opened, refused = [], None
            for _ in range(6):
                stream = c.stream("POST", "/v1/chat/completions", json=body)
                response = await stream.__aenter__()
                if response.status_code != 200:
                    refused = (
                        response.status_code,
                        dict(response.headers),
                        json.loads(await response.aread()),
                    )
                    await stream.__aexit__(None, None, None)
                    break
                opened.append(stream)
            for stream in opened:
                await stream.__aexit__(None, None, None)
            return len(opened), refused

    accepted, refused = asyncio.run(main())
    server.wait_engine_idle()  # the closed streams give their slots back
    assert 2 <= accepted <= 4
    assert refused is not None
    status, headers, body = refused
    assert status == 429
    assert headers["retry-after"] == "1"
    assert body["error"]["type"] == "rate_limit_error" and body["error"]["code"] == "queue_full"


def test_no_prompt_or_completion_text_in_logs(server, client):
    client.chat.completions.create(
        model=MODEL, messages=user("SCRIPT:weather secret-prompt-words"), tools=[WEATHER_TOOL]
    )
    # The access line is written once the response is sent: the client may read first.
    deadline = time.monotonic() + 10
    while "POST /v1/chat/completions 200" not in (log := server.log()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "POST /v1/chat/completions 200" in log
    for text in ("secret-prompt-words", "User wants the weather", "Paris", API_KEY):
        assert text not in log


def test_sdk_stream_helper_sees_no_empty_content_in_a_tool_call(client):
    """The SDK's stream helper reports every `content` key as a content delta: a tool-call turn
    must send none (the role chunk carries no `content: ""`)."""
    with client.chat.completions.stream(
        model=MODEL, messages=user("SCRIPT:weather"), tools=[WEATHER_TOOL]
    ) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_completion()
    assert "content.delta" not in kinds
    assert "tool_calls.function.arguments.done" in kinds
    (call,) = final.choices[0].message.tool_calls
    assert json.loads(call.function.arguments) == {"city": "Paris"}
