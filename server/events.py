"""The API-neutral events of one HTTP request's generation (what every API adapter maps).

Per choice, in order: text and tool-call events as the model writes them, then exactly one
``Finished``. After every choice finished: one ``Usage``. A failure at any point ends the
stream with one ``Failed`` instead (nothing follows it). Each API adapter maps these events
to its wire shapes; its non-streaming body is the fold of the same events.

``message`` numbers the model's Harmony messages within a choice (0, 1, ...): text events
with a new number start a new message (the Responses API makes each its own output item;
chat joins them). Raw completions have one message, 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from engine.types import TokenLogprob
from server.errors import APIError

FinishReason = Literal["stop", "length", "tool_calls"]


@dataclass(frozen=True)
class PlacedLogprob:
    """A generated token's logprob and where its text starts in the choice's content."""

    logprob: TokenLogprob
    text_offset: int


@dataclass(frozen=True)
class ReasoningText:
    choice: int
    message: int
    text: str


@dataclass(frozen=True)
class ContentText:
    choice: int
    message: int
    text: str
    logprobs: tuple[PlacedLogprob, ...] = ()
    preamble: bool = False  # written on the commentary channel (before tool calls), not as the answer


@dataclass(frozen=True)
class ToolCallBegun:
    choice: int
    message: int
    call: int  # index of the call within the choice
    id: str
    name: str


@dataclass(frozen=True)
class ToolCallArguments:
    choice: int
    call: int
    text: str


@dataclass(frozen=True)
class ToolCallEnded:
    choice: int
    call: int
    arguments: str  # the whole argument text, as written


@dataclass(frozen=True)
class Finished:
    choice: int
    reason: FinishReason
    stop_reason: int | str | None = None  # the stop token id or stop string, when one ended it


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    reasoning_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Failed:
    error: APIError


ChoiceEvent = ReasoningText | ContentText | ToolCallBegun | ToolCallArguments | ToolCallEnded | Finished
Event = ChoiceEvent | Usage | Failed


def finish_reason(
    engine_reason: str | None, *, stop_string_matched: bool, ended_in_tool_call: bool
) -> FinishReason:
    """The one decision of a choice's finish reason: a stop string, then the token limit, then
    a turn that ended by calling a tool, else a plain stop."""
    if stop_string_matched:
        return "stop"
    if engine_reason == "length":
        return "length"
    if ended_in_tool_call:
        return "tool_calls"
    return "stop"
