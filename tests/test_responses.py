"""``/v1/responses`` through the real server, engine and model with scripted sampling: the official
``openai`` SDK's calls, every body and stream event parsed with its types, stored conversations,
encrypted reasoning, and prompts token-identical to the chat equivalent."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter
from responses_script import APPLY_PATCH, MODEL, PATCH_TEXT, SCRIPT, WEATHER, post
from server_process import ServerProcess

EVENTS = TypeAdapter(ResponseStreamEvent)


@pytest.fixture(scope="module")
def server(tiny_checkpoint_dir, tmp_path_factory):
    script = tmp_path_factory.mktemp("responses") / "script.json"
    script.write_text(json.dumps(SCRIPT))
    args = ["--model", str(tiny_checkpoint_dir), "--served-model-name", MODEL, "--kv-cache-memory", "64MiB",
            "--max-model-len", "2048"]  # fmt: skip
    with ServerProcess(args, script=script) as srv:
        yield srv


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=30)


def raw_events(server, body: dict) -> list[dict]:
    with httpx.stream(
        "POST", server.url + "/v1/responses", json={"model": MODEL, "stream": True, **body}, timeout=30
    ) as r:
        assert r.status_code == 200
        text = r.read().decode()
    frames = [f for f in text.split("\n\n") if f]
    events = []
    for frame in frames:
        kind, data = frame.split("\n")
        assert kind.startswith("event: ") and data.startswith("data: ")
        event = json.loads(data[len("data: ") :])
        assert event["type"] == kind[len("event: ") :]
        EVENTS.validate_python(event)  # the SDK's own types
        events.append(event)
    assert "[DONE]" not in text
    return events


def test_create_plain_parses_with_the_sdk_types(server, client):
    r = post(server, "/v1/responses", {"input": "hello", "reasoning": {"effort": "low", "summary": "auto"}})
    assert r.status_code == 200
    response = Response.model_validate(r.json())
    assert response.status == "completed" and response.id.startswith("resp_")
    kinds = [item.type for item in response.output]
    assert kinds == ["reasoning", "message"]
    assert response.output[0].content[0].text == "Thinking." and response.output[0].summary == []
    assert response.output_text == "Hello!"
    u = response.usage
    assert (
        u.total_tokens == u.input_tokens + u.output_tokens and u.output_tokens_details.reasoning_tokens == 3
    )
    sdk = client.responses.create(model=MODEL, input="hello")
    assert sdk.output_text == "Hello!"


def test_create_with_a_function_tool(client):
    r = client.responses.create(model=MODEL, input="SCRIPT:weather in Paris?", tools=[WEATHER])
    call = r.output[-1]
    assert call.type == "function_call" and call.name == "get_weather"
    assert call.call_id.startswith("call_") and json.loads(call.arguments) == {"city": "Paris"}


def test_stream_order_and_the_sdk_accumulator(server, client):
    events = raw_events(server, {"input": "SCRIPT:weather", "tools": [WEATHER]})
    types = [e["type"] for e in events]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert types[:2] == ["response.created", "response.in_progress"] and types[-1] == "response.completed"
    assert types.count("response.completed") == 1
    added = [e for e in events if e["type"] == "response.output_item.added"]
    assert [a["item"]["type"] for a in added] == ["reasoning", "function_call"]
    assert added[1]["item"]["arguments"] == ""
    done_args = next(e for e in events if e["type"] == "response.function_call_arguments.done")
    assert done_args["name"] == "get_weather" and json.loads(done_args["arguments"]) == {"city": "Paris"}
    deltas = "".join(e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta")
    assert deltas == done_args["arguments"]
    with client.responses.stream(model=MODEL, input="hello") as stream:
        seen = [event.type for event in stream]
        final = stream.get_final_response()
    assert "response.output_text.delta" in seen and final.output_text == "Hello!"


def test_retrieve_delete_and_input_items(client):
    r = client.responses.create(model=MODEL, input=[{"role": "user", "content": "hello"}])
    assert client.responses.retrieve(r.id).output_text == "Hello!"
    items = client.responses.input_items.list(r.id)
    assert [i.type for i in items.data] == ["message"] and items.data[0].id
    client.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError, match="not in the store"):
        client.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model=MODEL, input="x", previous_response_id=r.id)


def test_previous_response_id_chain_is_the_whole_conversation(server, client):
    first = client.responses.create(model=MODEL, input="hello", instructions="Be brief.")
    second = client.responses.create(
        model=MODEL,
        input="SCRIPT:weather",
        tools=[WEATHER],
        previous_response_id=first.id,
        instructions="Be brief.",
    )
    call = second.output[-1]
    result = {"type": "function_call_output", "call_id": call.call_id, "output": "TOOLRESULT:sunny"}
    third = client.responses.create(
        model=MODEL, input=[result], tools=[WEATHER], previous_response_id=second.id, instructions="Be brief."
    )
    assert third.output_text == "It is sunny in Paris."
    # The continued prompt equals the conversation sent whole, and its chat equivalent.
    whole = [
        {"role": "user", "content": "hello"},
        *[i.model_dump(exclude_none=True) for i in first.output],
        {"role": "user", "content": "SCRIPT:weather"},
        *[i.model_dump(exclude_none=True) for i in second.output],
        result,
    ]
    common = {"instructions": "Be brief.", "tools": [WEATHER]}
    chained = post(
        server, "/v1/responses/input_tokens", {**common, "input": [result], "previous_response_id": second.id}
    )
    sent_whole = post(server, "/v1/responses/input_tokens", {**common, "input": whole})
    assert chained.json()["input_tokens"] == sent_whole.json()["input_tokens"]
    chat = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "Hello!", "reasoning": "Thinking."},
            {"role": "user", "content": "SCRIPT:weather"},
            {
                "role": "assistant",
                "reasoning": "User wants the weather.",
                "tool_calls": [
                    {
                        "id": call.call_id,
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": call.arguments},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": call.call_id, "content": "TOOLRESULT:sunny"},
        ],
        "tools": [{"type": "function", "function": {k: v for k, v in WEATHER.items() if k != "type"}}],
    }
    assert post(server, "/tokenize", chat).json()["count"] == chained.json()["input_tokens"]


def test_max_output_tokens_is_incomplete(client):
    r = client.responses.create(model=MODEL, input="SCRIPT:long", max_output_tokens=5)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 5


def test_encrypted_reasoning_round_trip(server):
    body = {
        "input": "SCRIPT:weather",
        "tools": [WEATHER],
        "store": False,
        "include": ["reasoning.encrypted_content"],
    }
    r = post(server, "/v1/responses", body).json()
    reasoning, call = r["output"]
    assert reasoning["encrypted_content"] and "User wants" not in reasoning["encrypted_content"]
    result = {"type": "function_call_output", "call_id": call["call_id"], "output": "TOOLRESULT:sunny"}
    sealed = {
        "type": "reasoning",
        "id": reasoning["id"],
        "summary": [],
        "encrypted_content": reasoning["encrypted_content"],
    }
    plain = {
        "type": "reasoning",
        "summary": [],
        "content": [{"type": "reasoning_text", "text": "User wants the weather."}],
    }
    tokens = [
        post(
            server,
            "/v1/responses/input_tokens",
            {"tools": [WEATHER], "input": [{"role": "user", "content": "hi"}, item, call, result]},
        ).json()
        for item in (sealed, plain)
    ]
    assert tokens[0] == tokens[1]
    tampered = {**sealed, "encrypted_content": sealed["encrypted_content"][:-4] + "AAAA"}
    bad = post(server, "/v1/responses", {"tools": [WEATHER], "input": [tampered, call, result]})
    assert bad.status_code == 400 and "encrypted" in bad.json()["error"]["message"]


def test_a_custom_tool_call_streams_as_custom_tool_call_items(server):
    events = raw_events(server, {"input": "SCRIPT:patch", "tools": [WEATHER, APPLY_PATCH]})
    done = [e["item"] for e in events if e["type"] == "response.output_item.done"]
    assert [i["type"] for i in done] == ["reasoning", "message", "custom_tool_call"]
    preamble, call = done[1], done[2]
    assert preamble["phase"] == "commentary" and preamble["content"][0]["text"] == "Applying it."
    assert (
        call["name"] == "apply_patch" and call["input"] == PATCH_TEXT and call["call_id"].startswith("call_")
    )
    deltas = "".join(e["delta"] for e in events if e["type"] == "response.custom_tool_call_input.delta")
    input_done = next(e for e in events if e["type"] == "response.custom_tool_call_input.done")
    assert deltas == input_done["input"] == PATCH_TEXT
    assert not any(e["type"].startswith("response.function_call_arguments") for e in events)
    final = Response.model_validate(events[-1]["response"])
    assert final.status == "completed" and final.output[-1].type == "custom_tool_call"
    # The next turn sends the call back with its output: the answer follows, and the replayed
    # call renders as the model wrote it (the prompt holds the same tokens as the output).
    result = {"type": "custom_tool_call_output", "call_id": call["call_id"], "output": "TOOLRESULT:sunny"}
    r = post(server, "/v1/responses", {"input": [{"role": "user", "content": "SCRIPT:patch"}, *done, result],
                                      "tools": [WEATHER, APPLY_PATCH]})  # fmt: skip
    assert r.status_code == 200 and Response.model_validate(r.json()).output_text == "It is sunny in Paris."


def test_namespaced_calls_carry_their_namespace(client):
    shell = {
        "type": "function",
        "name": "shell",
        "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}}},
    }
    r = client.responses.create(
        model=MODEL,
        input="SCRIPT:shell",
        tools=[{"type": "namespace", "name": "box", "description": "Sandbox", "tools": [shell]}],  # type: ignore[list-item]
    )
    call = r.output[-1]
    assert call.type == "function_call" and call.name == "shell" and call.namespace == "box"
    assert [m.phase for m in r.output if m.type == "message"] == []
    plain = client.responses.create(model=MODEL, input="hello")
    assert [m.phase for m in plain.output if m.type == "message"] == ["final_answer"]


def test_hosted_tools_are_dropped_not_refused(server):
    r = post(server, "/v1/responses", {"input": "hello", "tools": [WEATHER, {"type": "web_search"}]})
    assert r.status_code == 200 and r.headers["x-gptoss-dropped-tools"] == "web_search"


def test_bad_input_is_a_clear_400(server):
    image = {"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}
    r = post(server, "/v1/responses", {"input": [image]})
    assert r.status_code == 400 and "input[0]" in (r.json()["error"]["param"] or "")
    r = post(server, "/v1/responses", {"input": "x" * 20000, "truncation": "disabled"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_agents_sdk_runs_a_function_tool_to_its_final_output(server):
    """The Agents SDK's default (Responses) model: call get_weather, read its result, answer."""
    agents = pytest.importorskip("agents")
    import asyncio

    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    calls = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """Current weather of a city."""
        calls.append(city)
        return "TOOLRESULT:sunny 21C"

    model = agents.OpenAIResponsesModel(model=MODEL, openai_client=client)
    agent = agents.Agent(name="weather", instructions="Answer briefly.", tools=[get_weather], model=model)
    settings = agents.ModelSettings(tool_choice="auto")

    async def main():
        done = await agents.Runner.run(
            agent,
            "SCRIPT:weather in Paris?",
            run_config=agents.RunConfig(model_settings=settings, tracing_disabled=True),
        )
        streamed = agents.Runner.run_streamed(
            agent, "SCRIPT:weather in Paris?", run_config=agents.RunConfig(tracing_disabled=True)
        )
        kinds = [event.type async for event in streamed.stream_events()]
        await client.close()
        return done, streamed, kinds

    done, streamed, kinds = asyncio.run(main())
    assert done.final_output == "It is sunny in Paris."
    assert streamed.final_output == "It is sunny in Paris." and "raw_response_event" in kinds
    assert calls == ["Paris", "Paris"]


