"""One choice's model output, token by token, as API-neutral events (spec harmony.md §10-§11.8).

- analysis, and any message addressed to a non-function recipient (a built-in tool call the
  client cannot run) -> ``ReasoningText``;
- final, recipient-less commentary (a preamble) and channel-less text -> ``ContentText``;
- recipient ``functions.NAME`` -> ``ToolCallBegun`` (fresh ``call_...`` id), its raw argument
  text as ``ToolCallArguments``, then ``ToolCallEnded``;
- a message the model writes under another author (a made-up user, system or tool turn) is not
  the assistant speaking: its text goes nowhere (counted as a parse problem).
The parser drops control tokens from content, so special-token text never reaches an event.
Stop strings apply to the content (``join`` separates messages of one kind, as chat joins them,
and takes part in the match); a match ends the choice at once.
"""

from __future__ import annotations

import secrets
from typing import Literal

from engine.types import RequestOutput, TokenLogprob
from harmony import tokens
from harmony.parser import MessageEnd, ParseProblem, StreamingParser, TextDelta
from harmony.tokenizer import HarmonyTokenizer
from server.events import (
    ChoiceEvent,
    ContentText,
    Finished,
    PlacedLogprob,
    ReasoningText,
    ToolCallArguments,
    ToolCallBegun,
    ToolCallEnded,
    finish_reason,
)
from server.stop_strings import StopStringFilter

FUNCTIONS_PREFIX = "functions."
Kind = Literal["reasoning", "content", "tool", "dropped"]


def new_tool_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def _kind_of(channel: str | None, recipient: str | None) -> Kind:
    if recipient:
        return "tool" if recipient.startswith(FUNCTIONS_PREFIX) else "reasoning"
    if channel in (None, "final", "commentary"):
        return "content"
    return "reasoning"  # analysis, or a channel the model made up


class HarmonyAssembler:
    def __init__(
        self,
        choice: int,
        tokenizer: HarmonyTokenizer,
        stops: list[str],
        *,
        include_reasoning: bool = True,
        join: str = "\n",
    ) -> None:
        self.choice = choice
        self._parser = StreamingParser(tokenizer)
        self._stop = StopStringFilter(stops)
        self._include_reasoning = include_reasoning
        self._join = join
        self.reasoning_tokens = 0
        self.problems: list[str] = []
        self.calls: list[tuple[str, str]] = []  # (name, arguments) of each call so far
        self._text = {"reasoning": "", "content": ""}  # everything emitted, for the request log
        self._message = -1
        self._kind: Kind | None = None  # kind of the message in progress (None between messages)
        self._preamble = False  # the message in progress is on the commentary channel
        self._last_terminator: str | None = None

    @property
    def stopped(self) -> bool:
        """A stop string matched: the choice is over (its engine request can be aborted)."""
        return self._stop.stopped is not None

    def summary(self) -> str:
        """What the choice said, for ``--log-requests``."""
        return f"reasoning={self._text['reasoning']!r} content={self._text['content']!r} tool_calls={self.calls!r}"

    def feed(self, out: RequestOutput) -> list[ChoiceEvent]:
        events: list[ChoiceEvent] = []
        logprobs = out.logprobs or [None] * len(out.token_ids)
        for token_id, logprob in zip(out.token_ids, logprobs, strict=False):
            in_analysis = self._kind == "reasoning"
            self._apply(self._parser.feed(token_id), logprob, events)
            if in_analysis or self._kind == "reasoning":
                self.reasoning_tokens += 1
            if self.stopped:
                events.append(Finished(self.choice, "stop", self._stop.stopped))
                return events
        if out.finished:
            self._apply(self._parser.finish(), None, events)
            self._content(self._stop.flush(), None, events)
            ended_in_call = self._last_terminator == "call" or out.stop_token_id == tokens.CALL
            reason = finish_reason(
                out.finish_reason,
                stop_string_matched=False,
                ended_in_tool_call=out.finish_reason == "stop" and ended_in_call and bool(self.calls),
            )
            events.append(Finished(self.choice, reason))
        return events

    # -- parser events -> choice events ------------------------------------------------------

    def _apply(self, parsed: list, logprob: TokenLogprob | None, events: list[ChoiceEvent]) -> None:
        for event in parsed:
            if isinstance(event, TextDelta):
                self._on_text(event, logprob, events)
                logprob = None  # one token's logprob goes to its first piece of text
            elif isinstance(event, MessageEnd):
                self._on_end(event, events)
            elif isinstance(event, ParseProblem):
                self.problems.append(event.detail)

    def _start(self, channel: str | None, recipient: str | None, events: list[ChoiceEvent]) -> None:
        self._kind = _kind_of(channel, recipient)
        self._preamble = channel == "commentary"
        self._message += 1
        if self._kind == "tool":
            assert recipient is not None
            name = recipient[len(FUNCTIONS_PREFIX) :]
            self.calls.append((name, ""))
            events.append(
                ToolCallBegun(self.choice, self._message, len(self.calls) - 1, new_tool_call_id(), name)
            )

    def _on_text(self, event: TextDelta, logprob: TokenLogprob | None, events: list[ChoiceEvent]) -> None:
        if self._kind is None:
            if event.role != "assistant":
                self._kind = "dropped"
                self.problems.append(f"text of a message by {event.role!r} dropped")
                return
            self._start(event.channel, event.recipient, events)
            if self._text.get(self._kind):
                self._emit(self._kind, self._join, None, events)
        self._emit(self._kind, event.text, logprob, events)

    def _emit(
        self, kind: Kind | None, text: str, logprob: TokenLogprob | None, events: list[ChoiceEvent]
    ) -> None:
        if kind == "tool":
            name, arguments = self.calls[-1]
            self.calls[-1] = (name, arguments + text)
            events.append(ToolCallArguments(self.choice, len(self.calls) - 1, text))
        elif kind == "reasoning":
            self._text["reasoning"] += text
            if self._include_reasoning:
                events.append(ReasoningText(self.choice, self._message, text))
        elif kind == "content":
            self._content(self._stop.feed(text) if self._stop.active else text, logprob, events)

    def _content(self, text: str, logprob: TokenLogprob | None, events: list[ChoiceEvent]) -> None:
        placed = () if logprob is None else (PlacedLogprob(logprob, len(self._text["content"])),)
        if text or placed:
            self._text["content"] += text
            events.append(ContentText(self.choice, max(self._message, 0), text, placed, self._preamble))

    def _on_end(self, event: MessageEnd, events: list[ChoiceEvent]) -> None:
        message = event.message
        if (
            self._kind is None
            and message.role == "assistant"
            and (message.recipient or "").startswith(FUNCTIONS_PREFIX)
        ):
            self._start(message.channel, message.recipient, events)  # a call with empty arguments
        if self._kind == "tool":
            events.append(ToolCallEnded(self.choice, len(self.calls) - 1, self.calls[-1][1]))
        self._kind = None
        self._last_terminator = event.terminator
