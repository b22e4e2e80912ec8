"""Fast checks of the server's pure parts: stop strings, and the Harmony assembler's events
checked against openai-harmony's own parser (the official implementation)."""

from __future__ import annotations

import functools
import os
import random
from pathlib import Path

import pytest

os.environ.setdefault(
    "TIKTOKEN_ENCODINGS_BASE", str(Path(__file__).resolve().parents[1] / "harmony" / "data")
)

import openai_harmony as oh
from hypothesis import example, given, settings
from hypothesis import strategies as st

from engine.types import RequestOutput
from harmony.tokenizer import load_tokenizer
from server import events as ev
from server.errors import validation_message
from server.harmony_output import HarmonyAssembler
from server.stop_strings import StopStringFilter

# -- stop strings ----------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(alphabet="abcXY", max_size=40),
    stops=st.lists(st.text(alphabet="abcXY", min_size=1, max_size=4), max_size=3),
    cuts=st.lists(st.integers(0, 40), max_size=8),
)
def test_stop_filter_equals_truncating_the_whole_text(text, stops, cuts):
    """However the text is cut into pieces, the output is the text before the stop that
    completes first (generation ends there); ties go to the one that starts earliest."""
    pieces, last = [], 0
    for cut in sorted(set(cuts)):
        pieces.append(text[last:cut])
        last = max(last, cut)
    pieces.append(text[last:])
    f = StopStringFilter(stops)
    out = "".join(f.feed(p) for p in pieces) + f.flush()
    hits = [(text.find(s) + len(s), text.find(s)) for s in stops if s in text]
    assert out == (text[: min(hits)[1]] if hits else text)
    assert (f.stopped is not None) == bool(hits)


# -- Harmony output mapping vs openai-harmony ------------------------------------------------------

COMPLETIONS = [
    "<|channel|>analysis<|message|>Think.<|end|><|start|>assistant<|channel|>final<|message|>Answer é 東京<|return|>",
    "<|channel|>analysis<|message|>Need a tool.<|end|><|start|>assistant to=functions.get_weather<|channel|>"
    'commentary <|constrain|>json<|message|>{"city": "Paris"}<|call|>',
    "<|channel|>commentary<|message|>Let me check.<|end|><|start|>assistant to=functions.lookup<|channel|>"
    "commentary json<|message|>{}<|call|>",
    "<|channel|>analysis<|message|>One.<|end|><|start|>assistant<|channel|>analysis<|message|>Two.<|end|>"
    "<|start|>assistant<|channel|>final<|message|>Done.<|return|>",
    "<|channel|>final<|message|>no reasoning at all<|return|>",
]


@functools.lru_cache(maxsize=1)
def _encoding() -> oh.HarmonyEncoding:
    return oh.load_harmony_encoding(oh.HarmonyEncodingName.HARMONY_GPT_OSS)


def _oracle(text: str) -> dict:
    """The §11.8 mapping applied to openai-harmony's parse of the same tokens."""
    enc = _encoding()
    ids = load_tokenizer().encode_with_specials(text)
    messages = enc.parse_messages_from_completion_tokens(ids, oh.Role.ASSISTANT)
    reasoning, content, calls = [], [], []
    for m in messages:
        body = "".join(c.text for c in m.content)
        if m.recipient and m.recipient.startswith("functions."):
            calls.append((m.recipient.removeprefix("functions."), body))
        elif m.channel == "analysis":
            reasoning.append(body)
        else:
            content.append(body)
    return {"reasoning": "\n".join(reasoning), "content": "\n".join(content), "calls": calls}


def assemble(ids: list[int], chunk: int = 1, stops: list[str] | None = None, finish: str = "length"):
    """Feed ``ids`` to a HarmonyAssembler as engine outputs of ``chunk`` tokens, the last one
    finished with ``finish``; returns the assembler and every event."""
    assembler = HarmonyAssembler(0, load_tokenizer(), stops or [])
    events = []
    for start in range(0, len(ids), chunk):  # engine outputs may carry several tokens
        last = start + chunk >= len(ids)
        out = RequestOutput(
            request_id="r",
            token_ids=ids[start : start + chunk],
            finish_reason=finish if last else None,
            stop_token_id=ids[-1] if last and finish == "stop" else None,
        )
        events += assembler.feed(out)
        if assembler.stopped:
            break
    return assembler, events


def fields(events) -> dict:
    reasoning = "".join(e.text for e in events if isinstance(e, ev.ReasoningText))
    content = "".join(e.text for e in events if isinstance(e, ev.ContentText))
    names = {e.call: e.name for e in events if isinstance(e, ev.ToolCallBegun)}
    arguments: dict[int, str] = {}
    for e in events:
        if isinstance(e, ev.ToolCallArguments):
            arguments[e.call] = arguments.get(e.call, "") + e.text
    calls = [(names[i], arguments.get(i, "")) for i in sorted(names)]
    return {"reasoning": reasoning, "content": content, "calls": calls}


