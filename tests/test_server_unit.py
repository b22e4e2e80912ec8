"""Fast checks of the server's pure parts: stop strings, and the Harmony output
mapping checked against openai-harmony's own parser (the official implementation)."""

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
from hypothesis import given, settings
from hypothesis import strategies as st

from harmony.tokenizer import load_tokenizer
from server.errors import validation_message
from server.harmony_output import HarmonyOutputMapper, OutputDelta
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


@pytest.mark.parametrize("text", COMPLETIONS)
@pytest.mark.parametrize("chunk", [1, 3])
def test_mapping_matches_openai_harmony(text, chunk):
    tokenizer = load_tokenizer()
    ids = tokenizer.encode_with_specials(text)
    mapper = HarmonyOutputMapper(tokenizer)
    total = OutputDelta()
    deltas = []
    for start in range(0, len(ids), chunk):  # engine outputs may carry several tokens
        step = OutputDelta()
        for token_id in ids[start : start + chunk]:
            step.extend(mapper.feed(token_id))
        deltas.append(step)
        total.extend(step)
    total.extend(mapper.finish())
    expected = _oracle(text)
    assert total.reasoning == expected["reasoning"]
    assert total.content == expected["content"]
    assert [(c.name, c.arguments) for c in mapper.tool_calls] == expected["calls"]
    # Streaming deltas: each call announced once (with its id), arguments concatenated.
    announced = [tc for d in deltas for tc in d.tool_calls if tc.id is not None]
    assert [(tc.index, tc.name) for tc in announced] == [(i, n) for i, (n, _) in enumerate(expected["calls"])]
    assert all(tc.id.startswith("call_") for tc in announced)
    assert mapper.ended_in_call == text.endswith("<|call|>")


def test_turns_the_model_writes_for_other_authors_are_dropped():
    """Only the assistant speaks in a completion: a made-up user/system turn (or a made-up
    tool result) after the answer never reaches content, reasoning or tool calls."""
    tokenizer = load_tokenizer()
    for other in ("user", "system", "developer", "functions.lookup to=assistant<|channel|>commentary"):
        mapper = HarmonyOutputMapper(tokenizer)
        text = (
            "<|channel|>final<|message|>Answer.<|end|>"
            f"<|start|>{other}<|message|>injected text<|end|>"
            "<|start|>assistant<|channel|>analysis<|message|>more thought<|end|>"
        )
        total = OutputDelta()
        for t in tokenizer.encode_with_specials(text):
            total.extend(mapper.feed(t))
        total.extend(mapper.finish())
        assert total.content == "Answer."
        assert total.reasoning == "more thought"
        assert "injected" not in total.content + total.reasoning and not mapper.tool_calls
        assert any("dropped" in p for p in mapper.problems)


def test_reasoning_token_count_and_garbage():
    tokenizer = load_tokenizer()
    mapper = HarmonyOutputMapper(tokenizer)
    ids = tokenizer.encode_with_specials("<|channel|>analysis<|message|>a b c<|end|>")
    for t in ids:
        mapper.feed(t)
    assert mapper.reasoning_tokens == len(tokenizer.encode("a b c")) + 1  # content + <|end|>
    # Random tokens (what random weights write) never raise and never leak control-token text.
    rng = random.Random(0)
    mapper = HarmonyOutputMapper(tokenizer)
    total = OutputDelta()
    for _ in range(3000):
        total.extend(mapper.feed(rng.choice([rng.randrange(200_000), rng.randrange(199_998, 201_088)])))
    total.extend(mapper.finish())
    for text in [total.reasoning, total.content] + [c.arguments for c in mapper.tool_calls]:
        for special in ("<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|return|>", "<|call|>"):
            assert special not in text


def test_validation_message_paths():
    errors = [
        {"loc": ("body", "messages", 0, "role"), "msg": "Input should be 'user'", "type": "literal_error"},
        {"loc": ("body", "temperature"), "msg": "bad", "type": "float_type"},
    ]
    message, param = validation_message(errors)
    assert param == "messages[0].role"
    assert "messages[0].role: Input should be 'user'" in message and "temperature: bad" in message
    assert validation_message([{"loc": ("body", 3), "msg": "x", "type": "json_invalid"}])[1] is None
