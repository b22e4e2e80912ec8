"""Harmony messages and their exact token rendering (spec §2-§5).

Mirrors how harmony-rs renders a message: every header piece (role, ` to=...`, channel,
content type) and the content are tokenized separately, with the control tokens in between,
so the ids match the reference implementation token for token.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field

from harmony import tokens
from harmony.conversation import FunctionTool, ResponseFormat
from harmony.schema_ts import json_schema_to_typescript
from harmony.tokenizer import HarmonyTokenizer

DEFAULT_IDENTITY = "You are ChatGPT, a large language model trained by OpenAI."
DEFAULT_KNOWLEDGE_CUTOFF = "2024-06"
VALID_CHANNELS = ("analysis", "commentary", "final")


@dataclass(frozen=True)
class HarmonyMessage:
    """One Harmony message. `role` is system|developer|user|assistant|tool; a tool message's
    author is its `name` (e.g. `functions.get_weather`)."""

    role: str
    content: str
    name: str | None = None
    channel: str | None = None
    recipient: str | None = None
    content_type: str | None = None


@dataclass(frozen=True)
class ToolNamespace:
    name: str
    tools: Sequence[FunctionTool] = field(default_factory=tuple)
    description: str | None = None


def rust_lines(text: str) -> list[str]:
    """Rust's `str::lines`: split on `\\n`, strip a `\\r` before it, no trailing empty line."""
    if not text:
        return []
    pieces = text.split("\n")
    if pieces[-1] == "":
        pieces.pop()
        lines = [p[:-1] if p.endswith("\r") else p for p in pieces]
    else:
        lines = [p[:-1] if p.endswith("\r") else p for p in pieces[:-1]] + [pieces[-1]]
    return lines


def tools_section(namespaces: Sequence[ToolNamespace]) -> str:
    """The `# Tools` section: namespaces sorted by name, one TypeScript-ish block each."""
    sections = ["# Tools"]
    for namespace in sorted(namespaces, key=lambda ns: ns.name):
        lines = [f"## {namespace.name}\n"]
        if namespace.description is not None:
            for line in rust_lines(namespace.description):
                lines.append(f"// {line}" if namespace.tools else line)
        if namespace.tools:
            lines.append(f"namespace {namespace.name} {{\n")
            for tool in namespace.tools:
                lines.extend(f"// {line}" for line in rust_lines(tool.description))
                if tool.parameters is not None:
                    lines.append(
                        f"type {tool.name} = (_: {json_schema_to_typescript(tool.parameters)}) => any;\n"
                    )
                else:
                    lines.append(f"type {tool.name} = () => any;\n")
            lines.append(f"}} // namespace {namespace.name}")
        sections.append("\n".join(lines))
    return "\n\n".join(sections)


def system_content(
    *,
    reasoning_effort: str,
    conversation_start_date: str | None,
    has_function_tools: bool,
    model_identity: str = DEFAULT_IDENTITY,
    knowledge_cutoff: str = DEFAULT_KNOWLEDGE_CUTOFF,
) -> str:
    """The system message text (§3), with the valid-channels line and, when the conversation
    declares function tools, the line sending their calls to the commentary channel."""
    top = [model_identity, f"Knowledge cutoff: {knowledge_cutoff}"]
    if conversation_start_date is not None:
        top.append(f"Current date: {conversation_start_date}")
    channels = f"# Valid channels: {', '.join(VALID_CHANNELS)}. Channel must be included for every message."
    if has_function_tools:
        channels += "\nCalls to these tools must go to the commentary channel: 'functions'."
    return "\n\n".join(["\n".join(top), f"Reasoning: {reasoning_effort}", channels])


def response_formats_section(formats: Sequence[ResponseFormat]) -> str:
    """`# Response Formats`, then per format `## {name}`, `// {description}` (when non-empty)
    and the schema as `json.dumps` text (§4)."""
    sections = ["# Response Formats"]
    for fmt in formats:
        body = "\n".join([f"// {line}" for line in rust_lines(fmt.description)] + [json.dumps(fmt.schema)])
        sections += [f"## {fmt.name}", body]
    return "\n\n".join(sections)


def developer_content(
    instructions: str | None,
    namespaces: Sequence[ToolNamespace] = (),
    response_formats: Sequence[ResponseFormat] = (),
) -> str:
    """The developer message text (§4): `# Instructions`, the `# Tools` section and the
    `# Response Formats` section."""
    sections = []
    if instructions is not None:
        sections += ["# Instructions", instructions]
    if namespaces:
        sections.append(tools_section(namespaces))
    if response_formats:
        sections.append(response_formats_section(response_formats))
    return "\n\n".join(sections)


def render_message(message: HarmonyMessage, tokenizer: HarmonyTokenizer) -> list[int]:
    """`<|start|>{header}<|message|>{content}{terminator}` exactly as harmony-rs renders it."""
    out = [tokens.START]
    if message.role == "tool":
        if not message.name:
            raise ValueError("a tool message needs the tool's name as its author")
        out += tokenizer.encode(message.name)
    else:
        out += tokenizer.encode(message.role)
        if message.name is not None:
            out += tokenizer.encode(f":{message.name}")
    if message.recipient is not None and message.recipient != "all":
        out += tokenizer.encode(f" to={message.recipient}")
    if message.channel is not None:
        out.append(tokens.CHANNEL)
        out += tokenizer.encode(message.channel)
    if message.content_type is not None:
        if message.content_type.startswith(tokens.CONSTRAIN_TEXT):
            out += tokenizer.encode(" ")
            out.append(tokens.CONSTRAIN)
            rest = message.content_type[len(tokens.CONSTRAIN_TEXT) :]
            if rest:
                out += tokenizer.encode(rest)
        else:
            out += tokenizer.encode(f" {message.content_type}")
    out.append(tokens.MESSAGE)
    out += tokenizer.encode(message.content)
    # A message to a recipient ends in <|call|> even when the recipient is `all` (quirk).
    is_call = message.role == "assistant" and message.recipient is not None
    out.append(tokens.CALL if is_call else tokens.END)
    return out


def render_for_completion(
    messages: Sequence[HarmonyMessage], tokenizer: HarmonyTokenizer, next_role: str = "assistant"
) -> list[int]:
    """All messages, then `<|start|>{next_role}` (no drop rule here: callers apply theirs)."""
    out: list[int] = []
    for message in messages:
        out += render_message(message, tokenizer)
    out.append(tokens.START)
    out += tokenizer.encode(next_role)
    return out