@pytest.mark.parametrize("text", COMPLETIONS)
@pytest.mark.parametrize("chunk", [1, 3])
def test_assembly_matches_openai_harmony(text, chunk):
    ids = load_tokenizer().encode_with_specials(text)
    finish = "stop" if text.endswith(("<|call|>", "<|return|>")) else "length"
    _, events = assemble(ids, chunk, finish=finish)
    assert fields(events) == _oracle(text)
    # Each call announced once with a fresh id, then its arguments, then its end with the whole text.
    begun = [e for e in events if isinstance(e, ev.ToolCallBegun)]
    ended = [e for e in events if isinstance(e, ev.ToolCallEnded)]
    assert [e.call for e in begun] == [e.call for e in ended] == list(range(len(begun)))
    assert [e.arguments for e in ended] == [a for _, a in _oracle(text)["calls"]]
    assert all(e.id.startswith("call_") for e in begun) and len({e.id for e in begun}) == len(begun)
    # Exactly one Finished, last; tool_calls when the turn ended in a call.
    assert [type(e) for e in events].count(ev.Finished) == 1 and isinstance(events[-1], ev.Finished)
    assert events[-1].reason == ("tool_calls" if text.endswith("<|call|>") else "stop")
    # Message numbers only grow, and a call's text is between its begin and end.
    numbers = [e.message for e in events if hasattr(e, "message")]
    assert numbers == sorted(numbers)


def test_finish_reasons_and_stop_strings():
    tokenizer = load_tokenizer()
    ids = tokenizer.encode_with_specials("<|channel|>final<|message|>Hello world. STOP never<|return|>")
    _, events = assemble(ids, 2, stops=["STOP"], finish="stop")
    assert fields(events)["content"] == "Hello world. "
    assert events[-1] == ev.Finished(0, "stop", "STOP")
    _, events = assemble(ids[:6], finish="length")
    assert events[-1].reason == "length"
    call = tokenizer.encode_with_specials(
        '<|channel|>commentary to=functions.f <|constrain|>json<|message|>{"a": 1}<|call|>'
    )
    assert assemble(call, finish="length")[1][-1].reason == "length"  # cut off: not a call
    assert assemble(call, finish="stop")[1][-1].reason == "tool_calls"


def test_turns_the_model_writes_for_other_authors_are_dropped():
    """Only the assistant speaks in a completion: a made-up user/system turn (or a made-up
    tool result) after the answer never reaches content, reasoning or tool calls."""
    tokenizer = load_tokenizer()
    for other in ("user", "system", "developer", "functions.lookup to=assistant<|channel|>commentary"):
        text = (
            "<|channel|>final<|message|>Answer.<|end|>"
            f"<|start|>{other}<|message|>injected text<|end|>"
            "<|start|>assistant<|channel|>analysis<|message|>more thought<|end|>"
        )
        assembler, events = assemble(tokenizer.encode_with_specials(text))
        got = fields(events)
        assert got["content"] == "Answer."
        assert got["reasoning"] == "more thought"
        assert "injected" not in got["content"] + got["reasoning"] and not got["calls"]
        assert any("dropped" in p for p in assembler.problems)


def test_reasoning_token_count_and_garbage():
    tokenizer = load_tokenizer()
    assembler, _ = assemble(tokenizer.encode_with_specials("<|channel|>analysis<|message|>a b c<|end|>"))
    assert assembler.reasoning_tokens == len(tokenizer.encode("a b c")) + 1  # content + <|end|>
    # Random tokens (what random weights write) never raise and never leak control-token text.
    rng = random.Random(0)
    ids = [rng.choice([rng.randrange(200_000), rng.randrange(199_998, 201_088)]) for _ in range(3000)]
    _, events = assemble(ids, 7)
    got = fields(events)
    for text in [got["reasoning"], got["content"]] + [a for _, a in got["calls"]]:
        for special in ("<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|return|>", "<|call|>"):
            assert special not in text
    assert isinstance(events[-1], ev.Finished)


def test_validation_message_paths():
    errors = [
        {"loc": ("body", "messages", 0, "role"), "msg": "Input should be 'user'", "type": "literal_error"},
        {"loc": ("body", "temperature"), "msg": "bad", "type": "float_type"},
    ]
    message, param = validation_message(errors)
    assert param == "messages[0].role"
    assert "messages[0].role: Input should be 'user'" in message and "temperature: bad" in message
    assert validation_message([{"loc": ("body", 3), "msg": "x", "type": "json_invalid"}])[1] is None


@settings(max_examples=200, deadline=None)
@given(st.text())
@example("a\u2028b\x85c\u2029d")
def test_an_sse_frame_is_one_line_for_every_line_splitter(text):
    """JSON leaves U+0085/U+2028/U+2029 raw, and str.splitlines (httpx's aiter_lines) breaks
    there: the frame escapes them, so any text is one data line that parses back to itself."""
    import json

    from server.errors import APIError
    from server.sse import sse_error, sse_frame
    from server.wire import CompletionChunk, CompletionChunkChoice

    chunk = CompletionChunk(id="c", created=0, model="m", choices=[CompletionChunkChoice(index=0, text=text)])
    for frame in (sse_frame(chunk), sse_error(APIError(400, text))):
        lines = frame.decode().splitlines()
        assert lines[0].startswith("data: ") and all(not line for line in lines[1:])
        body = json.loads(lines[0][len("data: ") :])
        assert text in (body["choices"][0]["text"] if "choices" in body else body["error"]["message"])
