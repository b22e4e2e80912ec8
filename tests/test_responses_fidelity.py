"""A Responses conversation renders to the same tokens as its chat-completions equivalent, and
both to openai-harmony's rendering (the official implementation): multi-turn, tool loops,
reasoning items (clear and sealed), instructions versus developer messages."""

from __future__ import annotations

import pytest
from harmony_oracle import oracle_render

from harmony.render import render_conversation
from server.reasoning_seal import ReasoningSealer
from server.responses_input import conversation_of, offered_tools, request_items
from server.responses_protocol import ResponsesRequest
from server.settings import ServerSettings
from server.state import ServerState

DATE = "2026-12-02"
WEATHER = {"type": "function", "name": "get_weather", "description": "Weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}  # fmt: skip
CHAT_WEATHER = {"type": "function", "function": {k: v for k, v in WEATHER.items() if k != "type"}}


class FixedDate(ServerState):
    @staticmethod
    def prompt_date() -> str:
        return DATE


STATE = FixedDate(settings=ServerSettings(), sealer=ReasoningSealer("k"))


def responses_tokens(body: dict) -> list[int]:
    request = ResponsesRequest.model_validate(body)
    offered = offered_tools(request)
    return render_conversation(conversation_of(request, request_items(request), offered, STATE)).token_ids


def user(text):
    return {"role": "user", "content": text}


def reasoning(text, sealed=False):
    if sealed:
        return {"type": "reasoning", "summary": [], "encrypted_content": STATE.sealer.seal(text)}
    return {"type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": text}]}


def answer(text):
    return {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": text}]}


def call(call_id, city):
    return {
        "type": "function_call",
        "call_id": call_id,
        "name": "get_weather",
        "arguments": f'{{"city": "{city}"}}',
    }


def output(call_id, text):
    return {"type": "function_call_output", "call_id": call_id, "output": text}


def chat_call(call_id, city):
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": "get_weather", "arguments": f'{{"city": "{city}"}}'},
    }


PATCH = {"type": "custom", "name": "apply_patch", "description": "Apply a patch",
         "format": {"type": "grammar", "syntax": "lark", "definition": "start: /[\\s\\S]+/"}}  # fmt: skip
CHAT_PATCH = {"type": "custom", "custom": {"name": "apply_patch", "description": "Apply a patch"}}
PATCH_TEXT = '*** Begin Patch\n*** Add File: a.txt\n+hi "there"\n*** End Patch'
SHELL = {"type": "function", "name": "shell", "description": "Run", "parameters": {
    "type": "object", "properties": {"cmd": {"type": "string"}}}}  # fmt: skip


def chat_function(tool: dict, name: str | None = None) -> dict:
    fields = {k: v for k, v in tool.items() if k != "type"}
    return {"type": "function", "function": {**fields, "name": name or tool["name"]}}


