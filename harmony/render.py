"""Chat-completions request -> Harmony prompt token ids (spec harmony.md §11, our contract).

Rules, in order:
1. A system message: identity, knowledge cutoff 2024-06, `Current date` when a date is given,
   `Reasoning: {effort}` and the valid channels. The effort comes from `reasoning_effort`, else
   `reasoning.effort`; it must be `low`, `medium` or `high` (case-insensitive; default medium).
   Any other value (`minimal`, `none`, ...) is rejected with a RenderError (a 400), never
   silently clamped.
2. A developer message, only when there are instructions or function tools: instructions are
   the texts of the system/developer messages at the start of `messages`, joined by a blank
   line; tools are the `tools[i]` of type `function`, in request order, in namespace
   `functions`. Tools of any other type are rejected (RenderError): the model could not call
   them anyway.
3. A system/developer message later in the conversation becomes a developer message in place
   holding only `# Instructions` and its text. System/developer messages with empty content
   are ignored.
4. user -> a user message; list content is the concatenation of its text parts.
5. assistant -> `reasoning` (or `reasoning_content`) as an `analysis` message; then with
   `tool_calls`: non-empty content as a `commentary` preamble, and per call a `commentary`
   message to `functions.NAME` with content type `<|constrain|>json` and the arguments as
   content (ends in `<|call|>`); without tool calls a non-empty content is the `final` answer.
   Empty strings are treated as absent.
6. tool -> a message from `functions.NAME` to `assistant` on `commentary`; NAME comes from the
   assistant tool call with the same `tool_call_id`, else from the message's `name`. A tool
   message that resolves to no name is a RenderError.
7. Analysis messages positioned before the last assistant `final` message are dropped (the
   chain of thought of finished turns); analysis after it (a tool loop in progress) is kept.
   Then `<|start|>assistant` is appended.

Message content may be a string, null, or a list of `{"type": "text", "text": ...}` parts;
other part types are rejected. The `name` of non-tool messages is ignored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from harmony import tokens
from harmony.messages import (
    REASONING_EFFORTS,
    FunctionTool,
    HarmonyMessage,
    ToolNamespace,
    developer_content,
    render_for_completion,
    system_content,
)
from harmony.tokenizer import HarmonyTokenizer, load_tokenizer

CONSTRAINED_JSON = "<|constrain|>json"


class RenderError(ValueError):
    """The request cannot be rendered; `param` names the offending field (for a 400)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


@dataclass(frozen=True)
class RenderedPrompt:
    token_ids: list[int]
    stop_token_ids: list[int]
    text: str


@dataclass(frozen=True)
class Conversation:
    """The Harmony messages of a request after the §11 mapping and drop rule (without the
    trailing `<|start|>assistant`)."""

    messages: list[HarmonyMessage]
    reasoning_effort: str
    has_function_tools: bool


