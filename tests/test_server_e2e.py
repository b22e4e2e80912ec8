"""End to end: the real server (subprocess, loopback, random tiny checkpoint) driven by the
official ``openai`` SDK and raw HTTP. Random weights write noise, so these tests check shapes,
counts, plumbing and errors; exact Harmony mapping is in test_server_scripted.py."""

from __future__ import annotations

import asyncio
import datetime
import json
import time

import httpx
import openai
import pytest
from server_process import ServerProcess

from harmony.chat_json import render_chat_json

MODEL = "gpt-oss-e2e"
MAX_MODEL_LEN = 1024
MAX_BODY = 64 * 1024

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather of a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


STORE_CAP = 64 * 1024  # small: the load test fills it and must see it evicting


@pytest.fixture(scope="module")
def server(tiny_checkpoint_dir):
    args = [
        "--model", str(tiny_checkpoint_dir),
        "--served-model-name", MODEL,
        "--max-model-len", str(MAX_MODEL_LEN),
        "--kv-cache-memory", "256MiB",
        "--max-body-bytes", str(MAX_BODY),
        "--response-store-max-bytes", str(STORE_CAP),
    ]  # fmt: skip
    with ServerProcess(args) as srv:
        yield srv


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# -- models, probes, tokenize ------------------------------------------------------------------


def test_models_and_probes(server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    card = httpx.get(server.url + f"/v1/models/{MODEL}").json()
    assert card["max_model_len"] == MAX_MODEL_LEN
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    assert httpx.get(server.url + "/ready").json()["status"] == "ready"


def test_tokenize_chat_equals_renderer_and_generation(server, client):
    request = {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather in Paris?"},
        ],
        "tools": TOOLS,
        "reasoning_effort": "high",
    }
    before = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    got = httpx.post(server.url + "/tokenize", json=request).json()
    after = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    expected = [render_chat_json(request, d).token_ids for d in {before, after}]
    assert got["tokens"] in expected
    assert got["count"] == len(got["tokens"]) and got["max_model_len"] == MAX_MODEL_LEN
    # tool_choice "none" leaves the tools out of the prompt (the model cannot call what it never saw).
    no_tools = {k: v for k, v in request.items() if k != "tools"}
    got_none = httpx.post(server.url + "/tokenize", json={**request, "tool_choice": "none"}).json()
    assert got_none["tokens"] in [render_chat_json(no_tools, d).token_ids for d in {before, after}]
    # The prompt generation uses is the same token count.
    r = client.chat.completions.create(**request, max_tokens=1)
    assert r.usage.prompt_tokens == got["count"]
    # A prompt string: special-token text becomes special tokens; detokenize round-trips.
    prompt = "<|start|>user<|message|>hi<|end|>"
    ids = httpx.post(server.url + "/tokenize", json={"prompt": prompt}).json()["tokens"]
    assert ids[0] == 200006 and ids[-1] == 200007
    assert httpx.post(server.url + "/detokenize", json={"tokens": ids}).json()["prompt"] == prompt
    bad = httpx.post(server.url + "/detokenize", json={"tokens": [10**9]})
    assert bad.status_code == 400


# -- chat via the SDK ------------------------------------------------------------------------


def test_sdk_chat_non_streaming_with_tools_and_effort(client):
    r = client.chat.completions.create(
        model=MODEL,
        messages=user("What's the weather in Paris?"),
        tools=TOOLS,
        tool_choice="auto",
        reasoning_effort="low",
        max_completion_tokens=12,
        temperature=0.8,
        top_p=0.95,
        seed=7,
        extra_body={"top_k": 50, "min_p": 0.01, "repetition_penalty": 1.1, "min_tokens": 2},
    )
    assert r.object == "chat.completion" and r.model == MODEL
    assert r.id.startswith("chatcmpl-")
    (choice,) = r.choices
    assert choice.finish_reason in ("stop", "length", "tool_calls")
    assert choice.message.role == "assistant"
    assert 2 <= r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert 0 <= r.usage.completion_tokens_details.reasoning_tokens <= r.usage.completion_tokens
    for text in (choice.message.content or "", choice.message.reasoning or ""):
        assert (
            "<|" not in text
            or "|>" not in text
            or all(
                s not in text for s in ("<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|return|>")
            )
        )


