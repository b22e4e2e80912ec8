"""A JSON-shaped chat-completions request (the decoded body, a dict) -> `Conversation`.

For `python -m harmony render` and the tests that compare with openai-harmony; the server
builds its `Conversation` from its validated pydantic model instead. Every shape problem is a
RenderError whose `param` names the offending field:

- `messages`: a non-empty list of objects with a `role` of system|developer|user|assistant|tool.
- Content may be a string, null, or a list of `{"type": "text", "text": ...}` parts
  (concatenated); other part types are rejected. The `name` of non-tool messages is ignored.
- The reasoning effort comes from `reasoning_effort`, else `reasoning.effort`; it must be
  `low`, `medium` or `high` (case-insensitive; default medium). Any other value (`minimal`,
  `none`, ...) is rejected, never silently clamped.
- `tools[i]` must be of type `function` (the model could not call anything else) with a
  non-empty name, a string description and an object (JSON Schema) as parameters.
  `tool_choice: "none"` leaves the tools out of the conversation (the model cannot call what
  it never saw); other `tool_choice` values are not the renderer's business.
- assistant: `reasoning` (or `reasoning_content` when `reasoning` is empty) must be a string;
  `tool_calls` a list of `{"id", "function": {"name", "arguments"}}`. Arguments are JSON text;
  parsed arguments (an object or array, sent by some clients) are dumped with `json.dumps`.
- tool: `tool_call_id` and `name` are used when they are strings (resolution is the
  renderer's, rule 6 of `harmony.render`).
"""

from __future__ import annotations

import json
from typing import Any

from harmony.conversation import REASONING_EFFORTS, ROLES, Conversation, FunctionTool, ToolCall, Turn
from harmony.render import RenderedPrompt, RenderError, render_conversation
from harmony.tokenizer import HarmonyTokenizer


def _content_text(content: Any, index: int, field: str = "content") -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text":
                raise RenderError("only text content parts are supported", index=index, field=f"{field}[{j}]")
            text = part.get("text")
            if not isinstance(text, str):
                raise RenderError(
                    "a text content part needs a string `text`", index=index, field=f"{field}[{j}].text"
                )
            texts.append(text)
        return "".join(texts)
    raise RenderError("content must be a string, null or a list of text parts", index=index, field=field)


def reasoning_effort_of(request: dict) -> str:
    """`reasoning_effort`, else `reasoning.effort`, else medium; low|medium|high only."""
    effort, param = request.get("reasoning_effort"), "reasoning_effort"
    if effort is None:
        reasoning = request.get("reasoning")
        if reasoning is not None and not isinstance(reasoning, dict):
            raise RenderError("reasoning must be an object", param="reasoning")
        effort, param = (reasoning or {}).get("effort"), "reasoning.effort"
    if effort is None:
        return "medium"
    if not isinstance(effort, str) or effort.strip().lower() not in REASONING_EFFORTS:
        raise RenderError(f"{param} must be one of low, medium, high; got {effort!r}", param=param)
    return effort.strip().lower()


def function_tools_of(request: dict) -> tuple[FunctionTool, ...]:
    """The request's `tools`, all of type `function` (others are a RenderError)."""
    raw_tools = request.get("tools")
    if raw_tools is None:
        return ()
    if not isinstance(raw_tools, list):
        raise RenderError("tools must be a list", param="tools")
    result = []
    for i, tool in enumerate(raw_tools):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise RenderError("only tools of type `function` are supported", param=f"tools[{i}].type")
        function = tool.get("function")
        if not isinstance(function, dict):
            raise RenderError("a function tool needs a `function` object", param=f"tools[{i}].function")
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise RenderError("a function tool needs a non-empty name", param=f"tools[{i}].function.name")
        description = function.get("description") or ""
        if not isinstance(description, str):
            raise RenderError("description must be a string", param=f"tools[{i}].function.description")
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise RenderError(
                "parameters must be a JSON Schema object", param=f"tools[{i}].function.parameters"
            )
        result.append(FunctionTool(name=name, description=description, parameters=parameters))
    return tuple(result)


def _arguments_text(arguments: Any, index: int, field: str) -> str:
    if isinstance(arguments, str):
        return arguments
    if arguments is None:
        return ""
    if isinstance(arguments, (dict, list)):  # lenient: some clients send parsed arguments
        return json.dumps(arguments, ensure_ascii=False)
    raise RenderError("tool call arguments must be a string", index=index, field=field)


def _tool_calls(message: dict, index: int) -> tuple[ToolCall, ...]:
    raw_calls = message.get("tool_calls") or []
    if not isinstance(raw_calls, list):
        raise RenderError("tool_calls must be a list", index=index, field="tool_calls")
    calls = []
    for k, call in enumerate(raw_calls):
        field = f"tool_calls[{k}].function"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict):
            raise RenderError("a tool call needs a `function` object", index=index, field=field)
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise RenderError("a tool call needs a function name", index=index, field=f"{field}.name")
        arguments = _arguments_text(function.get("arguments"), index, f"{field}.arguments")
        call_id = call.get("id")
        calls.append(
            ToolCall(name=name, arguments=arguments, id=call_id if isinstance(call_id, str) else None)
        )
    return tuple(calls)


def _turn(message: Any, index: int) -> Turn:
    if not isinstance(message, dict):
        raise RenderError("a message must be an object", index=index)
    role = message.get("role")
    if role not in ROLES:
        raise RenderError(f"unknown role {role!r}", index=index, field="role")
    content = _content_text(message.get("content"), index)
    if role == "assistant":
        reasoning = message.get("reasoning")
        if not reasoning:
            reasoning = message.get("reasoning_content")
        if reasoning is not None and not isinstance(reasoning, str):
            raise RenderError("reasoning must be a string", index=index, field="reasoning")
        return Turn("assistant", content, reasoning=reasoning or "", tool_calls=_tool_calls(message, index))
    if role == "tool":
        call_id, name = message.get("tool_call_id"), message.get("name")
        return Turn(
            "tool",
            content,
            tool_call_id=call_id if isinstance(call_id, str) else None,
            name=name if isinstance(name, str) else None,
        )
    return Turn(role, content)


def conversation_from_chat_json(request: Any, date: str | None) -> Conversation:
    """The typed conversation of a chat-completions request body; RenderError on bad shapes
    (see the module docstring). `date` becomes the system message's `Current date`."""
    if not isinstance(request, dict):
        raise RenderError("the request body must be a JSON object")
    raw_messages = request.get("messages")
    if not isinstance(raw_messages, list) or not raw_messages:
        raise RenderError("messages must be a non-empty list", param="messages")
    effort = reasoning_effort_of(request)
    tools = function_tools_of(request)
    if request.get("tool_choice") == "none":
        tools = ()
    turns = tuple(_turn(message, i) for i, message in enumerate(raw_messages))
    return Conversation(turns=turns, tools=tools, reasoning_effort=effort, date=date)


def render_chat_json(
    request: Any, date: str | None, tokenizer: HarmonyTokenizer | None = None
) -> RenderedPrompt:
    """`render_conversation(conversation_from_chat_json(request, date), tokenizer)`."""
    return render_conversation(conversation_from_chat_json(request, date), tokenizer)
