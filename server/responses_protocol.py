"""Request bodies of the Responses API (``POST /v1/responses``), as clients send them.

Shapes follow OpenAI's (the ``openai`` SDK's ``openai.types.responses`` params): ``input`` is a
string or a list of items told apart by ``type`` (a message may omit it). Items carry ``id``
and ``status`` as clients replay them; unknown fields are accepted and ignored. Content parts
other than text are a 400 naming the part.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag

from server.protocol import (
    MAX_REASONING_DOC,
    MaxReasoningTokens,
    NonEmpty,
    ReasoningEffort,
    SamplerFields,
    _Lenient,
)


class InputText(_Lenient):
    type: Literal["input_text", "output_text", "text"]
    text: str


class OtherPart(_Lenient):
    """A content part this server does not take (images, files, audio): a 400 naming it."""

    type: str


def _part_kind(value: Any) -> str:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return "text" if kind in ("input_text", "output_text", "text") else "other"


ContentPart = Annotated[
    Annotated[InputText, Tag("text")] | Annotated[OtherPart, Tag("other")], Discriminator(_part_kind)
]


class MessageItem(_Lenient):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[ContentPart]
    phase: Literal["commentary", "final_answer"] | None = None
    id: str | None = None
    status: str | None = None


class ReasoningText(_Lenient):
    type: Literal["reasoning_text", "summary_text"]
    text: str


class ReasoningItem(_Lenient):
    type: Literal["reasoning"]
    id: str | None = None
    content: list[ReasoningText] | None = None
    summary: list[ReasoningText] = Field(default_factory=list)
    encrypted_content: str | None = None
    status: str | None = None


class FunctionCallItem(_Lenient):
    type: Literal["function_call"]
    call_id: NonEmpty
    name: NonEmpty
    arguments: str
    namespace: str | None = None
    id: str | None = None
    status: str | None = None


class CustomToolCallItem(_Lenient):
    """A call of a ``custom`` (free-form) tool: its ``input`` is raw text, not JSON."""

    type: Literal["custom_tool_call"]
    call_id: NonEmpty
    name: NonEmpty
    input: str
    namespace: str | None = None
    id: str | None = None
    status: str | None = None


class FunctionCallOutputItem(_Lenient):
    """A tool's result, for a function or a custom tool call alike."""

    type: Literal["function_call_output", "custom_tool_call_output"]
    call_id: NonEmpty
    output: str | list[ContentPart]
    id: str | None = None
    status: str | None = None


_ITEM_KINDS = {
    "message": "message",
    "reasoning": "reasoning",
    "function_call": "function_call",
    "custom_tool_call": "custom_tool_call",
    "function_call_output": "output",
    "custom_tool_call_output": "output",
}


def _item_kind(value: Any) -> str:
    kind = value.get("type", "message") if isinstance(value, dict) else getattr(value, "type", "message")
    return _ITEM_KINDS.get(kind, "other")


class OtherItem(_Lenient):
    """An item type this server does not take (images, files, hosted tool calls...): a 400."""

    type: str


InputItem = Annotated[
    Annotated[MessageItem, Tag("message")]
    | Annotated[ReasoningItem, Tag("reasoning")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[CustomToolCallItem, Tag("custom_tool_call")]
    | Annotated[FunctionCallOutputItem, Tag("output")]
    | Annotated[OtherItem, Tag("other")],
    Discriminator(_item_kind),
]


class FunctionToolParam(_Lenient):
    type: Literal["function"]
    name: NonEmpty
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class CustomToolParam(_Lenient):
    """A free-form tool: its input is text, optionally held to a grammar (``format``:
    ``{"type": "text"}`` or ``{"type": "grammar", "syntax": "lark" | "regex", "definition": ...}``)."""

    type: Literal["custom"]
    name: NonEmpty
    description: str | None = None
    format: dict[str, Any] | None = None


class NamespaceTool(_Lenient):
    """Tools grouped under a name, as Codex sends them; offered to the model as functions."""

    type: Literal["namespace"]
    name: str = ""
    description: str = ""
    tools: list[Annotated[FunctionToolParam | CustomToolParam, Field(discriminator="type")]] = Field(
        default_factory=list
    )


class HostedTool(_Lenient):
    """web_search, file_search, code_interpreter, mcp, ...: not run here, never offered."""

    type: str


def _tool_kind(value: Any) -> str:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return kind if kind in ("function", "custom", "namespace") else "hosted"


ToolParam = Annotated[
    Annotated[FunctionToolParam, Tag("function")]
    | Annotated[CustomToolParam, Tag("custom")]
    | Annotated[NamespaceTool, Tag("namespace")]
    | Annotated[HostedTool, Tag("hosted")],
    Discriminator(_tool_kind),
]


class NamedTool(_Lenient):
    type: str
    name: str | None = None


class TextFormat(_Lenient):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | str | None = Field(default=None, alias="schema")
    strict: bool | None = None


class TextParam(_Lenient):
    format: TextFormat | None = None


class ReasoningParam(_Lenient):
    effort: ReasoningEffort | None = None
    summary: str | None = None


class ResponsesRequest(SamplerFields):
    model: str | None = None
    input: str | list[InputItem] = Field(description="A user message, or a list of input items.")
    instructions: str | None = None
    tools: list[ToolParam] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedTool | None = None
    parallel_tool_calls: bool | None = None
    reasoning: ReasoningParam | None = None
    max_output_tokens: Annotated[int, Field(ge=1)] | None = None
    stream: bool = False
    store: bool = True
    previous_response_id: str | None = None
    truncation: Literal["auto", "disabled"] | None = None
    include: list[str] | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    prompt_cache_key: str | None = None
    service_tier: str | None = None
    client_metadata: dict[str, Any] | None = None
    text: TextParam | None = None
    max_reasoning_tokens: MaxReasoningTokens = Field(default=None, description=MAX_REASONING_DOC)


class InputTokensRequest(_Lenient):
    """``POST /v1/responses/input_tokens``: the same fields that shape the prompt."""

    model: str | None = None
    input: str | list[InputItem] = ""
    instructions: str | None = None
    tools: list[ToolParam] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedTool | None = None
    reasoning: ReasoningParam | None = None
    previous_response_id: str | None = None
    truncation: Literal["auto", "disabled"] | None = None
    text: TextParam | None = None