CASES = {
    "a custom tool loop": (
        {
            "input": [
                user("Patch it"),
                reasoning("write a patch"),
                {"type": "custom_tool_call", "call_id": "p1", "name": "apply_patch", "input": PATCH_TEXT},
                {"type": "custom_tool_call_output", "call_id": "p1", "output": "Done!"},
            ],
            "tools": [WEATHER, PATCH],
        },
        {
            "messages": [
                user("Patch it"),
                {
                    "role": "assistant",
                    "reasoning": "write a patch",
                    "tool_calls": [
                        {"id": "p1", "type": "custom", "custom": {"name": "apply_patch", "input": PATCH_TEXT}}
                    ],
                },
                {"role": "tool", "tool_call_id": "p1", "content": "Done!"},
            ],
            "tools": [CHAT_WEATHER, CHAT_PATCH],
        },
    ),
    "namespaced tools, one name taken": (
        {
            "input": [
                user("ls"),
                {
                    "type": "function_call",
                    "call_id": "s1",
                    "name": "shell",
                    "namespace": "box",
                    "arguments": '{"cmd": "ls"}',
                },
                output("s1", "a.txt"),
            ],
            "tools": [
                {"type": "namespace", "name": "box", "tools": [SHELL]},
                {"type": "namespace", "name": "util", "tools": [WEATHER]},
                SHELL,
            ],
        },
        {
            "messages": [
                user("ls"),
                {
                    "role": "assistant",
                    "tool_calls": [
                        {
                            "id": "s1",
                            "type": "function",
                            "function": {"name": "box__shell", "arguments": '{"cmd": "ls"}'},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "s1", "content": "a.txt"},
            ],
            "tools": [chat_function(SHELL, "box__shell"), CHAT_WEATHER, chat_function(SHELL)],
        },
    ),
    "multi-turn": (
        {"input": [user("Hi"), reasoning("greet"), answer("Hello!"), user("Bye")]},
        {
            "messages": [
                user("Hi"),
                {"role": "assistant", "content": "Hello!", "reasoning": "greet"},
                user("Bye"),
            ]
        },
    ),
    "tool loop in progress keeps its analysis": (
        {
            "input": [user("Weather?"), reasoning("need tool"), call("c1", "Paris"), output("c1", "18C")],
            "tools": [WEATHER],
        },
        {
            "messages": [
                user("Weather?"),
                {"role": "assistant", "reasoning": "need tool", "tool_calls": [chat_call("c1", "Paris")]},
                {"role": "tool", "tool_call_id": "c1", "content": "18C"},
            ],
            "tools": [CHAT_WEATHER],
        },
    ),
    "finished tool loop then a new turn": (
        {
            "input": [
                user("Weather?"),
                reasoning("need tool"),
                call("c1", "Oslo"),
                output("c1", "2C"),
                reasoning("answer it"),
                answer("2C in Oslo."),
                user("Thanks"),
            ],
            "tools": [WEATHER],
        },
        {
            "messages": [
                user("Weather?"),
                {"role": "assistant", "reasoning": "need tool", "tool_calls": [chat_call("c1", "Oslo")]},
                {"role": "tool", "tool_call_id": "c1", "content": "2C"},
                {"role": "assistant", "reasoning": "answer it", "content": "2C in Oslo."},
                user("Thanks"),
            ],
            "tools": [CHAT_WEATHER],
        },
    ),
    "sealed reasoning is restored": (
        {
            "input": [
                user("Weather?"),
                reasoning("need tool", sealed=True),
                call("c1", "Rome"),
                output("c1", "25C"),
            ],
            "tools": [WEATHER],
        },
        {
            "messages": [
                user("Weather?"),
                {"role": "assistant", "reasoning": "need tool", "tool_calls": [chat_call("c1", "Rome")]},
                {"role": "tool", "tool_call_id": "c1", "content": "25C"},
            ],
            "tools": [CHAT_WEATHER],
        },
    ),
    "a preamble before a call": (
        {
            "input": [user("Go"), answer("Checking."), call("c9", "Lima"), output("c9", "20C")],
            "tools": [WEATHER],
        },
        {
            "messages": [
                user("Go"),
                {"role": "assistant", "content": "Checking.", "tool_calls": [chat_call("c9", "Lima")]},
                {"role": "tool", "tool_call_id": "c9", "content": "20C"},
            ],
            "tools": [CHAT_WEATHER],
        },
    ),
    "instructions": (
        {"instructions": "Be brief.", "input": "Hi", "reasoning": {"effort": "high"}},
        {"messages": [{"role": "system", "content": "Be brief."}, user("Hi")], "reasoning_effort": "high"},
    ),
    "a developer message as Codex sends it": (
        {
            "instructions": None,
            "input": [
                {
                    "type": "message",
                    "role": "developer",
                    "content": [{"type": "input_text", "text": "Be brief."}],
                },
                {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
            ],
        },
        {"messages": [{"role": "developer", "content": "Be brief."}, user("Hi")]},
    ),
    "a later system message": (
        {"input": [user("Hi"), answer("Yo"), {"role": "system", "content": "Now formal."}, user("Hello")]},
        {
            "messages": [
                user("Hi"),
                {"role": "assistant", "content": "Yo"},
                {"role": "system", "content": "Now formal."},
                user("Hello"),
            ]
        },
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_responses_equals_chat_equals_openai_harmony(name):
    responses_body, chat_body = CASES[name]
    assert responses_tokens(responses_body) == oracle_render(chat_body, DATE)


def test_instructions_and_a_leading_developer_message_render_alike():
    a = responses_tokens({"instructions": "Be brief.", "input": "Hi"})
    b = responses_tokens({"input": [{"role": "developer", "content": "Be brief."}, user("Hi")]})
    assert a == b
