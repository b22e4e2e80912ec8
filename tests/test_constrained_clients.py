"""The client paths that failed before constrained decoding, against the real server and a
random-weight model: LangChain's structured output (function calling, JSON Schema, JSON mode)
and ``bind_tools(tool_choice=NAME)``, and the Agents SDK with ``output_type`` and
``tool_choice="required"``. Random weights still give answers of the right shape."""

from __future__ import annotations

import asyncio
from typing import Annotated

import openai
import pytest
from pydantic import BaseModel, Field
from server_process import ServerProcess

MODEL = "gpt-oss-test"


class Person(BaseModel):
    """A person."""

    name: str = Field(max_length=6)
    age: int = Field(ge=0, le=120)


@pytest.fixture(scope="module")
def server():
    # The trained default model: a random one may call the tool again on every turn the
    # Agents SDK leaves to it (tool_choice reset to auto) and never reach the final output.
    args = ["--served-model-name", MODEL, "--kv-cache-memory", "64MiB",
            "--max-model-len", "4096", "--max-output-tokens", "96", "--log-requests"]  # fmt: skip
    with ServerProcess(args) as srv:
        yield srv


def test_langchain_structured_output_and_named_tool_choice(server):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model=MODEL, base_url=server.url + "/v1", api_key="unused", max_retries=0,
                     extra_body={"max_reasoning_tokens": 8}, max_tokens=96)  # fmt: skip
    for method in ("function_calling", "json_schema"):
        person = llm.with_structured_output(Person, method=method).invoke("Extract: Bo is 3 years old.")
        assert isinstance(person, Person), (method, server.log()[-3000:])
    schema = {
        "title": "Answer",
        "type": "object",
        "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"],
    }
    # JSON mode holds the answer to any JSON object, which random weights need not finish: the
    # answer is a JSON object as far as it goes (parsed when it ends within the limit).
    try:
        answer = llm.with_structured_output(schema, method="json_mode").invoke("Reply in JSON.")
        assert isinstance(answer, dict)
    except openai.LengthFinishReasonError as exc:
        assert (exc.completion.choices[0].message.content or "").startswith("{")

    class get_weather(BaseModel):
        """Weather of a city."""

        city: str = Field(max_length=8)  # bounded, so random weights finish the call

    message = llm.bind_tools([get_weather], tool_choice="get_weather").invoke("Weather in Oslo?")
    assert [call["name"] for call in message.tool_calls] == ["get_weather"]
    assert isinstance(message.tool_calls[0]["args"].get("city"), str)


def test_agents_sdk_output_type_and_required_tool_choice(server):
    import agents

    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    model = agents.OpenAIResponsesModel(model=MODEL, openai_client=client)
    calls = []

    @agents.function_tool
    def lookup(name: Annotated[str, Field(max_length=8)]) -> str:
        """Look a person up."""
        calls.append(name)
        return "Bo, 3 years old"

    settings = agents.ModelSettings(tool_choice="required", extra_body={"max_reasoning_tokens": 8})
    agent = agents.Agent(name="extract", instructions="Extract the person.", tools=[lookup], model=model,
                         output_type=Person, model_settings=settings)  # fmt: skip
    result = asyncio.run(
        agents.Runner.run(
            agent, "Who is Bo?", max_turns=12, run_config=agents.RunConfig(tracing_disabled=True)
        )
    )
    assert calls, "tool_choice required: the first turn called the tool"
    assert isinstance(result.final_output, Person)
