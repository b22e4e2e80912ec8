"""A Responses request's meaning: its items (with any stored conversation before them), the tools
it offers, and the typed Harmony conversation they render to.

Items map to the same chat-level turns a chat request makes, so a Responses conversation and its
chat-completions equivalent render to the same tokens:
- ``instructions``, and ``system``/``developer`` messages -> instruction turns (as chat's system
  messages: leading ones go to the developer message);
- consecutive assistant-side items (``reasoning``, assistant ``message``, ``function_call``,
  ``custom_tool_call``) form one assistant turn: reasoning, then text (a preamble when calls
  follow), then the calls;
- ``function_call_output`` / ``custom_tool_call_output`` -> a tool turn answering its ``call_id``;
- a reasoning item sent back with only ``encrypted_content`` is opened with the server's key.
The renderer's rule then keeps analysis during a tool loop and drops it before the last answer.

Tools: every offered tool is a Harmony function in namespace ``functions``, the one namespace
gpt-oss was trained to call. A ``custom`` (free-form) tool is a function of one string, which
openai-harmony renders as ``(_: string) => any``; its calls carry raw text, with no
``<|constrain|>json``. A tool inside a ``namespace`` group keeps its own name, unless that name
is taken, then it is ``{namespace}__{name}``; ``Offered.names`` maps each prompt name back to
the API's (name, namespace, kind), for the calls the model writes and the items clients replay.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

from pydantic import TypeAdapter

from harmony.conversation import Conversation, FunctionTool, ResponseFormat, ToolCall, Turn
from server.errors import APIError
from server.guided_grammar import CallRule, FinalRule
from server.reasoning_seal import ReasoningSealer, SealError
from server.responses_protocol import (
    CustomToolCallItem,
    CustomToolParam,
    FunctionCallItem,
    FunctionCallOutputItem,
    FunctionToolParam,
    InputItem,
    InputText,
    MessageItem,
    NamedTool,
    NamespaceTool,
    OtherItem,
    OtherPart,
    ReasoningItem,
    ResponsesRequest,
)
from server.state import ServerState
from server.structured import TurnRules, apply_choice, call_rule, json_format

logger = logging.getLogger("server.responses")
ITEMS = TypeAdapter(list[InputItem])
ENCRYPTED_REASONING = "reasoning.encrypted_content"


FREEFORM_PARAMETERS = {"type": "string"}


@dataclass(frozen=True)
class ToolName:
    """A tool as the API names it (the prompt may name it otherwise, see the module doc)."""

    name: str
    namespace: str | None = None
    custom: bool = False


@dataclass
class Offered:
    tools: tuple[FunctionTool, ...] = ()
    names: dict[str, ToolName] = field(default_factory=dict)  # prompt name -> API name
    declared: dict[str, FunctionToolParam | CustomToolParam] = field(default_factory=dict)  # prompt name ->
    dropped: list[str] = field(default_factory=list)  # hosted tools this server does not run

    def prompt_name(self, name: str, namespace: str | None) -> str:
        """The prompt name of a replayed call's tool (its own name when it is not offered)."""
        for prompt, tool in self.names.items():
            if (tool.name, tool.namespace) == (name, namespace):
                return prompt
        return name

    def _add(self, tool: FunctionToolParam | CustomToolParam, namespace: str | None, taken: set[str]) -> None:
        name = tool.name
        if namespace and (name in self.names or name in taken):
            name = f"{namespace}__{tool.name}"
        if name in self.names:
            return  # a repeated name: the first declaration stands
        custom = isinstance(tool, CustomToolParam)
        self.names[name] = ToolName(tool.name, namespace, custom)
        self.declared[name] = tool
        parameters = FREEFORM_PARAMETERS if custom else tool.parameters  # type: ignore[union-attr]
        self.tools += (FunctionTool(name, tool.description or "", parameters),)


def request_items(body: ResponsesRequest) -> list[InputItem]:
    if isinstance(body.input, str):
        return [MessageItem(role="user", content=body.input)]
    return list(body.input)