def test_sdk_chat_streaming_with_usage(client):
    stream = client.chat.completions.create(
        model=MODEL,
        messages=user("Tell me a story"),
        max_tokens=10,
        stream=True,
        stream_options={"include_usage": True},
        reasoning_effort="medium",
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes in (["length"], ["stop"], ["tool_calls"])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens <= 10
    assert len({c.id for c in chunks}) == 1


def test_sdk_async_chat_and_n(server):
    async def main():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0) as c:
            r = await c.chat.completions.create(
                model=MODEL, messages=user("hi"), n=3, max_tokens=5, logprobs=True, top_logprobs=2
            )
            stream = await c.chat.completions.create(
                model=MODEL, messages=user("hi"), n=2, max_tokens=5, stream=True, tools=TOOLS
            )
            finished = {}
            async for chunk in stream:
                for ch in chunk.choices:
                    if ch.finish_reason:
                        finished[ch.index] = ch.finish_reason
            return r, finished

    r, finished = asyncio.run(main())
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert r.usage.completion_tokens <= 15
    assert all(c.logprobs is not None for c in r.choices)
    assert sorted(finished) == [0, 1]


def test_unknown_fields_are_ignored(server):
    body = {"model": MODEL, "messages": user("hi"), "max_tokens": 2, "frobnicate": {"x": 1}, "store": True}
    assert httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30).status_code == 200


# -- raw completions --------------------------------------------------------------------------


def test_completions_seeded_stop_and_logprobs(server, client):
    prompt = "<|start|>user<|message|>Say something<|end|><|start|>assistant"
    kwargs = dict(
        model=MODEL, prompt=prompt, max_tokens=12, temperature=1.0, seed=123, extra_body={"ignore_eos": True}
    )
    a = client.completions.create(**kwargs)
    b = client.completions.create(**kwargs)
    assert a.choices[0].text == b.choices[0].text, "a seed makes sampling reproducible"
    assert a.choices[0].finish_reason == "length" and a.usage.completion_tokens == 12
    text = a.choices[0].text
    # A stop string in the middle of that same text truncates it there.
    stop = next(
        (
            text[i : i + 3]
            for i in range(2, len(text) - 3)
            if text[i : i + 3].strip() and text.find(text[i : i + 3]) == i
        ),
        None,
    )
    if stop is not None:
        c = client.completions.create(**kwargs, stop=[stop])
        assert c.choices[0].text == text[: text.index(stop)]
        assert c.choices[0].finish_reason == "stop"
    # Token-id prompts, logprobs, skip_special_tokens.
    ids = httpx.post(server.url + "/tokenize", json={"prompt": prompt}).json()["tokens"]
    r = httpx.post(
        server.url + "/v1/completions",
        json={"model": MODEL, "prompt": ids, "max_tokens": 6, "logprobs": 2, "skip_special_tokens": True},
        timeout=30,
    ).json()
    lp = r["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) <= 6
    assert all(v <= 0 for v in lp["token_logprobs"])
    assert "<|" not in r["choices"][0]["text"] or "|>" not in r["choices"][0]["text"]
    # Streaming completions end with [DONE].
    stream = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, stream=True)
    pieces = list(stream)
    assert pieces[-1].choices[0].finish_reason in ("stop", "length")


# -- errors --------------------------------------------------------------------------------------


def assert_error(response: httpx.Response, status: int, param: str | None = ...) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    if param is not ...:
        assert body["error"]["param"] == param
    assert response.headers["x-request-id"]
    return body["error"]


