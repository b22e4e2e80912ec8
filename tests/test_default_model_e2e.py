"""Real client loops on the trained embedded default (`gpt-oss-tiny`, docs/demo-model.md), with no
scripted tokens: the real server (`python -m server`, no `--model`), the real engine, the real
SDKs. Greedy, so each run is the same; the values are ones the demo eval holds out of training
(new "First Last" names, new "City Harbor" forms, a new pair of numbers) as well as plain ones."""

from __future__ import annotations

import asyncio
import json

import agents
import openai
import pytest
from pydantic import BaseModel
from server_process import ServerProcess

from server.settings import DEFAULT_MODEL_NAME

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    with ServerProcess(["--cache-dir", str(cache), "--max-model-len", "2048"]) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def test_served_as_gpt_oss_tiny(client):
    assert DEFAULT_MODEL_NAME == "gpt-oss-tiny"
    assert [m.id for m in client.models.list().data] == ["gpt-oss-tiny"]


def test_reasoning_then_the_exact_answer(client):
    response = client.chat.completions.create(
        model=DEFAULT_MODEL_NAME, messages=[{"role": "user", "content": "What is 417 + 385?"}],
        temperature=0, reasoning_effort="high", max_tokens=400,
    )  # fmt: skip
    message = response.choices[0].message
    assert response.choices[0].finish_reason == "stop"
    assert "802" in message.reasoning and message.content.strip().endswith("802")


@pytest.mark.parametrize("city", ["Paris", "Ankara Harbor"])
def test_openai_sdk_tool_loop(client, city):
    messages = [{"role": "user", "content": f"What's the weather in {city}?"}]
    first = client.chat.completions.create(
        model=DEFAULT_MODEL_NAME, messages=messages, tools=[WEATHER_TOOL], temperature=0, max_tokens=200
    )
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls", choice.message
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": city}
    messages.append(choice.message.model_dump(exclude_none=True))
    result = json.dumps({"temperature": 23, "unit": "C"})
    messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
    second = client.chat.completions.create(
        model=DEFAULT_MODEL_NAME, messages=messages, tools=[WEATHER_TOOL], temperature=0, max_tokens=200
    )
    answer = second.choices[0].message.content
    assert second.choices[0].finish_reason == "stop"
    assert "23" in answer and city in answer, answer


class Person(BaseModel):
    name: str
    age: int


@pytest.mark.parametrize(("name", "age"), [("Alice", 31), ("Adam Collins", 58)])
def test_parse_with_a_pydantic_model(client, name, age):
    completion = client.chat.completions.parse(
        model=DEFAULT_MODEL_NAME, messages=[{"role": "user", "content": f"Extract: {name} is {age} years old."}],
        response_format=Person, temperature=0, max_tokens=200,
    )  # fmt: skip
    assert completion.choices[0].message.parsed == Person(name=name, age=age)


@pytest.mark.parametrize("api", ["chat_completions", "responses"])
def test_agents_sdk_function_tool_to_final_output(server, api):
    calls: list[str] = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """Current weather of a city."""
        calls.append(city)
        return json.dumps({"temperature": 18, "unit": "C"})

    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    model_class = (
        agents.OpenAIChatCompletionsModel if api == "chat_completions" else agents.OpenAIResponsesModel
    )
    model = model_class(model=DEFAULT_MODEL_NAME, openai_client=client)
    agent = agents.Agent(name="weather", tools=[get_weather], model=model,
                         model_settings=agents.ModelSettings(temperature=0, max_tokens=200))  # fmt: skip
    result = asyncio.run(
        agents.Runner.run(
            agent,
            "What's the weather in Berlin?",
            max_turns=4,
            run_config=agents.RunConfig(tracing_disabled=True),
        )
    )
    assert calls == ["Berlin"]
    assert "18" in result.final_output and "Berlin" in result.final_output, result.final_output
