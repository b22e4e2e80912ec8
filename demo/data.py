"""Synthetic Harmony conversations for every skill of the demonstration model.

Each example is (skill, prompt ids, completion ids, expected value): the prompt is exactly what
the server renders (`harmony.render.render_conversation`: the system message with a date and
`Reasoning: {effort}`, the developer message with tools / response formats), the completion
what the model must write after `<|start|>assistant`. Reasoning length follows the effort
(low < medium < high). Values are split once (demo/pools.py) into train and held-out values,
so eval values never appear in training.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from demo import pools as P
from demo import skills as S
from harmony import tokens
from harmony.conversation import Conversation
from harmony.messages import HarmonyMessage, render_message
from harmony.render import render_conversation
from harmony.tokenizer import load_tokenizer

SKILLS = (
    "add", "sub", "mul", "repeat", "reverse", "upper", "count",
    "weather_call", "weather_answer", "call", "extract", "greet", "name",
)  # fmt: skip
EFFORTS = ("low", "medium", "high")


@dataclass(frozen=True)
class Example:
    skill: str
    prompt: list[int]
    completion: list[int]
    expected: str  # the value the eval checks (demo/eval.py)


def completion_ids(messages: list[HarmonyMessage]) -> list[int]:
    """The assistant's messages as the model writes them: after `<|start|>assistant`, the last
    message ending in `<|return|>` (a final answer) or `<|call|>` (a tool call)."""
    tok = load_tokenizer()
    out: list[int] = []
    for m in messages:
        out += render_message(m, tok)
    assert out[:2] == [tokens.START, tokens.ASSISTANT]
    out = out[2:]
    if out[-1] == tokens.END:
        out[-1] = tokens.RETURN
    return out


def _date(rng: random.Random) -> str:
    return f"{rng.randint(2025, 2027)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"


def _operands(skill: str, rng: random.Random, split: str) -> tuple[int, int]:
    top = 99 if skill == "mul" else 999
    while True:  # held-out arithmetic: pairs whose hash falls in the eval bucket
        a, b = rng.randint(0, top), rng.randint(0, top)
        if P.held_out(f"{a}:{b}", skill) == (split == "eval"):
            return a, b


def _phrase(rng: random.Random, pool: list[str], split: str) -> str:
    while True:
        phrase = " ".join(rng.choice(pool) for _ in range(rng.randint(2, 6)))
        if rng.random() < 0.5:
            phrase = phrase.capitalize() + rng.choice((".", "!", ""))
        if P.held_out(phrase, "phrase") == (split == "eval"):
            return phrase


def make_spec(skill: str, rng: random.Random, split: str, effort: str) -> S.Spec:
    pools = P.pools(split)
    base = {"city": len(P.CITIES), "name": len(P.NAMES)} if split == "train" else {"city": 0, "name": 0}
    if skill in ("add", "sub", "mul"):
        return S.arithmetic(skill, *_operands(skill, rng, split), effort, rng)
    if skill == "repeat":
        return S.repeat(rng, pools, effort, _phrase(rng, pools["phrase_word"], split))
    if skill in ("reverse", "upper", "count"):
        return S.letters(skill, rng, pools, effort)
    if skill in ("weather_call", "weather_answer"):
        return S.weather(skill, rng, pools, effort, base["city"])
    if skill == "call":
        return S.call_named(rng, pools, effort, base)
    if skill == "extract":
        return S.extract(rng, pools, effort, base["name"])
    if skill == "greet":
        return S.greet(rng, effort)
    if skill == "name":
        return S.name_memory(rng, pools, effort, base["name"])
    raise ValueError(f"unknown skill {skill!r}")


def make_example(skill: str, rng: random.Random, split: str = "train", effort: str | None = None) -> Example:
    effort = effort or rng.choice(EFFORTS)
    spec = make_spec(skill, rng, split, effort)
    conv = Conversation(turns=tuple(spec.turns), tools=spec.tools, reasoning_effort=effort, date=_date(rng),
                        response_formats=spec.formats)  # fmt: skip
    prompt = render_conversation(conv).token_ids
    return Example(skill, prompt, completion_ids(spec.answer), spec.expected)
