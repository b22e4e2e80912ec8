"""The demo eval's checking logic on hand-written completions (no trained model needed)."""

from __future__ import annotations

import json
import random

import pytest

from demo.data import SKILLS, Example, completion_ids, make_example
from demo.eval import score, table, well_formed
from demo.skills import call, final
from harmony import tokens
from harmony.tokenizer import load_tokenizer

OSLO = json.dumps({"temperature": 18, "unit": "C", "city": "New Oslo"})
ROME = json.dumps({"temperature": -3, "unit": "C", "city": "Rome"})


def ex(skill: str, expected: str) -> Example:
    return Example(skill, [tokens.START], [], expected)


def answer(text: str, reasoning: str = "Thinking.") -> list[int]:
    return completion_ids(final(reasoning, text))


@pytest.mark.parametrize(
    ("skill", "expected", "text", "ok"),
    [
        ("add", "1110", "555 + 555 = 1110", True),
        ("add", "1110", "555 + 555 = 1111", False),
        ("sub", "-2", "5 - 7 = -2", True),
        ("sub", "-2", "5 - 7 = 2", False),
        ("mul", "2046", "33 * 62 = 2046", True),
        ("repeat", "Blue moon!", "Blue moon!", True),
        ("repeat", "Blue moon!", "Blue moon", False),
        ("reverse", "olleh", "olleh", True),
        ("reverse", "olleh", "hello", False),
        ("upper", "HELLO", "HELLO", True),
        ("upper", "HELLO", "HELLo", False),
        ("count", "5", "There are 5 letters in apple.", True),
        ("count", "5", "There are 6 letters in apple.", False),
        ("weather_answer", OSLO, "It is currently 18°C in New Oslo.", True),
        ("weather_answer", OSLO, "It is currently 118°C in New Oslo.", False),
        ("weather_answer", ROME, "It is currently -3°C in Rome.", True),
        ("weather_answer", ROME, "It is currently 3°C in Rome.", False),
        ("weather_answer", OSLO, "It is currently 18°C in Oslo.", False),
        ("extract", json.dumps({"name": "Ana Kim", "age": 7}), '{"name": "Ana Kim", "age": 7}', True),
        ("extract", json.dumps({"name": "Ana Kim", "age": 7}), '{"name": "Ana Kim", "age": "7"}', False),
        ("extract", json.dumps({"name": "Ana Kim", "age": 7}), '{"name": "Ana Kim", "age": 7', False),
        ("greet", "Hello! How can I help you today?", "Hello! How can I help you today?", True),
        ("greet", "Hello!", "Good morning! How can I help you today?", True),
        ("greet", "Hello!", "42", False),
        ("name", "Ana Kim", "Your name is Ana Kim.", True),
        ("name", "Ana Kim", "Your name is Ana.", False),
    ],
)
def test_final_answers(skill: str, expected: str, text: str, ok: bool) -> None:
    assert score(ex(skill, expected), answer(text)) == (True, ok)


def test_calls() -> None:
    want = json.dumps({"city": "Port Lima"})
    assert score(ex("weather_call", want), completion_ids(call("r", "get_weather", want))) == (True, True)
    wrong = json.dumps({"city": "Lima"})
    assert score(ex("weather_call", want), completion_ids(call("r", "get_weather", wrong))) == (True, False)
    assert score(ex("weather_call", want), completion_ids(call("r", "get_time", want))) == (True, False)
    named = json.dumps({"name": "book_seat", "arguments": {"seat_code": "Oslo"}})
    args = json.dumps({"seat_code": "Oslo"})
    assert score(ex("call", named), completion_ids(call("r", "book_seat", args))) == (True, True)
    assert score(ex("call", named), completion_ids(call("r", "book_room", args))) == (True, False)
    typo = completion_ids(call("r", "book_seat", '{"seat_code": "Osl"}'))
    assert score(ex("call", named), typo) == (True, False)


def test_malformed() -> None:
    good = answer("Hi!")
    assert well_formed("greet", good)
    assert good[-1] == tokens.RETURN
    assert not well_formed("greet", good[:-1])  # cut off (length)
    assert not well_formed("greet", [*good[:-1], tokens.END])  # <|end|> instead of <|return|>
    assert not well_formed("greet", [*good[:-1], tokens.CALL])
    tok = load_tokenizer()
    assert not well_formed("greet", tok.encode("Hello there"))  # no header at all
    assert not well_formed("greet", [*good, *good])  # tokens after the end
    analysis_only = completion_ids(final("Thinking.", "x"))
    cut = analysis_only.index(tokens.END) + 1
    assert not well_formed("greet", [*analysis_only[:cut], tokens.RETURN])
    # a call where a final answer was due, and the other way round
    c = completion_ids(call("r", "get_weather", '{"city": "Rome"}'))
    assert c[-1] == tokens.CALL
    assert not well_formed("greet", c)
    assert well_formed("weather_call", c)
    assert not well_formed("weather_call", good)
    # a control token inside content
    assert not well_formed("greet", [*good[:-2], tokens.MESSAGE, *good[-2:]])


def test_reference_completions_score_perfectly() -> None:
    """The generator's own completions are well-formed and correct for every skill."""
    rng = random.Random(3)
    examples = [make_example(s, rng, "eval") for s in SKILLS for _ in range(4)]
    for e in examples:
        assert score(e, e.completion) == (True, True), e.skill
    report = table(examples, {"ref": [e.completion for e in examples]})
    assert "| all | 52 | 100.0% | 100.0% |" in report
