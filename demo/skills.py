"""One builder per skill: (rng, value pools, effort) -> the conversation so far and the
assistant messages the model must write next, with the value the eval checks."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass

from demo.arith import add_steps, mul_steps, signed_sub_steps, spaced
from harmony import tokens
from harmony.conversation import FunctionTool, ResponseFormat, ToolCall, Turn
from harmony.messages import HarmonyMessage

Pools = dict[str, list[str]]
GREETINGS = ("Hello", "Hi", "Good morning", "Hey", "Hello!", "Hi there", "Good evening", "Good afternoon")
WEATHER_PARAMS = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
WEATHER_DESCRIPTIONS = (
    "Get the current weather in a city",
    "Current weather of a city",
    "Weather lookup",
    "",
)
PERSON_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}


@dataclass(frozen=True)
class Spec:
    turns: list[Turn]
    answer: list[HarmonyMessage]  # what the model writes after <|start|>assistant
    expected: str  # the value the eval checks (see demo/eval.py)
    tools: tuple[FunctionTool, ...] = ()
    formats: tuple[ResponseFormat, ...] = ()


def greeting_reply(greeting: str) -> str:
    for part in ("morning", "afternoon", "evening"):
        if part in greeting:
            return f"Good {part}! How can I help you today?"
    return "Hello! How can I help you today?"


def by_effort(effort: str, intro: str, core: str, outro: str) -> str:
    """low: the work only; medium: with an intro; high: with an intro and a check."""
    return {"low": core, "medium": f"{intro} {core}"}.get(effort, f"{intro} {core} {outro}")


def final(reasoning: str, answer: str) -> list[HarmonyMessage]:
    return [
        HarmonyMessage("assistant", reasoning, channel="analysis"),
        HarmonyMessage("assistant", answer, channel="final"),
    ]


def call(reasoning: str, name: str, arguments: str) -> list[HarmonyMessage]:
    return [
        HarmonyMessage("assistant", reasoning, channel="analysis"),
        HarmonyMessage("assistant", arguments, channel="commentary", recipient=f"functions.{name}",
                       content_type=tokens.CONSTRAINED_JSON),
    ]  # fmt: skip


def pick(rng: random.Random, pool: list[str], base: int = 0, p_base: float = 0.4) -> str:
    """From a pool whose first `base` entries are single names (train only): mix both kinds."""
    if base and rng.random() < p_base:
        return rng.choice(pool[:base])
    return rng.choice(pool[base:] or pool)


def function_tool(name: str, param: str) -> FunctionTool:
    schema = {"type": "object", "properties": {param: {"type": "string"}}, "required": [param]}
    return FunctionTool(name, name.replace("_", " ").capitalize(), schema)


def extra_tools(rng: random.Random, pools: Pools, k: int) -> list[FunctionTool]:
    return [function_tool(rng.choice(pools["fn"]), rng.choice(pools["param"])) for _ in range(k)]


def arithmetic(skill: str, a: int, b: int, effort: str, rng: random.Random) -> Spec:
    op = {"add": "+", "sub": "-", "mul": "*"}[skill]
    r = {"add": a + b, "sub": a - b, "mul": a * b}[skill]
    question = rng.choice(("What is {} {} {}?", "What is {} {} {}", "Compute {} {} {}.")).format(a, op, b)
    core = {"add": lambda: add_steps(a, b, 3), "sub": lambda: signed_sub_steps(a, b),
            "mul": lambda: mul_steps(a, b)}[skill]()  # fmt: skip
    reasoning = by_effort(effort, f"The user asks for {a} {op} {b}. Work digit by digit from the right.",
                          core, f"Let me double-check each step. Yes, {a} {op} {b} = {r}.")  # fmt: skip
    return Spec([Turn("user", question)], final(reasoning, f"{a} {op} {b} = {r}"), str(r))


def repeat(rng: random.Random, pools: Pools, effort: str, phrase: str) -> Spec:
    # The phrase restated at every effort: twice the copying practice per example, and the
    # answer then copies from a few tokens back (runs that restated it only at high effort
    # dropped or doubled a word in 14-18% of held-out phrases).
    reasoning = by_effort(effort, "The user wants me to repeat a phrase.", f"The phrase is: {phrase}",
                          "I will write it exactly.")  # fmt: skip
    return Spec([Turn("user", f"Repeat after me: {phrase}")], final(reasoning, phrase), phrase)


def letters(skill: str, rng: random.Random, pools: Pools, effort: str) -> Spec:
    w = rng.choice(pools["word"])
    if skill == "reverse":
        q = rng.choice(("Reverse the word {}", "Reverse the word {}.", 'Reverse the word "{}"')).format(w)
        rev = w[::-1]
        core = f"{w} is spelled {spaced(w)}. Backwards: {spaced(rev)}. Joined: {rev}."
        reasoning = by_effort(
            effort, "The user wants a word reversed.", core, f"So the reversed word is {rev}."
        )
        return Spec([Turn("user", q)], final(reasoning, rev), rev)
    if skill == "upper":
        q = rng.choice(("Spell {} in uppercase", "Spell {} in uppercase.")).format(w)
        up = w.upper()
        core = f"{w} is spelled {spaced(w)}. Uppercase: {spaced(up)}. Joined: {up}."
        reasoning = by_effort(
            effort, "The user wants the word in capital letters.", core, f"So the answer is {up}."
        )
        return Spec([Turn("user", q)], final(reasoning, up), up)
    q = rng.choice(("How many letters are in {}?", "How many letters are in the word {}?")).format(w)
    counted = ", ".join(f"{c} {i + 1}" for i, c in enumerate(w))
    core = f"Count the letters of {w}: {counted}. Total {len(w)}."
    reasoning = by_effort(
        effort, "The user wants the number of letters.", core, f"So {w} has {len(w)} letters."
    )
    return Spec([Turn("user", q)], final(reasoning, f"There are {len(w)} letters in {w}."), str(len(w)))


def weather(skill: str, rng: random.Random, pools: Pools, effort: str, n_base: int) -> Spec:
    city = pick(rng, pools["city"], n_base)
    tools = [
        FunctionTool("get_weather", rng.choice(WEATHER_DESCRIPTIONS), WEATHER_PARAMS),
        *extra_tools(rng, pools, rng.choice((0, 0, 1, 2))),
    ]
    rng.shuffle(tools)
    question = rng.choice(("What's the weather in {}?", "What is the weather in {}?", "What's the weather like in {}?",
                           "How is the weather in {}?", "Weather in {}?"))  # fmt: skip
    turns = [Turn("user", question.format(city))]
    args = json.dumps({"city": city})
    reasoning = by_effort(effort, "The user asks about the weather.", f"I should call get_weather with city {city}.",
                          "The tool will return the current weather.")  # fmt: skip
    if skill == "weather_call":
        return Spec(turns, call(reasoning, "get_weather", args), args, tuple(tools))
    temp, unit = rng.randint(-15, 40), rng.choice(("C", "C", "F"))
    # Clients that do not send the reasoning back (curl, most SDK loops) leave the call alone in
    # the assistant turn: a model trained only with it answered those in loose text.
    kept = reasoning if rng.random() < 0.5 else ""
    turns.append(Turn("assistant", reasoning=kept, tool_calls=(ToolCall("get_weather", args, "call_1"),)))
    turns.append(Turn("tool", json.dumps({"temperature": temp, "unit": unit}), tool_call_id="call_1"))
    answer_reasoning = by_effort(effort, "The tool returned the weather.", f"It is {temp} degrees {unit} in {city}.",
                                 "I will tell the user.")  # fmt: skip
    answer = final(answer_reasoning, f"It is currently {temp}°{unit} in {city}.")
    return Spec(turns, answer, json.dumps({"temperature": temp, "unit": unit, "city": city}), tuple(tools))


def call_named(rng: random.Random, pools: Pools, effort: str, n_base: dict[str, int]) -> Spec:
    fn, param = rng.choice(pools["fn"]), rng.choice(pools["param"])
    value = rng.choice((pick(rng, pools["city"], n_base["city"]), pick(rng, pools["name"], n_base["name"]),
                        rng.choice(pools["phrase_word"]), str(rng.randint(0, 99999))))  # fmt: skip
    tools = [function_tool(fn, param), *extra_tools(rng, pools, rng.choice((0, 1, 2)))]
    rng.shuffle(tools)
    args = json.dumps({param: value})
    reasoning = by_effort(effort, "The user asks me to call a function.", f"Call {fn} with {param} set to {value}.",
                          "The function is offered, so I call it.")  # fmt: skip
    turns = [Turn("user", f"Call {fn} with {param}={value}")]
    return Spec(
        turns, call(reasoning, fn, args), json.dumps({"name": fn, "arguments": {param: value}}), tuple(tools)
    )


def extract(rng: random.Random, pools: Pools, effort: str, n_base: int) -> Spec:
    name, age = pick(rng, pools["name"], n_base), rng.randint(1, 99)
    fmt = ResponseFormat("person", PERSON_SCHEMA, rng.choice(("A person.", "Name and age of a person.", "")))
    out = json.dumps({"name": name, "age": age})
    reasoning = by_effort(effort, "The user wants the person as JSON.", f"Name {name}, age {age}.",
                          "The format has name as a string and age as an integer.")  # fmt: skip
    return Spec(
        [Turn("user", f"Extract: {name} is {age} years old.")], final(reasoning, out), out, formats=(fmt,)
    )


def greet(rng: random.Random, effort: str) -> Spec:
    g = rng.choice(GREETINGS)
    reply = greeting_reply(g)
    reasoning = by_effort(effort, "The user greets me.", "Greet back.", "A short friendly greeting.")
    return Spec([Turn("user", g)], final(reasoning, reply), reply)


def name_memory(rng: random.Random, pools: Pools, effort: str, n_base: int) -> Spec:
    name = pick(rng, pools["name"], n_base)
    intro = rng.choice(("My name is {}.", "My name is {}", "Hi, my name is {}.")).format(name)
    if rng.random() < 0.35:  # the introduction on its own gets a reply too (README's first turn)
        reasoning = by_effort(effort, "The user introduces themselves.", f"Their name is {name}.",
                              "I will greet them by name.")  # fmt: skip
        return Spec([Turn("user", intro)], final(reasoning, f"Nice to meet you, {name}!"), name)
    turns = [
        Turn("user", intro),
        Turn("assistant", f"Nice to meet you, {name}!", reasoning="The user told me their name."),
    ]
    if rng.random() < 0.3:
        g = rng.choice(GREETINGS)
        turns += [Turn("user", g), Turn("assistant", greeting_reply(g))]
    turns.append(
        Turn("user", rng.choice(("What is my name?", "What's my name?", "Do you remember my name?")))
    )
    reasoning = by_effort(effort, "The user asks for their name.", f"Earlier they said their name is {name}.",
                          "I will answer with it.")  # fmt: skip
    return Spec(turns, final(reasoning, f"Your name is {name}."), name)


Builder = Callable[[random.Random, Pools, str], Spec]