def offered_tools(body: ResponsesRequest) -> Offered:
    """Function and custom tools (flat, or grouped in namespaces) are offered; hosted ones are
    dropped; ``tool_choice: none`` offers nothing."""
    offered = Offered()
    grouped: list[tuple[FunctionToolParam | CustomToolParam, str | None]] = []
    for tool in body.tools or ():
        if isinstance(tool, FunctionToolParam | CustomToolParam):
            grouped.append((tool, None))
        elif isinstance(tool, NamespaceTool):
            grouped += [(inner, tool.name or None) for inner in tool.tools]
        else:
            offered.dropped.append(tool.type)
    if offered.dropped:
        logger.info("hosted tools not run here, not offered to the model: %s", ", ".join(offered.dropped))
    if body.tool_choice != "none":
        flat = {tool.name for tool, namespace in grouped if namespace is None}  # these keep their names
        for tool, namespace in grouped:
            offered._add(tool, namespace, flat)
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


def turns_of(items: list[InputItem], sealer: ReasoningSealer, offered: Offered) -> list[Turn]:
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
        assistant_side = isinstance(item, ReasoningItem | FunctionCallItem | CustomToolCallItem) or (
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
        elif isinstance(item, FunctionCallItem | CustomToolCallItem):
            pending = pending or {"reasoning": "", "content": "", "calls": []}
            name = offered.prompt_name(item.name, item.namespace)
            if isinstance(item, CustomToolCallItem):
                pending["calls"].append(ToolCall(name, item.input, item.call_id, freeform=True))
            else:
                pending["calls"].append(ToolCall(name, item.arguments, item.call_id))
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


def text_format(body: ResponsesRequest) -> tuple[FinalRule, ResponseFormat | None]:
    fmt = body.text.format if body.text else None
    if fmt is None or fmt.type == "text":
        return FinalRule(), None
    return json_format(fmt.type, fmt.schema_, fmt.name, fmt.description, "text.format")


def _custom_body(tool: CustomToolParam) -> tuple[str, str]:
    fmt = tool.format or {}
    if fmt.get("type") == "grammar":
        syntax, definition = fmt.get("syntax"), fmt.get("definition")
        if syntax not in ("lark", "regex") or not isinstance(definition, str):
            raise APIError(400, "a custom tool grammar needs `syntax` lark or regex and a `definition`",
                           param="tools")  # fmt: skip
        return syntax, definition
    return "text", ""


def turn_rules(body: ResponsesRequest, offered: Offered) -> TurnRules:
    """The structured-output rules of a Responses turn (``server.structured``); ``strict`` is
    true unless a function says false, as on OpenAI's Responses API."""
    final, _ = text_format(body)

    def rule(name: str, tool: FunctionToolParam | CustomToolParam, forced: bool) -> CallRule:
        if isinstance(tool, CustomToolParam):
            return CallRule(name, _custom_body(tool))
        return call_rule(name, tool.parameters, forced or tool.strict is not False)

    calls = [rule(name, tool, False) for name, tool in offered.declared.items()]
    rules = TurnRules.of(final, calls, format_param="text.format")
    choice = body.tool_choice
    if isinstance(choice, NamedTool):
        if choice.type not in ("function", "custom") or not choice.name:
            raise APIError(400, f"tool_choice of type `{choice.type}` is not supported", param="tool_choice")
        namespace = getattr(choice, "namespace", None)
        choice = offered.prompt_name(choice.name, namespace)  # type: ignore[assignment]
    apply_choice(rules, choice, [rule(name, tool, True) for name, tool in offered.declared.items()])
    return rules


def conversation_of(
    body: ResponsesRequest, items: list[InputItem], offered: Offered, state: ServerState
) -> Conversation:
    head = [Turn("developer", body.instructions)] if body.instructions else []
    _, response_format = text_format(body)
    effort = body.reasoning.effort if body.reasoning and body.reasoning.effort else None
    return Conversation(
        turns=tuple(head + turns_of(items, state.sealer, offered)),
        tools=offered.tools,
        response_formats=(response_format,) if response_format else (),
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
