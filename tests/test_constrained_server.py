"""Constrained decoding through the real server, engine and model (random weights, no script):
whatever the model's logits, every surface's answer holds to what the request asked for."""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pytest
from openai.types.responses import Response
from pydantic import BaseModel, Field
from server_process import ServerProcess

MODEL = "gpt-oss-test"
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
          "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}  # fmt: skip
CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}},
        "required": ["city"], "additionalProperties": False}  # fmt: skip
WEATHER = {
    "type": "function",
    "function": {"name": "get_weather", "description": "Weather", "parameters": CITY},
}
TIME = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
}
CODE = r"[A-Z]{2}-[0-9]{3}"
BUDGET = 8


@pytest.fixture(scope="module")
def server(tiny_checkpoint_dir):
    args = ["--model", str(tiny_checkpoint_dir), "--served-model-name", MODEL, "--kv-cache-memory", "64MiB",
            "--max-model-len", "4096"]  # fmt: skip
    with ServerProcess(args) as srv:
        yield srv


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + path, json={"model": MODEL, **body}, timeout=120)


def chat(server, body: dict) -> dict:
    r = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Go"}], **body})
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("temperature", [0, 1])
def test_chat_json_schema_answers_hold_to_the_schema(server, temperature):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    body = chat(server, {"response_format": fmt, "n": 2, "temperature": temperature, "max_tokens": 64,
                         "max_reasoning_tokens": BUDGET})  # fmt: skip
    for choice in body["choices"]:
        assert choice["finish_reason"] == "stop"
        jsonschema.validate(json.loads(choice["message"]["content"]), PERSON)
    assert body["usage"]["completion_tokens_details"]["reasoning_tokens"] <= 2 * BUDGET  # n = 2
    # json_object, and the default budget (a share of max_tokens): still an answer in the limit.
    body = chat(server, {"response_format": {"type": "json_object"}, "max_tokens": 48, "temperature": 1})
    answer = body["choices"][0]
    assert answer["finish_reason"] in ("stop", "length")
    if answer["finish_reason"] == "stop":
        assert isinstance(json.loads(answer["message"]["content"]), dict)


def test_the_schema_is_rendered_into_response_formats(server):
    messages = [{"role": "user", "content": "Go"}]
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    plain = post(server, "/tokenize", {"messages": messages}).json()["count"]
    shown = post(server, "/tokenize", {"messages": messages, "response_format": fmt}).json()["count"]
    assert shown > plain + 10


def test_chat_tool_choice_required_named_and_strict(server):
    for choice, names in (("required", {"get_weather", "get_time"}), ({"type": "function", "function": {"name": "get_weather"}}, {"get_weather"})):  # fmt: skip
        body = chat(server, {"tools": [WEATHER, TIME], "tool_choice": choice, "max_tokens": 64,
                             "max_reasoning_tokens": BUDGET, "temperature": 1})  # fmt: skip
        answer = body["choices"][0]
        assert answer["finish_reason"] == "tool_calls"
        call = answer["message"]["tool_calls"][0]["function"]
        assert call["name"] in names
        if call["name"] == "get_weather":
            jsonschema.validate(json.loads(call["arguments"]), CITY)
    # auto with a strict function: a call, if the model makes one, has valid arguments.
    strict = {"type": "function", "function": {**WEATHER["function"], "strict": True}}
    for seed in range(3):
        answer = chat(
            server, {"tools": [strict], "max_tokens": 48, "seed": seed, "max_reasoning_tokens": BUDGET}
        )
        for call in answer["choices"][0]["message"].get("tool_calls") or []:
            jsonschema.validate(json.loads(call["function"]["arguments"]), CITY)


def test_sdk_parse_with_a_pydantic_model(server):
    class Person(BaseModel):
        name: str = Field(max_length=6)
        age: int = Field(ge=0, le=120)

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    completion = client.chat.completions.parse(
        model=MODEL,
        messages=[{"role": "user", "content": "Extract: Bo is 3 years old."}],
        response_format=Person,
        max_tokens=64,
        extra_body={"max_reasoning_tokens": BUDGET},
    )
    assert isinstance(completion.choices[0].message.parsed, Person)


def test_responses_text_format_tool_choice_and_custom_grammar(server):
    fmt = {"type": "json_schema", "name": "person", "schema": PERSON, "strict": True}
    r = post(server, "/v1/responses", {"input": "Go", "text": {"format": fmt}, "max_output_tokens": 64,
                                       "max_reasoning_tokens": BUDGET})  # fmt: skip
    response = Response.model_validate(r.json())
    jsonschema.validate(json.loads(response.output_text), PERSON)
    assert response.text.format.type == "json_schema"
    weather = {"type": "function", "name": "get_weather", "parameters": CITY}
    code = {
        "type": "custom",
        "name": "code",
        "format": {"type": "grammar", "syntax": "regex", "definition": CODE},
    }
    r = post(server, "/v1/responses", {"input": "Go", "tools": [weather, code], "tool_choice": "required",
                                       "max_output_tokens": 64, "max_reasoning_tokens": BUDGET})  # fmt: skip
    call = Response.model_validate(r.json()).output[-1]
    assert call.type in ("function_call", "custom_tool_call")
    r = post(server, "/v1/responses", {"input": "Go", "tools": [weather, code], "max_output_tokens": 64,
                                       "tool_choice": {"type": "custom", "name": "code"},
                                       "max_reasoning_tokens": BUDGET})  # fmt: skip
    call = Response.model_validate(r.json()).output[-1]
    assert call.type == "custom_tool_call" and call.name == "code" and re.fullmatch(CODE, call.input)


