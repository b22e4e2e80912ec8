"""Model output tokens -> chat-completions fields (spec harmony.md §10-§11.8).

One ``HarmonyOutputMapper`` per choice, fed token by token; each call returns an
``OutputDelta`` (what a streaming chunk carries). Concatenating every delta gives exactly the
non-streaming message, so both paths share this code:
- analysis, and any message addressed to a non-function recipient (a built-in tool call the
  client cannot run) -> ``reasoning``;
- final, recipient-less commentary (a preamble) and channel-less text -> ``content``;
- recipient ``functions.NAME`` -> a tool call (id ``call_...``, name, raw argument text);
- a new message in a field that already holds text is separated by ``\n``;
- a message the model writes under another author (a made-up user, system or tool turn) is
  not the assistant speaking: its text goes nowhere (and is counted as a problem).
The parser drops control tokens from content, so special-token text never reaches a field.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

from engine.types import TokenLogprob
from harmony.parser import MessageEnd, ParseProblem, StreamingParser, TextDelta
from harmony.tokenizer import HarmonyTokenizer

FUNCTIONS_PREFIX = "functions."


def new_tool_call_id() -> str:
    return "call_" + secrets.token_hex(12)


@dataclass
class ToolCallDelta:
    index: int
    arguments: str
    id: str | None = None  # set on the first delta of a call
    name: str | None = None


@dataclass
class OutputDelta:
    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)
    content_logprobs: list[TokenLogprob] = field(default_factory=list)

    def is_empty(self) -> bool:
        return not (self.reasoning or self.content or self.tool_calls)

    def extend(self, other: OutputDelta) -> None:
        self.reasoning += other.reasoning
        self.content += other.content
        self.content_logprobs += other.content_logprobs
        for call in other.tool_calls:
            last = self.tool_calls[-1] if self.tool_calls else None
            if last is not None and last.index == call.index and call.id is None:
                last.arguments += call.arguments
            else:
                self.tool_calls.append(ToolCallDelta(call.index, call.arguments, call.id, call.name))


@dataclass
class ToolCallState:
    id: str
    name: str
    arguments: str = ""


def _field_of(channel: str | None, recipient: str | None) -> str:
    if recipient:
        return "tool" if recipient.startswith(FUNCTIONS_PREFIX) else "reasoning"
    if channel in (None, "final", "commentary"):
        return "content"
    return "reasoning"  # analysis, or a channel the model made up


class HarmonyOutputMapper:
    def __init__(self, tokenizer: HarmonyTokenizer) -> None:
        self._parser = StreamingParser(tokenizer)
        self.tool_calls: list[ToolCallState] = []
        self.reasoning_tokens = 0
        self.problems: list[str] = []
        self.last_terminator: str | None = None
        self._has_text = {"reasoning": False, "content": False}
        self._message_field: str | None = None  # field of the message in progress
        self._message_call: ToolCallState | None = None
        self._in_analysis = False

    def feed(self, token_id: int, logprob: TokenLogprob | None = None) -> OutputDelta:
        counted_as_reasoning = self._in_analysis
        delta = self._apply(self._parser.feed(token_id), logprob)
        if counted_as_reasoning or self._in_analysis:
            self.reasoning_tokens += 1
        return delta

    def finish(self) -> OutputDelta:
        return self._apply(self._parser.finish(), None)

    def _apply(self, events: list, logprob: TokenLogprob | None) -> OutputDelta:
        delta = OutputDelta()
        for event in events:
            if isinstance(event, TextDelta):
                self._on_text(event, logprob, delta)
                logprob = None  # one token's logprob goes to its first piece of text
            elif isinstance(event, MessageEnd):
                self._on_end(event, delta)
            elif isinstance(event, ParseProblem):
                self.problems.append(event.detail)
        return delta

    def _start_message(self, channel: str | None, recipient: str | None, delta: OutputDelta) -> None:
        kind = _field_of(channel, recipient)
        self._message_field = kind
        self._in_analysis = kind == "reasoning"
        if kind == "tool":
            assert recipient is not None
            call = ToolCallState(new_tool_call_id(), recipient[len(FUNCTIONS_PREFIX) :])
            self._message_call = call
            self.tool_calls.append(call)
            delta.tool_calls.append(ToolCallDelta(len(self.tool_calls) - 1, "", call.id, call.name))
        elif self._has_text[kind]:
            setattr(delta, kind, getattr(delta, kind) + "\n")

    def _on_text(self, event: TextDelta, logprob: TokenLogprob | None, delta: OutputDelta) -> None:
        if event.role != "assistant":
            if self._message_field is None:
                self._message_field = "dropped"
                self.problems.append(f"text of a message by {event.role!r} dropped")
            return
        if self._message_field is None:
            self._start_message(event.channel, event.recipient, delta)
        kind = self._message_field
        if kind == "tool":
            assert self._message_call is not None
            self._message_call.arguments += event.text
            delta.tool_calls.append(ToolCallDelta(len(self.tool_calls) - 1, event.text))
            return
        assert kind is not None
        setattr(delta, kind, getattr(delta, kind) + event.text)
        self._has_text[kind] = True
        if kind == "content" and logprob is not None:
            delta.content_logprobs.append(logprob)

    def _on_end(self, event: MessageEnd, delta: OutputDelta) -> None:
        message = event.message
        if (
            self._message_field is None
            and message.role == "assistant"
            and message.recipient
            and message.recipient.startswith(FUNCTIONS_PREFIX)
        ):
            self._start_message(message.channel, message.recipient, delta)  # a call with empty arguments
        self._message_field = None
        self._message_call = None
        self._in_analysis = False
        self.last_terminator = event.terminator

    @property
    def ended_in_call(self) -> bool:
        return self.last_terminator == "call" and bool(self.tool_calls)