def test_errors(server):
    url = server.url + "/v1/chat/completions"
    ok = {"model": MODEL, "messages": user("hi"), "max_tokens": 1}
    assert_error(httpx.post(url, json={**ok, "temperature": "hot"}), 400, "temperature")
    assert_error(httpx.post(url, json={**ok, "temperature": 5}), 400, "temperature")
    assert_error(httpx.post(url, json={**ok, "messages": []}), 400, "messages")
    assert_error(httpx.post(url, json={"model": MODEL}), 400, "messages")
    assert_error(httpx.post(url, json={**ok, "messages": [{"role": "wizard", "content": "x"}]}), 400)
    assert_error(httpx.post(url, content=b"{not json", headers={"content-type": "application/json"}), 400)
    assert_error(httpx.post(url, json={**ok, "reasoning_effort": "extreme"}), 400, "reasoning_effort")
    err = assert_error(httpx.post(url, json={**ok, "tool_choice": "required"}), 400, "tool_choice")
    assert "at least one tool" in err["message"]
    named = {"type": "function", "function": {"name": "get_time"}}
    assert_error(httpx.post(url, json={**ok, "tools": TOOLS, "tool_choice": named}), 400, "tool_choice")
    bad_schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "wat"}}}
    err = assert_error(httpx.post(url, json={**ok, "response_format": bad_schema}), 400, "response_format")
    assert err["code"] == "invalid_grammar" and "wat" in err["message"]
    assert_error(httpx.post(url, json={**ok, "messages": [{"role": "tool", "content": "x"}]}), 400)
    assert (
        assert_error(httpx.post(url, json={**ok, "model": "gpt-5"}), 404, "model")["code"]
        == "model_not_found"
    )
    assert_error(httpx.get(server.url + "/v1/nothing"), 404)
    assert_error(httpx.delete(server.url + "/v1/models"), 405)
    long_prompt = {**ok, "messages": user("hello " * 1200), "max_tokens": 5}
    assert assert_error(httpx.post(url, json=long_prompt), 400)["code"] == "context_length_exceeded"
    huge = {**ok, "messages": user("x" * (MAX_BODY + 1))}
    assert_error(httpx.post(url, json=huge), 413)
    chunked = (json.dumps(huge).encode()[i : i + 4096] for i in range(0, MAX_BODY + 4096, 4096))
    assert_error(httpx.post(url, content=chunked, headers={"content-type": "application/json"}), 413)
    # x-request-id: echoed when sent, generated otherwise.
    r = httpx.get(server.url + "/v1/models", headers={"x-request-id": "my-trace-42"})
    assert r.headers["x-request-id"] == "my-trace-42"
    assert httpx.get(server.url + "/health").headers["x-request-id"].startswith("req-")

    async def same_id_twice():
        async with httpx.AsyncClient(timeout=30, headers={"x-request-id": "reused"}) as c:
            return await asyncio.gather(*(c.post(url, json={**ok, "max_tokens": 8}) for _ in range(2)))

    responses = asyncio.run(same_id_twice())
    assert [r.status_code for r in responses] == [200, 200]
    assert len({r.json()["id"] for r in responses}) == 2


def test_sdk_maps_errors(client):
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=MODEL, messages=user("x"), tool_choice="required")
    assert exc.value.body["param"] == "tool_choice"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=user("x"))


# -- lifecycle -----------------------------------------------------------------------------------