CODEX_BODY = {
    "instructions": None,
    "input": [
        {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "You are Codex."}]},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "SCRIPT:weather please"}]},
    ],
    "tools": [
        {"type": "function", "name": "get_weather", "description": "Weather", "strict": False,
         "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
        {"type": "namespace", "name": "shell_tools", "tools": [
            {"type": "function", "name": "shell", "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}}}}
        ]},
        {"type": "web_search"},
    ],
    "tool_choice": "auto",
    "parallel_tool_calls": False,
    "reasoning": {"effort": "medium", "summary": "auto"},
    "store": False,
    "stream": True,
    "include": ["reasoning.encrypted_content"],
    "prompt_cache_key": "019a-session",
    "client_metadata": {"originator": "codex_exec"},
}  # fmt: skip


def test_a_codex_shaped_request_streams_what_codex_reads(server):
    events = raw_events(server, CODEX_BODY)
    assert events[0]["type"] == "response.created"
    done = [e["item"] for e in events if e["type"] == "response.output_item.done"]
    assert all(item["id"] for item in done)
    reasoning, call = done
    assert reasoning["type"] == "reasoning" and reasoning["summary"] == [] and reasoning["encrypted_content"]
    assert call["type"] == "function_call" and call["call_id"] and call["name"] == "get_weather"
    completed = events[-1]
    assert completed["type"] == "response.completed" and completed["response"]["usage"]["total_tokens"] > 0
    # Next turn, as Codex sends it: the items back (reasoning sealed), then the tool's output.
    result = {"type": "function_call_output", "call_id": call["call_id"], "output": "TOOLRESULT:sunny"}
    turn2 = {**CODEX_BODY, "input": [*CODEX_BODY["input"], reasoning, call, result]}
    events = raw_events(server, turn2)
    answer = events[-1]["response"]["output"]
    assert [i["type"] for i in answer] == ["reasoning", "message"]
    assert answer[-1]["content"][0]["text"] == "It is sunny in Paris."
    # The sealed analysis was restored in the prompt: same tokens as with the analysis in clear.
    plain = {
        "type": "reasoning",
        "summary": [],
        "content": [{"type": "reasoning_text", "text": "User wants the weather."}],
    }
    count = {
        k: v
        for k, v in turn2.items()
        if k
        not in ("stream", "store", "include", "prompt_cache_key", "client_metadata", "parallel_tool_calls")
    }
    sealed_count = post(server, "/v1/responses/input_tokens", count).json()["input_tokens"]
    clear = {**count, "input": [*CODEX_BODY["input"], plain, call, result]}
    assert sealed_count == post(server, "/v1/responses/input_tokens", clear).json()["input_tokens"]


def test_truncation_auto_drops_the_oldest_items_until_it_fits(server):
    old = [{"role": "user", "content": "word " * 1100}, {"role": "user", "content": "word " * 1100}]
    items = [*old, {"role": "user", "content": "hello"}]
    refused = post(server, "/v1/responses", {"input": items, "max_output_tokens": 64})
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "context_length_exceeded"
    fitted = post(server, "/v1/responses", {"input": items, "max_output_tokens": 64, "truncation": "auto"})
    assert fitted.status_code == 200 and fitted.json()["truncation"] == "auto"
    assert fitted.json()["output"][-1]["content"][0]["text"] == "Hello!"
    assert fitted.json()["usage"]["input_tokens"] < 2048 - 64
