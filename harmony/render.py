"""A typed `Conversation` -> Harmony prompt token ids (spec harmony.md §11, our contract).

Rules, in order:
1. A system message: identity, knowledge cutoff 2024-06, `Current date` when the conversation
   has a date, `Reasoning: {effort}` and the valid channels (plus the line sending function
   calls to the commentary channel when there are tools).
2. A developer message, only when there are instructions or function tools: instructions are
   the contents of the system/developer turns at the start of the conversation, joined by a
   blank line; tools are `conversation.tools`, in order, in namespace `functions`; then
   `conversation.response_formats` as `# Response Formats` (also alone: a developer message).
3. A system/developer turn later in the conversation becomes a developer message in place
   holding only `# Instructions` and its text. System/developer turns with empty content are
   ignored (and do not end the leading run).
4. user -> a user message.
5. assistant -> `reasoning` as an `analysis` message; then with `tool_calls`: non-empty content
   as a `commentary` preamble, and per call a `commentary` message to `functions.NAME` with
   content type `<|constrain|>json` (none for a free-form call) and the arguments as content
   (ends in `<|call|>`); without tool calls a non-empty content is the `final` answer. Empty strings are absent.
6. tool -> a message from `functions.NAME` to `assistant` on `commentary`; NAME comes from the
   latest earlier assistant tool call with the same id as the turn's `tool_call_id`, else from
   the turn's `name`. A tool turn that resolves to no name is a RenderError (the only error of
   rendering: the input is typed, its shape was checked by whoever built it).
7. Analysis messages positioned before the last assistant `final` message are dropped (the
   chain of thought of finished turns); analysis after it (a tool loop in progress) is kept.
   Then `<|start|>assistant` is appended.

The JSON-shaped chat-completions request is turned into a `Conversation` by
`harmony.chat_json` (shape checks, content parts, `reasoning_effort`, `tool_choice`...).
"""

from __future__ import annotations

from dataclasses import dataclass

from harmony import tokens
from harmony.conversation import Conversation, Turn
from harmony.messages import (
    HarmonyMessage,
    ToolNamespace,
    developer_content,
    render_for_completion,
    system_content,
)
from harmony.tokenizer import HarmonyTokenizer, load_tokenizer


class RenderError(ValueError):
    """The conversation cannot be rendered (a 400). `index` is the offending turn's index in
    `conversation.turns` (the request's `messages[index]`) and `field` the field of that turn;
    `param` spells them as `messages[index].field`. Callers that check request shapes may give
    a ready `param` instead (e.g. `tools[0].type`)."""

    def __init__(
        self,
        message: str,
        param: str | None = None,
        *,
        index: int | None = None,
        field: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.index = index
        self.field = field
        self._param = param

    @property
    def param(self) -> str | None:
        if self._param is not None:
            return self._param
        if self.index is None:
            return self.field
        return f"messages[{self.index}]" + (f".{self.field}" if self.field else "")


@dataclass(frozen=True)
class RenderedPrompt:
    token_ids: list[int]
    stop_token_ids: list[int]
    text: str


def _assistant_messages(turn: Turn) -> list[HarmonyMessage]:
    out = []
    if turn.reasoning:
        out.append(HarmonyMessage("assistant", turn.reasoning, channel="analysis"))
    if not turn.tool_calls:
        if turn.content:
            out.append(HarmonyMessage("assistant", turn.content, channel="final"))
        return out
    if turn.content:
        out.append(HarmonyMessage("assistant", turn.content, channel="commentary"))
    for call in turn.tool_calls:
        out.append(
            HarmonyMessage(
                "assistant",
                call.arguments,
                channel="commentary",
                recipient=f"functions.{call.name}",
                content_type=None if call.freeform else tokens.CONSTRAINED_JSON,
            )
        )
    return out


def _tool_name(turn: Turn, index: int, call_names: dict[str, str]) -> str:
    if turn.tool_call_id is not None and turn.tool_call_id in call_names:
        return call_names[turn.tool_call_id]
    if turn.name:
        return turn.name
    raise RenderError(
        f"cannot resolve the tool of this message: no earlier tool call has id {turn.tool_call_id!r} "
        "and it has no name",
        index=index,
        field="tool_call_id",
    )


def drop_finished_analysis(messages: list[HarmonyMessage]) -> list[HarmonyMessage]:
    """Rule 7: drop analysis before the last assistant `final`; keep analysis after it."""
    last_final = max(
        (i for i, m in enumerate(messages) if m.role == "assistant" and m.channel == "final"), default=-1
    )
    return [m for i, m in enumerate(messages) if not (i < last_final and m.channel == "analysis")]


def harmony_messages(conversation: Conversation) -> list[HarmonyMessage]:
    """The Harmony messages of a conversation (rules 1-7 of the module docstring), without the
    trailing `<|start|>assistant`. Raises RenderError for an unresolvable tool turn."""
    instructions: list[str] = []
    body: list[HarmonyMessage] = []
    call_names: dict[str, str] = {}
    leading = True
    for index, turn in enumerate(conversation.turns):
        if turn.role in ("system", "developer"):
            if turn.content and leading:
                instructions.append(turn.content)
            elif turn.content:
                body.append(HarmonyMessage("developer", developer_content(turn.content)))
            continue
        leading = False
        if turn.role == "user":
            body.append(HarmonyMessage("user", turn.content))
        elif turn.role == "assistant":
            body += _assistant_messages(turn)
            call_names.update((call.id, call.name) for call in turn.tool_calls if call.id is not None)
        else:  # tool (Turn checks the role)
            body.append(
                HarmonyMessage(
                    "tool",
                    turn.content,
                    name=f"functions.{_tool_name(turn, index, call_names)}",
                    channel="commentary",
                    recipient="assistant",
                )
            )

    tools = conversation.tools
    head = [
        HarmonyMessage(
            "system",
            system_content(
                reasoning_effort=conversation.reasoning_effort,
                conversation_start_date=conversation.date,
                has_function_tools=bool(tools),
            ),
        )
    ]
    formats = conversation.response_formats
    if instructions or tools or formats:
        namespaces = [ToolNamespace("functions", tools)] if tools else []
        head.append(
            HarmonyMessage(
                "developer", developer_content("\n\n".join(instructions) or None, namespaces, formats)
            )
        )
    return head + drop_finished_analysis(body)


def render_conversation(
    conversation: Conversation, tokenizer: HarmonyTokenizer | None = None
) -> RenderedPrompt:
    """Prompt token ids for a conversation, ending in `<|start|>assistant`, and the stop ids to
    sample with (`<|return|>`, `<|call|>`). Raises RenderError (see module doc, rule 6)."""
    tokenizer = tokenizer or load_tokenizer()
    token_ids = render_for_completion(harmony_messages(conversation), tokenizer)
    return RenderedPrompt(
        token_ids=token_ids,
        stop_token_ids=list(tokens.STOP_TOKEN_IDS),
        text=tokenizer.decode_with_specials(token_ids),
    )