def test_completions_structured_outputs(server):
    prompt = "<|start|>user<|message|>code?<|end|><|start|>assistant<|channel|>final<|message|>"
    for extra, check in (
        ({"structured_outputs": {"regex": CODE}}, lambda t: re.fullmatch(CODE, t)),
        ({"guided_json": CITY}, lambda t: jsonschema.validate(json.loads(t), CITY) is None),
        ({"guided_choice": ["yes", "no"]}, lambda t: t in ("yes", "no")),
        ({"structured_outputs": {"grammar": 'start: "a"+ "!"'}}, lambda t: re.fullmatch(r"a+!", t)),
    ):
        r = post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 40, **extra})
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "stop" and check(choice["text"]), (extra, choice)


def test_a_budget_alone_bounds_reasoning(server):
    body = chat(server, {"max_tokens": 40, "max_reasoning_tokens": 4, "temperature": 1, "seed": 1})
    assert body["usage"]["completion_tokens_details"]["reasoning_tokens"] <= 4


def test_bad_schemas_and_grammars_are_a_400_before_queueing(server):
    cases = [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
          "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "wat"}}}},
         "response_format"),
        ("/v1/responses", {"input": "x", "tools": [{"type": "custom", "name": "c", "format": {
            "type": "grammar", "syntax": "lark", "definition": "start: undefined_rule"}}],
         "tool_choice": {"type": "custom", "name": "c"}}, "tool_choice"),
        ("/v1/completions", {"prompt": "x", "structured_outputs": {"regex": "(unclosed"}}, "structured_outputs"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": [WEATHER],
          "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ]  # fmt: skip
    for path, body, param in cases:
        r = post(server, path, body)
        assert r.status_code == 400, (path, r.text)
        assert r.json()["error"]["param"] == param


NESTED = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 999},
        "kind": {"enum": ["a", "b", None]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 2},
        "where": {"anyOf": [{"type": "boolean"}, {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9}}}]},
        "note": {"type": "string", "maxLength": 4},
    },
    "required": ["id", "kind", "tags"],
}  # fmt: skip


def _stream_text(server, path: str, body: dict) -> tuple[str, str]:
    """(answer text, how it ended) of a streamed chat completion or response."""
    text, end = "", ""
    with httpx.stream(
        "POST", server.url + path, json={"model": MODEL, "stream": True, **body}, timeout=120
    ) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: ") :])
            if path.endswith("chat/completions"):
                for choice in event.get("choices", []):
                    text += choice["delta"].get("content") or ""
                    end = choice.get("finish_reason") or end
            elif event["type"] == "response.output_text.delta":
                text += event["delta"]
            elif event["type"] in ("response.completed", "response.incomplete", "response.failed"):
                end = event["type"]
    return text, end


@pytest.mark.slow
@pytest.mark.parametrize("stream", [False, True])
def test_fifty_seeds_on_chat_and_responses_all_validate(server, stream):
    """Temperature 1, 50 seeds, each surface: every answer parses, validates, finishes stop."""
    fmt_chat = {"type": "json_schema", "json_schema": {"name": "thing", "schema": NESTED}}
    fmt_resp = {"type": "json_schema", "name": "thing", "schema": NESTED}
    common = {"temperature": 1, "max_reasoning_tokens": 4}

    def one(seed: int, surface: str) -> tuple[str, str]:
        if surface == "chat":
            body = {"messages": [{"role": "user", "content": "Go"}], "response_format": fmt_chat, "max_tokens": 96,
                    "seed": seed, **common}  # fmt: skip
            if stream:
                return _stream_text(server, "/v1/chat/completions", body)
            choice = post(server, "/v1/chat/completions", body).json()["choices"][0]
            return choice["message"]["content"], choice["finish_reason"]
        body = {"input": "Go", "text": {"format": fmt_resp}, "max_output_tokens": 96, "seed": seed, **common}
        if stream:
            return _stream_text(server, "/v1/responses", body)
        response = Response.model_validate(post(server, "/v1/responses", body).json())
        return response.output_text, f"response.{response.status}"

    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(
            pool.map(lambda job: one(*job), [(s, k) for s in range(50) for k in ("chat", "responses")])
        )
    for text, end in results:
        assert end in ("stop", "response.completed"), (text, end)
        jsonschema.validate(json.loads(text), NESTED)