def _content_text(content: Any, param: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text":
                raise RenderError("only text content parts are supported", f"{param}[{j}]")
            text = part.get("text")
            if not isinstance(text, str):
                raise RenderError("a text content part needs a string `text`", f"{param}[{j}].text")
            texts.append(text)
        return "".join(texts)
    raise RenderError("content must be a string, null or a list of text parts", param)


def reasoning_effort_of(request: dict) -> str:
    """`reasoning_effort`, else `reasoning.effort`, else medium; low|medium|high only."""
    effort, param = request.get("reasoning_effort"), "reasoning_effort"
    if effort is None:
        reasoning = request.get("reasoning")
        if reasoning is not None and not isinstance(reasoning, dict):
            raise RenderError("reasoning must be an object", "reasoning")
        effort, param = (reasoning or {}).get("effort"), "reasoning.effort"
    if effort is None:
        return "medium"
    if not isinstance(effort, str) or effort.strip().lower() not in REASONING_EFFORTS:
        raise RenderError(f"{param} must be one of low, medium, high; got {effort!r}", param)
    return effort.strip().lower()


def function_tools_of(request: dict) -> list[FunctionTool]:
    raw_tools = request.get("tools")
    if raw_tools is None:
        return []
    if not isinstance(raw_tools, list):
        raise RenderError("tools must be a list", "tools")
    result = []
    for i, tool in enumerate(raw_tools):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise RenderError("only tools of type `function` are supported", f"tools[{i}].type")
        function = tool.get("function")
        if not isinstance(function, dict):
            raise RenderError("a function tool needs a `function` object", f"tools[{i}].function")
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise RenderError("a function tool needs a non-empty name", f"tools[{i}].function.name")
        description = function.get("description") or ""
        if not isinstance(description, str):
            raise RenderError("description must be a string", f"tools[{i}].function.description")
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise RenderError("parameters must be a JSON Schema object", f"tools[{i}].function.parameters")
        result.append(FunctionTool(name=name, description=description, parameters=parameters))
    return result


def _arguments_text(arguments: Any, param: str) -> str:
    if isinstance(arguments, str):
        return arguments
    if arguments is None:
        return ""
    if isinstance(arguments, (dict, list)):  # lenient: some clients send parsed arguments
        return json.dumps(arguments, ensure_ascii=False)
    raise RenderError("tool call arguments must be a string", param)


def _assistant_messages(message: dict, param: str) -> list[HarmonyMessage]:
    out = []
    reasoning = message.get("reasoning")
    if not reasoning:
        reasoning = message.get("reasoning_content")
    if reasoning is not None and not isinstance(reasoning, str):
        raise RenderError("reasoning must be a string", f"{param}.reasoning")
    if reasoning:
        out.append(HarmonyMessage("assistant", reasoning, channel="analysis"))
    content = _content_text(message.get("content"), f"{param}.content")
    tool_calls = message.get("tool_calls") or []
    if not isinstance(tool_calls, list):
        raise RenderError("tool_calls must be a list", f"{param}.tool_calls")
    if not tool_calls:
        if content:
            out.append(HarmonyMessage("assistant", content, channel="final"))
        return out
    if content:
        out.append(HarmonyMessage("assistant", content, channel="commentary"))
    for k, call in enumerate(tool_calls):
        call_param = f"{param}.tool_calls[{k}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict):
            raise RenderError("a tool call needs a `function` object", f"{call_param}.function")
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise RenderError("a tool call needs a function name", f"{call_param}.function.name")
        arguments = _arguments_text(function.get("arguments"), f"{call_param}.function.arguments")
        out.append(
            HarmonyMessage(
                "assistant",
                arguments,
                channel="commentary",
                recipient=f"functions.{name}",
                content_type=CONSTRAINED_JSON,
            )
        )
    return out


def _tool_name(message: dict, param: str, call_names: dict[str, str]) -> str:
    call_id = message.get("tool_call_id")
    if isinstance(call_id, str) and call_id in call_names:
        return call_names[call_id]
    name = message.get("name")
    if isinstance(name, str) and name:
        return name
    raise RenderError(
        f"cannot resolve the tool of this message: no earlier tool call has id {call_id!r} and it has no name",
        f"{param}.tool_call_id",
    )


def drop_finished_analysis(messages: list[HarmonyMessage]) -> list[HarmonyMessage]:
    """§11.7: drop analysis before the last assistant `final`; keep analysis after it."""
    last_final = max(
        (i for i, m in enumerate(messages) if m.role == "assistant" and m.channel == "final"), default=-1
    )
    return [m for i, m in enumerate(messages) if not (i < last_final and m.channel == "analysis")]


def chat_request_to_conversation(request: dict, date: str | None) -> Conversation:
    """The Harmony messages for a chat-completions request (rules 1-7 of the module docstring)."""
    if not isinstance(request, dict):
        raise RenderError("the request body must be a JSON object", None)
    raw_messages = request.get("messages")
    if not isinstance(raw_messages, list) or not raw_messages:
        raise RenderError("messages must be a non-empty list", "messages")
    effort = reasoning_effort_of(request)
    tools = function_tools_of(request)

    instructions: list[str] = []
    body: list[HarmonyMessage] = []
    call_names: dict[str, str] = {}
    leading = True
    for i, message in enumerate(raw_messages):
        param = f"messages[{i}]"
        if not isinstance(message, dict):
            raise RenderError("a message must be an object", param)
        role = message.get("role")
        if role in ("system", "developer"):
            text = _content_text(message.get("content"), f"{param}.content")
            if text and leading:
                instructions.append(text)
            elif text:
                body.append(HarmonyMessage("developer", developer_content(text)))
            continue
        leading = False
        if role == "user":
            body.append(HarmonyMessage("user", _content_text(message.get("content"), f"{param}.content")))
        elif role == "assistant":
            body += _assistant_messages(message, param)
            for call in message.get("tool_calls") or []:
                if isinstance(call, dict) and isinstance(call.get("id"), str):
                    call_names[call["id"]] = call["function"]["name"]
        elif role == "tool":
            name = _tool_name(message, param, call_names)
            body.append(
                HarmonyMessage(
                    "tool",
                    _content_text(message.get("content"), f"{param}.content"),
                    name=f"functions.{name}",
                    channel="commentary",
                    recipient="assistant",
                )
            )
        else:
            raise RenderError(f"unknown role {role!r}", f"{param}.role")

    head = [
        HarmonyMessage(
            "system",
            system_content(
                reasoning_effort=effort, conversation_start_date=date, has_function_tools=bool(tools)
            ),
        )
    ]
    if instructions or tools:
        namespaces = [ToolNamespace("functions", tuple(tools))] if tools else []
        head.append(
            HarmonyMessage("developer", developer_content("\n\n".join(instructions) or None, namespaces))
        )
    return Conversation(head + drop_finished_analysis(body), effort, bool(tools))


def render_chat_request(
    request: dict, date: str | None, tokenizer: HarmonyTokenizer | None = None
) -> RenderedPrompt:
    """Prompt token ids for a chat-completions request, ending in `<|start|>assistant`, and the
    stop ids to sample with (`<|return|>`, `<|call|>`). Raises RenderError (see module doc)."""
    tokenizer = tokenizer or load_tokenizer()
    conversation = chat_request_to_conversation(request, date)
    token_ids = render_for_completion(conversation.messages, tokenizer)
    return RenderedPrompt(
        token_ids=token_ids,
        stop_token_ids=list(tokens.STOP_TOKEN_IDS),
        text=tokenizer.decode_with_specials(token_ids),
    )
