"""The typed conversation the Harmony renderer takes (built by the server and by the CLI).

Everything here is already validated plain data: message content is text, tool-call arguments
are JSON text as written, the reasoning effort is one of `REASONING_EFFORTS`. Request shapes
(JSON bodies, pydantic models) are the callers' business: `harmony.chat_json` builds a
`Conversation` from a JSON-shaped chat-completions request, the server from its pydantic model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

REASONING_EFFORTS = ("low", "medium", "high")

Role = Literal["system", "developer", "user", "assistant", "tool"]
ROLES: tuple[str, ...] = get_args(Role)


@dataclass(frozen=True)
class FunctionTool:
    """A function the model may call, in namespace `functions`; `parameters` is a JSON Schema."""

    name: str
    description: str = ""
    parameters: dict | None = None


@dataclass(frozen=True)
class ToolCall:
    """An assistant's call of a function tool. A free-form call (a Responses API `custom` tool,
    offered as a function of one string) carries its raw input, rendered without
    `<|constrain|>json`."""

    name: str
    arguments: str  # JSON text as written; the raw input when free-form
    id: str | None = None
    freeform: bool = False


@dataclass(frozen=True)
class ResponseFormat:
    """A structured-output format (spec harmony.md §4): rendered in the developer message's
    `# Response Formats` section as `## {name}`, `// {description}` and `json.dumps(schema)`."""

    name: str
    schema: dict
    description: str = ""


@dataclass(frozen=True)
class Turn:
    """One chat-level message, its content already plain text (empty = absent)."""

    role: Role
    content: str = ""
    reasoning: str = ""  # assistant: chain of thought of that turn
    tool_calls: tuple[ToolCall, ...] = ()  # assistant only (ignored on other roles)
    tool_call_id: str | None = None  # tool: which call this answers
    name: str | None = None  # tool: the function name when no call id resolves

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"unknown role {self.role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(self.tool_calls, tuple):
            object.__setattr__(self, "tool_calls", tuple(self.tool_calls))


@dataclass(frozen=True)
class Conversation:
    """A chat to render: the turns, the function tools, the reasoning effort and the date of the
    system message (None = no `Current date` line)."""

    turns: tuple[Turn, ...]
    tools: tuple[FunctionTool, ...] = ()
    reasoning_effort: str = "medium"
    date: str | None = None
    response_formats: tuple[ResponseFormat, ...] = ()

    def __post_init__(self) -> None:
        if self.reasoning_effort not in REASONING_EFFORTS:
            raise ValueError(
                f"reasoning_effort must be one of {', '.join(REASONING_EFFORTS)}; got {self.reasoning_effort!r}"
            )
        if not isinstance(self.turns, tuple):
            object.__setattr__(self, "turns", tuple(self.turns))
        if not isinstance(self.tools, tuple):
            object.__setattr__(self, "tools", tuple(self.tools))
        if not isinstance(self.response_formats, tuple):
            object.__setattr__(self, "response_formats", tuple(self.response_formats))
