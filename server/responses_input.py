"""A Responses request's meaning: its items (with any stored conversation before them), the tools
it offers, and the typed Harmony conversation they render to.

Items map to the same chat-level turns a chat request makes, so a Responses conversation and its
chat-completions equivalent render to the same tokens:
- ``instructions``, and ``system``/``developer`` messages -> instruction turns (as chat's system
  messages: leading ones go to the developer message);
- consecutive assistant-side items (``reasoning``, assistant ``message``, ``function_call``) form
  one assistant turn: reasoning, then text (a preamble when calls follow), then the calls;
- ``function_call_output`` -> a tool turn answering its ``call_id``;
- a reasoning item sent back with only ``encrypted_content`` is opened with the server's key.
The renderer's rule then keeps analysis during a tool loop and drops it before the last answer.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

from pydantic import TypeAdapter

from harmony.conversation import Conversation, FunctionTool, ToolCall, Turn
from server.errors import APIError
from server.reasoning_seal import ReasoningSealer, SealError
from server.responses_protocol import (
    FunctionCallItem,
    FunctionCallOutputItem,
    FunctionToolParam,
    InputItem,
    InputText,
    MessageItem,
    NamespaceTool,
    OtherItem,
    OtherPart,
    ReasoningItem,
    ResponsesRequest,
)
from server.state import ServerState

logger = logging.getLogger("server.responses")
ITEMS = TypeAdapter(list[InputItem])
ENCRYPTED_REASONING = "reasoning.encrypted_content"


@dataclass
class Offered:
    tools: tuple[FunctionTool, ...] = ()
    dropped: list[str] = field(default_factory=list)  # hosted tools this server does not run


def request_items(body: ResponsesRequest) -> list[InputItem]:
    if isinstance(body.input, str):
        return [MessageItem(role="user", content=body.input)]
    return list(body.input)


def offered_tools(body: ResponsesRequest) -> Offered:
    """Function tools (flat, or grouped in namespaces) are offered; hosted ones are dropped."""
    offered = Offered()
    if body.tool_choice == "required" or (
        body.tool_choice is not None and not isinstance(body.tool_choice, str)
    ):
        raise APIError(
            400,
            "tool_choice `required` or a named tool needs constrained decoding, which this server does not "
            "support yet; use `auto` or `none`.",
            param="tool_choice",
            code="unsupported_tool_choice",
        )
    functions: list[FunctionToolParam] = []
    for tool in body.tools or ():
        if isinstance(tool, FunctionToolParam):
            functions.append(tool)
        elif isinstance(tool, NamespaceTool):
            functions += tool.tools
        else:
            offered.dropped.append(tool.type)
    if offered.dropped:
        logger.info("hosted tools not run here, not offered to the model: %s", ", ".join(offered.dropped))
    if body.tool_choice != "none":
        offered.tools = tuple(FunctionTool(t.name, t.description or "", t.parameters) for t in functions)
    return offered


def _text(content: str | list[InputText | OtherPart], param: str) -> str:
    if isinstance(content, str):
        return content
    for j, part in enumerate(content):
        if isinstance(part, OtherPart):
            raise APIError(
                400,
                f"content parts of type `{part.type}` are not supported (text only)",
                param=f"{param}[{j}]",
            )
    return "".join(part.text for part in content)  # type: ignore[union-attr]


def _reasoning_text(item: ReasoningItem, index: int, sealer: ReasoningSealer) -> str:
    if item.content:
        return "".join(part.text for part in item.content)
    if item.encrypted_content:
        try:
            return sealer.open(item.encrypted_content)
        except SealError as exc:
            raise APIError(
                400, f"encrypted reasoning cannot be opened: {exc}", param=f"input[{index}].encrypted_content"
            ) from exc
    return ""


def turns_of(items: list[InputItem], sealer: ReasoningSealer) -> list[Turn]:
    turns: list[Turn] = []
    pending: dict | None = None  # the assistant turn being gathered

    def flush() -> None:
        nonlocal pending
        if pending is not None:
            turns.append(Turn("assistant", pending["content"], pending["reasoning"], tuple(pending["calls"])))
            pending = None

    for i, item in enumerate(items):
        if isinstance(item, OtherItem):
            raise APIError(
                400, f"input items of type `{item.type}` are not supported", param=f"input[{i}].type"
            )
        assistant_side = isinstance(item, ReasoningItem | FunctionCallItem) or (
            isinstance(item, MessageItem) and item.role == "assistant"
        )
        if not assistant_side:
            flush()
        if isinstance(item, ReasoningItem):
            if pending is not None and (pending["content"] or pending["calls"]):
                flush()
            pending = pending or {"reasoning": "", "content": "", "calls": []}
            text = _reasoning_text(item, i, sealer)
            pending["reasoning"] = "\n".join(t for t in (pending["reasoning"], text) if t)
        elif isinstance(item, FunctionCallItem):
            pending = pending or {"reasoning": "", "content": "", "calls": []}
            pending["calls"].append(ToolCall(item.name, item.arguments, item.call_id))
        elif isinstance(item, FunctionCallOutputItem):
            turns.append(Turn("tool", _text(item.output, f"input[{i}].output"), tool_call_id=item.call_id))
        elif item.role == "assistant":
            if pending is not None and (pending["content"] or pending["calls"]):
                flush()
            pending = pending or {"reasoning": "", "content": "", "calls": []}
            pending["content"] = _text(item.content, f"input[{i}].content")
        else:
            turns.append(Turn(item.role, _text(item.content, f"input[{i}].content")))
    flush()
    return turns


def conversation_of(
    body: ResponsesRequest, items: list[InputItem], tools: tuple[FunctionTool, ...], state: ServerState
) -> Conversation:
    head = [Turn("developer", body.instructions)] if body.instructions else []
    effort = body.reasoning.effort if body.reasoning and body.reasoning.effort else None
    return Conversation(
        turns=tuple(head + turns_of(items, state.sealer)),
        tools=tools,
        reasoning_effort=effort or state.settings.default_reasoning_effort,
        date=state.prompt_date(),
    )


async def stored_items(previous_id: str, state: ServerState) -> list[InputItem]:
    """The whole conversation of a stored response: its input items, then its output."""
    record = await state.require_response_store().get(previous_id)
    if record is None:
        raise APIError(
            404,
            f"Response `{previous_id}` is not in the store: unknown, deleted, expired or evicted.",
            param="previous_response_id",
            code="response_not_found",
        )
    data = json.loads(record)
    return ITEMS.validate_python(data["items"] + data["response"]["output"])
