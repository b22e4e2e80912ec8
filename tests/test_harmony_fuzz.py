"""Fuzzing the streaming parser with random and adversarial token sequences: it never raises,
and no special token ever becomes text in content, channel, recipient or author."""

from __future__ import annotations

import random

import pytest
from harmony_completions import Spec, completion_ids
from hypothesis import given, settings
from hypothesis import strategies as st

from harmony import tokens
from harmony.parser import MessageEnd, ParseProblem, StreamingParser, TextDelta
from harmony.tokenizer import load_tokenizer

TOK = load_tokenizer()
SPECIALS = [
    *tokens.TERMINATORS,
    tokens.START,
    tokens.MESSAGE,
    tokens.CHANNEL,
    tokens.CONSTRAIN,
    tokens.ENDOFTEXT,
    tokens.STARTOFTEXT,
    200000,
    200013,
    200018,
    201087,
    201088,
    201089,
    -1,
    2**40,
]
SPECIAL_NAMES = list(tokens.special_tokens())
HEADER_WORDS = [
    "assistant",
    "user",
    "tool",
    "functions.f",
    " to=functions.get_weather",
    "commentary",
    "analysis",
    "final",
    " json",
    " ",
    "to=",
    "\n",
    "python",
    "😀",
]


def real_completions() -> list[list[int]]:
    return [
        completion_ids(
            [Spec("analysis", "Let me think about 😀."), Spec("final", "Héllo!", terminator=tokens.RETURN)]
        ),
        completion_ids(
            [
                Spec("commentary", "One moment."),
                Spec(
                    "commentary",
                    '{"city": "東京"}',
                    recipient="functions.get_weather",
                    constrained=True,
                    terminator=tokens.CALL,
                ),
            ]
        ),
        completion_ids(
            [Spec("analysis", "x", recipient="python", model_order=False, terminator=tokens.CALL)]
        ),
        completion_ids([Spec("analysis", "abc😀é", byte_tokens=True), Spec("final", "ok", byte_tokens=True)]),
    ]


# Ordinary tokens that cannot spell `<|` or `|>` on their own or next to each other, so any such
# text in the output can only come from a special token.
SAFE_ORDINARY = [
    t for t in range(0, 199998, 7) if b"<" not in TOK.token_bytes(t) and b"|" not in TOK.token_bytes(t)
]
HEADER_TOKENS = sorted({t for w in HEADER_WORDS for t in TOK.encode(w)})


def random_sequence(rng: random.Random, safe: bool) -> list[int]:
    kind = rng.randrange(5)
    if kind == 0:  # uniform over every id, valid or not
        return [rng.randrange(-3, 201100) for _ in range(rng.randrange(60))]
    if kind == 1:  # a shuffled real completion
        ids = list(rng.choice(real_completions()))
        rng.shuffle(ids)
        return ids
    if kind == 2:  # a real completion with special tokens inserted, deleted and replaced
        ids = list(rng.choice(real_completions()))
        for _ in range(rng.randrange(1, 6)):
            at = rng.randrange(len(ids) + 1)
            op = rng.randrange(3)
            if op == 0:
                ids.insert(at, rng.choice(SPECIALS))
            elif op == 1 and ids:
                del ids[min(at, len(ids) - 1)]
            elif ids:
                ids[min(at, len(ids) - 1)] = rng.choice(SPECIALS)
        return ids[: rng.randrange(len(ids) + 1)]
    pool = SAFE_ORDINARY if safe else range(199998)
    # Mostly structure: control tokens between header words and ordinary text.
    return [
        rng.choice(SPECIALS)
        if rng.random() < 0.3
        else rng.choice(HEADER_TOKENS)
        if rng.random() < 0.5
        else rng.choice(pool)
        for _ in range(rng.randrange(80))
    ]


def check(ids: list[int], safe: bool) -> None:
    parser = StreamingParser()
    events = [e for t in ids for e in parser.feed(t)] + parser.finish()
    for event in events:
        assert isinstance(event, TextDelta | MessageEnd | ParseProblem)
    for message in parser.messages:
        fields = [message.content, message.channel, message.recipient, message.role, message.name]
        content_type = message.content_type or ""
        fields.append(content_type.removeprefix("<|constrain|>"))
        for value in filter(None, fields):
            if safe:
                assert "<|" not in value and "|>" not in value, (ids, message)
            else:
                assert not any(name in value for name in SPECIAL_NAMES), (ids, message)
    ends = [e.message for e in events if isinstance(e, MessageEnd)]
    assert ends == parser.messages


@pytest.mark.parametrize("seed", range(4))
def test_thousands_of_random_and_adversarial_sequences(seed):
    rng = random.Random(seed)
    for i in range(1000):
        check(random_sequence(rng, safe=i % 2 == 0), safe=i % 2 == 0)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.one_of(st.sampled_from(SPECIALS), st.sampled_from(HEADER_TOKENS), st.sampled_from(SAFE_ORDINARY)),
        max_size=40,
    )
)
def test_hypothesis_sequences(ids):
    check(ids, safe=True)