def test_client_disconnect_aborts_at_once(server):
    # Chat: random weights rarely write visible text, so leave right after the role chunk.
    body = {"model": MODEL, "messages": user("go on"), "max_tokens": 900, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()  # keep a reference: a collected iterator closes the connection
        first = next(lines)
        assert json.loads(first.removeprefix("data: "))["choices"][0]["delta"]["role"] == "assistant"
        time.sleep(0.2)
        assert server.metric("gptoss_num_requests_running") == 1
        assert server.metric("gptoss_kv_cache_blocks_used") > 0
    server.wait_engine_idle(timeout=2.0)
    # Raw completions stream every token: leave after a few.
    body = {"model": MODEL, "prompt": "Once upon", "max_tokens": 900, "stream": True, "ignore_eos": True}
    started = time.monotonic()
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as r:
        lines = [line for _, line in zip(range(10), r.iter_lines(), strict=False) if line]
        assert len(lines) == 5 and all(line.startswith("data: {") for line in lines)
    server.wait_engine_idle(timeout=2.0)
    assert time.monotonic() - started < 5, "900 tokens were not generated: the request was aborted"
    # Non-streaming: a client that times out is gone too.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json={**body, "stream": False}, timeout=0.5)
    server.wait_engine_idle(timeout=2.0)


@pytest.mark.slow
def test_load_200_streams_with_disconnects(server):
    """200 streaming requests (chat, completions, Responses), 32 at a time, every 4th client
    leaves mid-stream: none hangs, no KV block leaks, the response store stays bounded."""

    async def one(client: httpx.AsyncClient, i: int) -> str:
        # A third each: chat, raw completions (random weights write visible text there on every
        # token), Responses (stored: the store must stay bounded).
        kind = ("chat", "completions", "responses")[i % 3]
        body: dict = {"model": MODEL, "stream": True}
        if kind == "chat":
            body.update(messages=user(f"request {i}"), max_tokens=16)
        elif kind == "completions":
            body.update(prompt=f"<|start|>user<|message|>request {i}<|end|><|start|>assistant", max_tokens=16)
        else:
            body.update(input=f"request {i}", max_output_tokens=16)
        path = {
            "chat": "/v1/chat/completions",
            "completions": "/v1/completions",
            "responses": "/v1/responses",
        }[kind]
        async with client.stream("POST", path, json=body) as r:
            assert r.status_code == 200
            events = []
            buffer = ""
            async for text in r.aiter_text():
                buffer += text
                while "\n\n" in buffer:
                    event, buffer = buffer.split("\n\n", 1)
                    events.append(event)
                if i % 8 < 2 and events:  # a quarter of the clients leave mid-stream
                    return "disconnected"
        assert buffer == ""
        if kind == "responses":
            types = [e.split("\n")[0].removeprefix("event: ") for e in events]
            assert types[0] == "response.created" and types[-1] in (
                "response.completed",
                "response.incomplete",
            )
            return "completed"
        assert events[-1] == "data: [DONE]"
        chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
        assert all(e.startswith("data: ") for e in events)
        if kind == "chat":
            assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        finishes = [c["choices"][0]["finish_reason"] for c in chunks]
        assert finishes[-1] in ("stop", "length", "tool_calls") and finishes[:-1] == [None] * (
            len(finishes) - 1
        )
        return "completed"

    async def main():
        limits = httpx.Limits(max_connections=32)
        async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as client:
            gate = asyncio.Semaphore(32)

            async def gated(i):
                async with gate:
                    return await one(client, i)

            return await asyncio.wait_for(asyncio.gather(*(gated(i) for i in range(200))), timeout=120)

    results = asyncio.run(main())
    assert results.count("completed") == 150 and results.count("disconnected") == 50
    server.wait_engine_idle(timeout=5.0)
    assert server.metric("gptoss_num_requests_running") == 0
    assert server.metric("gptoss_kv_cache_blocks_used") == 0
    # Every completed Responses stream was stored, none that was cut; within the byte cap.
    assert 0 < server.metric("gptoss_response_store_entries") <= 67
    assert server.metric("gptoss_response_store_bytes") <= STORE_CAP


def test_unloadable_model_exits_1(tmp_path):
    with pytest.raises(RuntimeError, match="exited with 1"):
        ServerProcess(["--model", str(tmp_path / "missing")]).start()
