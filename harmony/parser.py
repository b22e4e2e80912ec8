"""Streaming parser of gpt-oss output (what the model writes after `<|start|>assistant`).

Fed one token id at a time, it returns events: `TextDelta` for each piece of content text as it
arrives (a UTF-8 character split across tokens is held back until whole; invalid bytes become
U+FFFD), `MessageEnd` when a message closes (terminator `end`, `call`, `return`, or None when cut
off), and `ParseProblem` for malformed output. It never raises on any token sequence.

On well-formed output its messages equal openai-harmony's StreamableParser(role=assistant).
Malformed output is handled on tokens, so control-token text never reaches content, channel,
recipient or author (the one structural exception is a content type, which keeps harmony's
spelling `<|constrain|>json` for token 200003 followed by `json`):
- a control token inside content (other than a terminator) is dropped and reported, except
  `<|start|>`, which cuts the message off (MessageEnd with terminator None) and starts a header;
- `<|start|>` inside a header discards that header and starts again;
- a terminator inside a header (a missing `<|message|>`) closes a message whose content is the
  header text after the channel, as openai-harmony's non-strict mode does;
- a header with an unknown role: the message is skipped up to the next `<|start|>`;
- tokens after a terminator other than `<|start|>` are skipped up to the next `<|start|>`.
"""

from __future__ import annotations

import codecs
import enum
from dataclasses import dataclass

from harmony import tokens
from harmony.header import HeaderError, ParsedHeader, parse_header, parse_header_without_message
from harmony.tokenizer import HarmonyTokenizer, load_tokenizer


@dataclass(frozen=True)
class ParsedMessage:
    role: str
    channel: str | None
    recipient: str | None
    content_type: str | None
    content: str
    name: str | None = None  # author name of a tool message (e.g. functions.get_weather)


@dataclass(frozen=True)
class TextDelta:
    channel: str | None
    recipient: str | None
    content_type: str | None
    text: str
    role: str = "assistant"


@dataclass(frozen=True)
class MessageEnd:
    message: ParsedMessage
    terminator: str | None  # "end" | "call" | "return" | None (cut off)


@dataclass(frozen=True)
class ParseProblem:
    detail: str


ParserEvent = TextDelta | MessageEnd | ParseProblem


class _State(enum.Enum):
    HEADER = "header"
    CONTENT = "content"
    EXPECT_START = "expect_start"
    SKIP = "skip"  # after a problem, until the next <|start|>
    FINISHED = "finished"


