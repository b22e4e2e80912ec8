"""Test-only oracle: openai-harmony (the official Rust implementation) loaded offline, and the
§11 chat-completions mapping written against its own classes (SystemContent, DeveloperContent,
ToolDescription...), so that the library, not our code, renders system and developer messages,
tool schemas and headers. The oracle takes the JSON-shaped request; `chat_json_of` writes a
typed `Conversation` as one, so typed input is checked against the same oracle."""

from __future__ import annotations

import functools
import os
from pathlib import Path

# openai-harmony reads the vocabulary from here instead of downloading it.
os.environ.setdefault(
    "TIKTOKEN_ENCODINGS_BASE", str(Path(__file__).resolve().parents[1] / "harmony" / "data")
)

import openai_harmony as oh

from harmony.conversation import Conversation

EFFORTS = {
    "low": oh.ReasoningEffort.LOW,
    "medium": oh.ReasoningEffort.MEDIUM,
    "high": oh.ReasoningEffort.HIGH,
}


@functools.lru_cache(maxsize=1)
def encoding() -> oh.HarmonyEncoding:
    return oh.load_harmony_encoding(oh.HarmonyEncodingName.HARMONY_GPT_OSS)


def _text(content) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part["text"] for part in content)


def _assistant(message: dict) -> list[oh.Message]:
    out = []
    reasoning = message.get("reasoning") or message.get("reasoning_content")
    if reasoning:
        out.append(oh.Message.from_role_and_content(oh.Role.ASSISTANT, reasoning).with_channel("analysis"))
    content = _text(message.get("content"))
    calls = message.get("tool_calls") or []
    if not calls:
        if content:
            out.append(oh.Message.from_role_and_content(oh.Role.ASSISTANT, content).with_channel("final"))
        return out
    if content:
        out.append(oh.Message.from_role_and_content(oh.Role.ASSISTANT, content).with_channel("commentary"))
    for call in calls:
        if call.get("type") == "custom":  # a free-form call: raw input, no content type
            out.append(
                oh.Message.from_role_and_content(oh.Role.ASSISTANT, call["custom"]["input"])
                .with_channel("commentary")
                .with_recipient("functions." + call["custom"]["name"])
            )
            continue
        out.append(
            oh.Message.from_role_and_content(oh.Role.ASSISTANT, call["function"]["arguments"])
            .with_channel("commentary")
            .with_recipient("functions." + call["function"]["name"])
            .with_content_type("<|constrain|>json")
        )
    return out


def _tool_description(tool: dict) -> oh.ToolDescription:
    """A chat tool for openai-harmony; a custom (free-form) tool is a function of one string."""
    if tool.get("type") == "custom":
        custom = tool["custom"]
        return oh.ToolDescription.new(custom["name"], custom.get("description") or "", {"type": "string"})
    function = tool["function"]
    return oh.ToolDescription.new(
        function["name"], function.get("description") or "", function.get("parameters")
    )


def oracle_messages(request: dict, date: str | None, drop_analysis: bool = True) -> list[oh.Message]:
    """The §11 mapping (rules 1-7) with openai-harmony objects; `drop_analysis`: apply rule 7."""
    effort = (
        request.get("reasoning_effort") or (request.get("reasoning") or {}).get("effort") or "medium"
    ).lower()
    system = oh.SystemContent.new().with_reasoning_effort(EFFORTS[effort])
    if date is not None:
        system = system.with_conversation_start_date(date)
    tools = [_tool_description(t) for t in request.get("tools") or []]
    instructions, body, names, leading = [], [], {}, True
    for message in request["messages"]:
        role = message["role"]
        if role in ("system", "developer"):
            text = _text(message.get("content"))
            if text and leading:
                instructions.append(text)
            elif text:
                body.append(
                    oh.Message.from_role_and_content(
                        oh.Role.DEVELOPER, oh.DeveloperContent.new().with_instructions(text)
                    )
                )
            continue
        leading = False
        if role == "user":
            body.append(oh.Message.from_role_and_content(oh.Role.USER, _text(message.get("content"))))
        elif role == "assistant":
            body += _assistant(message)
            for call in message.get("tool_calls") or []:
                if "id" in call:
                    names[call["id"]] = call.get("function", call.get("custom"))["name"]
        elif role == "tool":
            name = names.get(message.get("tool_call_id")) or message["name"]
            body.append(
                oh.Message.from_author_and_content(
                    oh.Author.new(oh.Role.TOOL, f"functions.{name}"), _text(message.get("content"))
                )
                .with_recipient("assistant")
                .with_channel("commentary")
            )
    last_final = max(
        (i for i, m in enumerate(body) if m.author.role == oh.Role.ASSISTANT and m.channel == "final"),
        default=-1,
    )
    if drop_analysis:
        body = [m for i, m in enumerate(body) if not (i < last_final and m.channel == "analysis")]
    head = [oh.Message.from_role_and_content(oh.Role.SYSTEM, system)]
    if instructions or tools:
        developer = oh.DeveloperContent.new()
        if instructions:
            developer = developer.with_instructions("\n\n".join(instructions))
        if tools:
            developer = developer.with_function_tools(tools)
        head.append(oh.Message.from_role_and_content(oh.Role.DEVELOPER, developer))
    return head + body


def chat_json_of(conversation: Conversation) -> dict:
    """A typed conversation as the chat-completions request it stands for (the date is passed
    to the oracle separately)."""
    messages = []
    for turn in conversation.turns:
        message: dict = {"role": turn.role, "content": turn.content}
        if turn.reasoning:
            message["reasoning"] = turn.reasoning
        if turn.tool_calls:
            message["tool_calls"] = [
                {"type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                | ({"id": c.id} if c.id is not None else {})
                for c in turn.tool_calls
            ]
        if turn.tool_call_id is not None:
            message["tool_call_id"] = turn.tool_call_id
        if turn.name is not None:
            message["name"] = turn.name
        messages.append(message)
    tools = []
    for tool in conversation.tools:
        function: dict = {"name": tool.name, "description": tool.description}
        if tool.parameters is not None:
            function["parameters"] = tool.parameters
        tools.append({"type": "function", "function": function})
    return {"messages": messages, "tools": tools, "reasoning_effort": conversation.reasoning_effort}


def oracle_render(
    request: dict, date: str | None, auto_drop_analysis: bool = False, drop_analysis: bool = True
) -> list[int]:
    """openai-harmony's render_conversation_for_completion of the mapped request. By default our
    drop rule is applied first and the library's own (auto_drop_analysis) is off."""
    conversation = oh.Conversation.from_messages(oracle_messages(request, date, drop_analysis))
    config = oh.RenderConversationConfig(auto_drop_analysis=auto_drop_analysis)
    return encoding().render_conversation_for_completion(conversation, oh.Role.ASSISTANT, config)


def oracle_parse(completion: list[int]) -> list[dict]:
    """openai-harmony's StreamableParser(role=assistant) messages, as plain dicts."""
    parser = oh.StreamableParser(encoding(), oh.Role.ASSISTANT)
    for token in completion:
        parser.process(token)
    parser.process_eos()
    return [message_dict(m) for m in parser.messages]


def message_dict(message: oh.Message) -> dict:
    return {
        "role": message.author.role.value,
        "name": message.author.name,
        "channel": message.channel,
        "recipient": message.recipient,
        "content_type": message.content_type,
        "content": "".join(c.text for c in message.content),
    }
