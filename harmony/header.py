"""Parsing a Harmony message header (the tokens between `<|start|>` and `<|message|>`).

Follows harmony-rs `parse_header_from_string` on well-formed headers: the first `<|channel|>`
word is the channel; the rest is split on ASCII whitespace (a space is inserted before
`<|constrain|>`, so `to=f<|constrain|>json` works); the role word is dropped; a last word `to=X`
is the recipient, else the last word is the content type and the one before it the recipient
(`to=` optional); a single leftover word is a recipient.

Unlike harmony-rs, which decodes control tokens into header text, this works on tokens: special
tokens stay markers, so their text can never end up in a channel, recipient or role. Deviations
on malformed headers, each reported as a problem: extra words are ignored, stray control tokens
are removed, `<|channel|>` without a word gives no channel, and a lone `<|constrain|>json` word
is a content type (harmony-rs would make it the recipient).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from harmony import tokens
from harmony.tokenizer import HarmonyTokenizer

ROLES = ("user", "assistant", "system", "developer", "tool")
# Rust's char::is_whitespace (Unicode White_Space), used by harmony-rs for trim() and the
# channel word; Python's str.isspace differs on U+001C..U+001F.
RUST_WHITESPACE = frozenset(
    "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
    "\u2028\u2029\u202f\u205f\u3000"
)
# split_ascii_whitespace: space, \t, \n, \x0c, \r (not \x0b).
ASCII_WHITESPACE = frozenset(" \t\n\x0c\r")

Unit = str | int  # one character of header text, or a special token id


@dataclass
class ParsedHeader:
    role: str
    name: str | None = None
    channel: str | None = None
    recipient: str | None = None
    content_type: str | None = None
    problems: list[str] = field(default_factory=list)


class HeaderError(ValueError):
    """The header names no usable author: its message cannot be attributed."""


def _units(header_tokens: list[int], tokenizer: HarmonyTokenizer) -> list[Unit]:
    units: list[Unit] = []
    run: list[int] = []
    for token_id in [*header_tokens, None]:
        if token_id is not None and not tokenizer.is_special(token_id):
            run.append(token_id)
            continue
        if run:
            units += list(tokenizer.decode(run))
            run = []
        if token_id is not None:
            units.append(token_id)
    return units


def _trim(units: list[Unit]) -> list[Unit]:
    start, end = 0, len(units)
    while start < end and isinstance(units[start], str) and units[start] in RUST_WHITESPACE:
        start += 1
    while end > start and isinstance(units[end - 1], str) and units[end - 1] in RUST_WHITESPACE:
        end -= 1
    return units[start:end]


def _take_channel(units: list[Unit], problems: list[str]) -> tuple[str | None, list[Unit]]:
    if tokens.CHANNEL not in units:
        return None, units
    at = units.index(tokens.CHANNEL)
    end = at + 1
    while (
        end < len(units)
        and isinstance(units[end], str)
        and units[end] not in RUST_WHITESPACE
        and units[end] != "<"
    ):
        end += 1
    value = "".join(units[at + 1 : end])  # type: ignore[arg-type]
    if not value:
        problems.append("<|channel|> without a channel name in the header")
    return value or None, units[:at] + units[end:]


def _split_words(units: list[Unit]) -> list[list[Unit]]:
    spaced: list[Unit] = []
    for unit in units:
        if unit == tokens.CONSTRAIN:
            spaced.append(" ")
        spaced.append(unit)
    words: list[list[Unit]] = []
    current: list[Unit] = []
    for unit in _trim(spaced):
        if isinstance(unit, str) and unit in ASCII_WHITESPACE:
            if current:
                words.append(current)
                current = []
        else:
            current.append(unit)
    if current:
        words.append(current)
    return words


def _plain(word: list[Unit]) -> str | None:
    """The word's text if it holds no special token."""
    if any(isinstance(u, int) for u in word):
        return None
    return "".join(word)  # type: ignore[arg-type]


def _text_only(word: list[Unit], what: str, problems: list[str]) -> str:
    if any(isinstance(u, int) for u in word):
        problems.append(f"special token in the {what} removed")
    return "".join(u for u in word if isinstance(u, str))


def _content_type(word: list[Unit], problems: list[str]) -> str:
    if word and word[0] == tokens.CONSTRAIN:
        return tokens.CONSTRAIN_TEXT + _text_only(word[1:], "content type", problems)
    return _text_only(word, "content type", problems)


def parse_header(header_tokens: list[int], role: str | None, tokenizer: HarmonyTokenizer) -> ParsedHeader:
    """Parse a header; `role` is the role the prompt already wrote (None: read it from the
    header). Raises HeaderError when no author can be determined."""
    problems: list[str] = []
    channel, units = _take_channel(_units(header_tokens, tokenizer), problems)
    words = _split_words(_trim(units))

    name = None
    if role is None:
        if not words:
            raise HeaderError("message header has no role")
        role_word = _plain(words[0])
        if role_word is None:
            raise HeaderError("special token in the role of a message header")
        if role_word in ROLES:
            role = role_word
            name = role_word if role == "tool" else None  # harmony-rs names a `tool` author "tool"
        elif len(words) > 1 or role_word.startswith("to="):
            role, name = "tool", role_word
            words.pop(0)
        else:
            raise HeaderError(f"unknown role {role_word!r} in a message header")
    if words and _plain(words[0]) == role:
        words.pop(0)

    recipient = content_type = None
    if words:
        count = len(words)
        last = words.pop()
        last_text = "".join(u for u in last if isinstance(u, str))
        if last[0] != tokens.CONSTRAIN and last_text.startswith("to="):
            recipient = _text_only(last, "recipient", problems)[3:]
        elif count == 1 and last[0] == tokens.CONSTRAIN:
            content_type = _content_type(last, problems)  # deviation: never a recipient
        elif count == 1:
            recipient = _text_only(last, "recipient", problems)
        else:
            content_type = _content_type(last, problems)
            raw = _text_only(words.pop(), "recipient", problems)
            recipient = raw[3:] if raw.startswith("to=") else raw
        if words:
            problems.append(f"{len(words)} unexpected word(s) in the message header ignored")
    return ParsedHeader(role, name, channel, recipient, content_type, problems)


def parse_header_without_message(
    header_tokens: list[int], role: str, tokenizer: HarmonyTokenizer
) -> tuple[ParsedHeader, str]:
    """A header closed by a terminator before `<|message|>` (openai-harmony's non-strict mode):
    the channel is kept and the remaining header words, joined by spaces, become the content."""
    problems: list[str] = []
    channel, units = _take_channel(_units(header_tokens, tokenizer), problems)
    words = _split_words(_trim(units))
    if words and _plain(words[0]) == role:
        words.pop(0)
    if any(isinstance(u, int) for word in words for u in word):
        problems.append("special token in a header without <|message|> removed")
    content = " ".join(w for w in ("".join(u for u in word if isinstance(u, str)) for word in words) if w)
    return ParsedHeader(role, channel=channel, problems=problems), content