class StreamingParser:
    """Starts in a header whose role (`assistant`) the prompt already wrote."""

    def __init__(self, tokenizer: HarmonyTokenizer | None = None, role: str | None = "assistant") -> None:
        self._tokenizer = tokenizer or load_tokenizer()
        self.messages: list[ParsedMessage] = []
        self.problems: list[str] = []
        self._state = _State.HEADER
        self._role = role  # role already written for the header in progress
        self._header_tokens: list[int] = []
        self._header: ParsedHeader | None = None
        self._content: list[str] = []
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    # -- the message in progress (None outside content) -------------------------------------------

    @property
    def current_role(self) -> str | None:
        return self._header.role if self._header else None

    @property
    def current_channel(self) -> str | None:
        return self._header.channel if self._header else None

    @property
    def current_recipient(self) -> str | None:
        return self._header.recipient if self._header else None

    @property
    def current_content_type(self) -> str | None:
        return self._header.content_type if self._header else None

    @property
    def current_content(self) -> str:
        return "".join(self._content)

    # -- feeding ----------------------------------------------------------------------------------

    def feed(self, token_id: int) -> list[ParserEvent]:
        events: list[ParserEvent] = []
        token_id = int(token_id)  # numpy / torch scalars from the sampler
        if self._state is _State.FINISHED:
            self._problem(events, f"token {token_id} after the end of the completion ignored")
        elif self._state is _State.HEADER:
            self._feed_header(token_id, events)
        elif self._state is _State.CONTENT:
            self._feed_content(token_id, events)
        elif token_id == tokens.START:
            self._start_header(None)
        elif self._state is _State.EXPECT_START:
            self._problem(
                events, f"token {token_id} where <|start|> was expected: skipped up to the next <|start|>"
            )
            self._state = _State.SKIP
        return events

    def finish(self) -> list[ParserEvent]:
        """End of generation: closes a cut-off message and flushes held-back bytes."""
        events: list[ParserEvent] = []
        if self._state is _State.CONTENT:
            self._close(events, None)
        elif self._state is _State.HEADER:
            self._problem(events, "completion ended inside a message header")
        self._state = _State.FINISHED
        return events

    # -- states -----------------------------------------------------------------------------------

    def _start_header(self, role: str | None) -> None:
        self._state = _State.HEADER
        self._role = role
        self._header_tokens = []

    def _feed_header(self, token_id: int, events: list[ParserEvent]) -> None:
        if token_id == tokens.MESSAGE:
            try:
                header = parse_header(self._header_tokens, self._role, self._tokenizer)
            except HeaderError as exc:
                self._problem(events, f"{exc}: message skipped")
                self._state = _State.SKIP
                return
            for detail in header.problems:
                self._problem(events, detail)
            self._header = header
            self._content = []
            self._utf8.reset()
            self._state = _State.CONTENT
        elif token_id == tokens.START:
            self._problem(events, "<|start|> inside a message header: header discarded")
            self._start_header(None)
        elif token_id in tokens.TERMINATORS:
            self._problem(events, "message header closed without <|message|>")
            self._header_without_message(token_id, events)
        else:
            self._header_tokens.append(token_id)

    def _header_without_message(self, terminator: int, events: list[ParserEvent]) -> None:
        """A terminator before <|message|>: like openai-harmony's non-strict mode, the first
        message (whose role the prompt wrote) keeps its channel and the rest of the header
        becomes its content; a later one is skipped."""
        self._state = _State.EXPECT_START
        if self._role is None or not self._header_tokens:
            return
        header, content = parse_header_without_message(self._header_tokens, self._role, self._tokenizer)
        for detail in header.problems:
            self._problem(events, detail)
        self._header = header
        self._content = []
        self._emit_text(content, events)
        self._close(events, tokens.TERMINATORS[terminator])

    def _feed_content(self, token_id: int, events: list[ParserEvent]) -> None:
        if token_id in tokens.TERMINATORS:
            self._close(events, tokens.TERMINATORS[token_id])
        elif token_id == tokens.START:
            self._problem(events, "<|start|> inside message content: message cut off")
            self._close(events, None)
            self._start_header(None)
        elif self._tokenizer.is_special(token_id):
            self._problem(events, f"special token {token_id} inside message content dropped")
        else:
            self._emit_text(self._utf8.decode(self._tokenizer.token_bytes(token_id)), events)

    def _emit_text(self, text: str, events: list[ParserEvent]) -> None:
        if text and self._header is not None:
            self._content.append(text)
            h = self._header
            events.append(TextDelta(h.channel, h.recipient, h.content_type, text, h.role))

    def _close(self, events: list[ParserEvent], terminator: str | None) -> None:
        self._emit_text(self._utf8.decode(b"", final=True), events)
        self._utf8.reset()
        h = self._header
        assert h is not None
        message = ParsedMessage(
            h.role, h.channel, h.recipient, h.content_type, "".join(self._content), h.name
        )
        self.messages.append(message)
        events.append(MessageEnd(message, terminator))
        self._header = None
        self._content = []
        self._state = _State.EXPECT_START

    def _problem(self, events: list[ParserEvent], detail: str) -> None:
        self.problems.append(detail)
        events.append(ParseProblem(detail))


def parse_completion(token_ids: list[int], tokenizer: HarmonyTokenizer | None = None) -> StreamingParser:
    """Feed a whole completion and finish; read `.messages` and `.problems` from the result."""
    parser = StreamingParser(tokenizer)
    for token_id in token_ids:
        parser.feed(token_id)
    parser.finish()
    return parser
