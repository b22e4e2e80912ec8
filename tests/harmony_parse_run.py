"""What the parser tests share: feeding a completion token by token, with the stream's
invariants checked on every run, and its messages, terminators and problems."""

from __future__ import annotations

from harmony.parser import MessageEnd, ParseProblem, StreamingParser, TextDelta
from harmony.tokenizer import load_tokenizer

TOK = load_tokenizer()


def run(ids: list[int]):
    """Feed ids one at a time; return (parser, events) after checking the stream invariants."""
    parser = StreamingParser()
    events = []
    for token_id in ids:
        events += parser.feed(token_id)
    events += parser.finish()
    pending = []
    ends = [e for e in events if isinstance(e, MessageEnd)]
    assert [e.message for e in ends] == parser.messages
    for event in events:
        if isinstance(event, TextDelta):
            assert event.text
            pending.append(event)
        elif isinstance(event, MessageEnd):
            assert "".join(d.text for d in pending) == event.message.content
            assert all(
                (d.channel, d.recipient, d.content_type)
                == (event.message.channel, event.message.recipient, event.message.content_type)
                for d in pending
            )
            assert event.terminator in ("end", "call", "return", None)
            pending = []
    assert not pending
    return parser, events


def ours(ids: list[int]) -> list[dict]:
    parser, _ = run(ids)
    return [
        {
            "role": m.role,
            "name": m.name,
            "channel": m.channel,
            "recipient": m.recipient,
            "content_type": m.content_type,
            "content": m.content,
        }
        for m in parser.messages
    ]


def terminators(ids: list[int]) -> list[str | None]:
    return [e.terminator for e in run(ids)[1] if isinstance(e, MessageEnd)]


def problems(ids: list[int]) -> list[str]:
    return [e.detail for e in run(ids)[1] if isinstance(e, ParseProblem)]
