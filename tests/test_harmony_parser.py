"""Streaming parser: message-identical to openai-harmony's StreamableParser on well-formed
completions, generated and hand-written. (Malformed ones: test_harmony_parser_malformed.py.)"""

from __future__ import annotations

import pytest
from harmony_completions import Spec, completion_ids, content_ids
from harmony_oracle import oracle_parse
from harmony_parse_run import TOK, ours, run, terminators
from harmony_strategies import text
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harmony import tokens
from harmony.parser import StreamingParser, TextDelta, parse_completion

# -- well-formed, hand-written --------------------------------------------------------------------


def test_analysis_then_final():
    ids = completion_ids(
        [Spec("analysis", "Let me think."), Spec("final", "Hello!", terminator=tokens.RETURN)]
    )
    parser, events = run(ids)
    assert ours(ids) == oracle_parse(ids)
    assert [(m.channel, m.content) for m in parser.messages] == [
        ("analysis", "Let me think."),
        ("final", "Hello!"),
    ]
    assert terminators(ids) == ["end", "return"]
    assert {d.channel for d in events if isinstance(d, TextDelta)} == {"analysis", "final"}
    assert not parser.problems


@pytest.mark.parametrize("model_order", [True, False])
@pytest.mark.parametrize("adjacent", [True, False])
def test_preamble_then_tool_call_in_both_header_orders(model_order, adjacent):
    ids = completion_ids(
        [
            Spec("commentary", "Checking the weather."),
            Spec(
                "commentary",
                '{"city": "Paris"}',
                recipient="functions.get_weather",
                constrained=True,
                model_order=model_order,
                adjacent_constrain=adjacent,
                terminator=tokens.CALL,
            ),
        ]
    )
    assert ours(ids) == oracle_parse(ids)
    call = StreamingParser()
    for t in ids:
        call.feed(t)
    call.finish()
    assert call.messages[1].recipient == "functions.get_weather"
    assert call.messages[1].content_type == "<|constrain|>json"
    assert terminators(ids) == ["end", "call"]
    assert not call.problems


def test_header_fields_are_known_while_content_streams():
    ids = completion_ids(
        [Spec("commentary", "{}", recipient="functions.f", constrained=True, terminator=tokens.CALL)]
    )
    parser = StreamingParser()
    for token_id in ids[: ids.index(tokens.MESSAGE) + 1]:
        assert parser.feed(token_id) == []
    assert (parser.current_channel, parser.current_recipient, parser.current_content_type) == (
        "commentary",
        "functions.f",
        "<|constrain|>json",
    )


def test_split_utf8_is_held_back_until_whole():
    ids = completion_ids([Spec("final", "a😀", byte_tokens=True, terminator=tokens.RETURN)])
    parser = StreamingParser()
    deltas = [[e.text for e in parser.feed(t) if isinstance(e, TextDelta)] for t in ids]
    assert [d for d in deltas if d] == [["a"], ["😀"]]
    assert ours(ids) == oracle_parse(ids)


@pytest.mark.parametrize(
    "raw",
    [
        b"\xff",
        b"ok\x80ok",
        b"\xe2\x82a",
        b"\xf0\x9f\x98",
        b"caf\xc3",
        b"\xc3\xa9\xed\xa0\x80x",
        b"\xe2\x28\xa1",
    ],
)
@pytest.mark.parametrize("cut_off", [False, True])
def test_invalid_utf8_becomes_replacement_characters(raw, cut_off):
    ids = completion_ids([Spec("final", "x", terminator=tokens.RETURN)])
    content = [TOK.single_token(bytes([b])) for b in raw]
    ids = ids[: ids.index(tokens.MESSAGE) + 1] + content + ([] if cut_off else [tokens.RETURN])
    assert ours(ids) == oracle_parse(ids)
    assert ours(ids)[0]["content"] == raw.decode("utf-8", errors="replace")


def test_cut_off_completion():
    ids = completion_ids(
        [Spec("analysis", "thinking"), Spec("final", "The answer is 42", terminator=tokens.RETURN)]
    )
    ids = ids[:-3]
    assert ours(ids) == oracle_parse(ids)
    assert terminators(ids) == ["end", None]


def test_empty_content_and_a_cut_off_right_after_message():
    ids = completion_ids([Spec("final", "", terminator=tokens.RETURN)])
    assert (
        ours(ids)
        == oracle_parse(ids)
        == [
            {
                "role": "assistant",
                "name": None,
                "channel": "final",
                "recipient": None,
                "content_type": None,
                "content": "",
            }
        ]
    )
    assert ours(ids[:-1]) == oracle_parse(ids[:-1])


# -- well-formed, generated -----------------------------------------------------------------------

identifier = st.from_regex(r"[a-z_][a-z0-9_]{0,10}", fullmatch=True)


@st.composite
def specs(draw):
    kind = draw(st.sampled_from(["analysis", "final", "preamble", "call", "builtin"]))
    common = {
        "content": draw(text),
        "byte_tokens": draw(st.integers(0, 4)) == 0,
        "model_order": draw(st.booleans()),
    }
    if kind in ("analysis", "final"):
        return Spec(kind, **common)
    if kind == "preamble":
        return Spec("commentary", **common)
    if kind == "builtin":
        return Spec(
            "analysis",
            recipient=draw(st.sampled_from(["python", "browser.search"])),
            terminator=tokens.CALL,
            **common,
        )
    return Spec(
        "commentary",
        recipient="functions." + draw(identifier),
        constrained=draw(st.booleans()),
        adjacent_constrain=draw(st.booleans()),
        terminator=tokens.CALL,
        **common,
    )


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(specs(), min_size=1, max_size=4), st.sampled_from(["end", "return", "cut"]), st.integers(0, 50)
)
def test_generated_completions_parse_like_openai_harmony(message_specs, ending, cut):
    if message_specs[-1].terminator == tokens.END and ending == "return":
        message_specs[-1] = Spec(**{**message_specs[-1].__dict__, "terminator": tokens.RETURN})
    ids = completion_ids(message_specs)
    if ending == "cut":  # cut inside the last message's content (max_tokens)
        content_start = (
            len(ids) - 1 - len(content_ids(message_specs[-1].content, message_specs[-1].byte_tokens))
        )
        ids = ids[: content_start + min(cut, len(ids) - 1 - content_start)]
    assert ours(ids) == oracle_parse(ids)
    assert not parse_completion(ids).problems
