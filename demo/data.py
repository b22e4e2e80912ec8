"""Synthetic Harmony conversations for every skill of the demonstration model.

Each example is (skill, prompt ids, completion ids): the prompt is exactly what the server
renders (`harmony.render.render_conversation`: system message with a date and
`Reasoning: {effort}`, developer message with tools / response formats), the completion what
the model must write after `<|start|>assistant`. Reasoning length follows the effort
(low < medium < high). Values are split once by a fixed seed into train and held-out pools
(`split="train"` / `"eval"`), so eval values never appear in training.
"""

from __future__ import annotations

import json
import random
import zlib
from dataclasses import dataclass
from functools import cache

from harmony import tokens
from harmony.conversation import Conversation, FunctionTool, ResponseFormat, ToolCall, Turn
from harmony.messages import HarmonyMessage, render_message
from harmony.render import render_conversation
from harmony.tokenizer import load_tokenizer

SKILLS = (
    "add", "sub", "mul", "repeat", "reverse", "upper", "count",
    "weather_call", "weather_answer", "call", "extract", "greet", "name",
)  # fmt: skip
EFFORTS = ("low", "medium", "high")

CITIES = [
    "Paris",
    "London",
    "Berlin",
    "Madrid",
    "Rome",
    "Vienna",
    "Prague",
    "Warsaw",
    "Lisbon",
    "Dublin",
    "Oslo",
    "Stockholm",
    "Helsinki",
    "Copenhagen",
    "Amsterdam",
    "Brussels",
    "Zurich",
    "Geneva",
    "Munich",
    "Hamburg",
    "Milan",
    "Naples",
    "Venice",
    "Florence",
    "Barcelona",
    "Seville",
    "Valencia",
    "Porto",
    "Athens",
    "Sofia",
    "Bucharest",
    "Budapest",
    "Belgrade",
    "Zagreb",
    "Kyiv",
    "Riga",
    "Vilnius",
    "Tallinn",
    "Moscow",
    "Istanbul",
    "Ankara",
    "Cairo",
    "Tunis",
    "Algiers",
    "Lagos",
    "Nairobi",
    "Accra",
    "Dakar",
    "Johannesburg",
    "Tokyo",
    "Osaka",
    "Kyoto",
    "Seoul",
    "Busan",
    "Beijing",
    "Shanghai",
    "Shenzhen",
    "Taipei",
    "Manila",
    "Jakarta",
    "Bangkok",
    "Hanoi",
    "Delhi",
    "Mumbai",
    "Chennai",
    "Dhaka",
    "Karachi",
    "Lahore",
    "Dubai",
    "Doha",
    "Tehran",
    "Baghdad",
    "Riyadh",
    "Sydney",
    "Melbourne",
    "Perth",
    "Auckland",
    "Toronto",
    "Montreal",
    "Vancouver",
    "Chicago",
    "Boston",
    "Denver",
    "Seattle",
    "Houston",
    "Dallas",
    "Miami",
    "Atlanta",
    "Phoenix",
    "Portland",
    "Austin",
    "Detroit",
    "Lima",
    "Quito",
    "Bogota",
    "Santiago",
    "Caracas",
    "Havana",
    "Mexico",
    "Lyon",
    "Marseille",
    "Nice",
    "Bordeaux",
    "Lille",
    "Nantes",
    "Toulouse",
    "Leeds",
    "York",
    "Bristol",
    "Glasgow",
    "Edinburgh",
    "Cardiff",
    "Belfast",
    "Liverpool",
    "Manchester",
    "Oxford",
    "Cambridge",
    "Bergen",
    "Malmo",
    "Turin",
    "Genoa",
    "Bologna",
    "Krakow",
    "Gdansk",
    "Dresden",
    "Leipzig",
    "Cologne",
    "Frankfurt",
    "Stuttgart",
    "Bern",
    "Basel",
]
NAMES = [
    "Alice",
    "Bob",
    "Carol",
    "David",
    "Emma",
    "Frank",
    "Grace",
    "Henry",
    "Irene",
    "Jack",
    "Karen",
    "Leo",
    "Maria",
    "Nina",
    "Oscar",
    "Paul",
    "Quinn",
    "Rosa",
    "Sam",
    "Tina",
    "Victor",
    "Wendy",
    "Xavier",
    "Yara",
    "Zoe",
    "Adam",
    "Bella",
    "Chris",
    "Diana",
    "Ethan",
    "Fiona",
    "George",
    "Hannah",
    "Ivan",
    "Julia",
    "Kevin",
    "Laura",
    "Mark",
    "Nora",
    "Oliver",
    "Peter",
    "Rachel",
    "Simon",
    "Sarah",
    "Thomas",
    "Uma",
    "Vera",
    "William",
    "Anna",
    "Ben",
    "Clara",
    "Daniel",
    "Elena",
    "Felix",
    "Hugo",
    "Isabel",
    "James",
    "Kate",
    "Lucas",
    "Mia",
    "Noah",
    "Olga",
    "Pedro",
    "Ruth",
    "Steve",
    "Tom",
    "Lily",
    "Max",
    "Eva",
    "Omar",
    "Ali",
    "Chen",
    "Yuki",
    "Ravi",
    "Priya",
    "Amir",
    "Lena",
    "Marco",
    "Sofia",
    "Hans",
    "Ingrid",
    "Pablo",
    "Carmen",
    "Luis",
    "Ana",
    "Igor",
    "Nadia",
    "Emil",
    "Jonas",
    "Mila",
    "Sven",
    "Lars",
    "Rita",
    "Gina",
    "Tara",
    "Dean",
    "Ryan",
    "Kyle",
    "Amy",
    "Joy",
    "Roy",
    "Ray",
    "Ken",
    "Jim",
    "Tim",
    "Dan",
    "Eric",
    "Alex",
]
WORDS = [
    "apple",
    "river",
    "stone",
    "cloud",
    "green",
    "house",
    "light",
    "water",
    "music",
    "paper",
    "table",
    "chair",
    "window",
    "garden",
    "bread",
    "happy",
    "quiet",
    "simple",
    "yellow",
    "orange",
    "purple",
    "silver",
    "golden",
    "little",
    "bright",
    "dark",
    "cold",
    "warm",
    "fresh",
    "sweet",
    "tiger",
    "horse",
    "mouse",
    "eagle",
    "snake",
    "whale",
    "shark",
    "zebra",
    "panda",
    "camel",
    "lemon",
    "mango",
    "grape",
    "peach",
    "melon",
    "cherry",
    "ocean",
    "forest",
    "desert",
    "island",
    "valley",
    "mountain",
    "castle",
    "bridge",
    "tower",
    "market",
    "school",
    "office",
    "doctor",
    "teacher",
    "planet",
    "rocket",
    "comet",
    "star",
    "moon",
    "night",
    "morning",
    "summer",
    "winter",
    "spring",
    "autumn",
    "dream",
    "story",
    "poem",
    "song",
    "dance",
    "happy",
    "brave",
    "clever",
    "gentle",
    "proud",
    "calm",
    "wild",
    "kind",
    "smart",
    "funny",
    "strong",
    "soft",
    "loud",
    "slow",
    "fast",
    "early",
    "late",
    "book",
    "pen",
    "cup",
    "door",
    "road",
    "city",
    "town",
    "farm",
    "field",
    "lake",
    "hill",
    "sand",
    "snow",
    "rain",
    "wind",
    "fire",
    "gold",
    "iron",
    "wood",
    "glass",
    "red",
    "blue",
    "pink",
    "gray",
    "black",
    "white",
    "brown",
    "time",
    "year",
    "day",
    "week",
    "hour",
    "word",
    "name",
    "game",
    "ball",
    "ship",
    "train",
    "plane",
]
VERBS = [
    "get",
    "set",
    "find",
    "list",
    "make",
    "send",
    "check",
    "open",
    "close",
    "read",
    "update",
    "create",
    "delete",
    "fetch",
    "book",
    "add",
    "remove",
    "start",
    "stop",
    "track",
]
NOUNS = [
    "order",
    "user",
    "file",
    "email",
    "ticket",
    "price",
    "stock",
    "flight",
    "hotel",
    "movie",
    "song",
    "note",
    "task",
    "event",
    "invoice",
    "account",
    "report",
    "photo",
    "message",
    "device",
    "room",
    "table",
    "seat",
    "color",
    "score",
    "city",
    "recipe",
    "budget",
]
GREETINGS = ("Hello", "Hi", "Good morning", "Hey", "Hello!", "Hi there", "Good evening", "Good afternoon")
GREETING_REPLIES = {
    "Good morning": "Good morning! How can I help you today?",
    "Good evening": "Good evening! How can I help you today?",
    "Good afternoon": "Good afternoon! How can I help you today?",
}
WEATHER_TOOL = FunctionTool(
    "get_weather",
    "Get the current weather in a city",
    {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
)
PERSON_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}
HELD_OUT_FRACTION = 0.2


@dataclass(frozen=True)
class Example:
    skill: str
    prompt: list[int]
    completion: list[int]
    expected: str  # the value the final answer / call arguments must contain


def _split(pool: list[str], split: str, seed: int = 1234) -> list[str]:
    items = sorted(set(pool))
    random.Random(seed).shuffle(items)
    cut = int(len(items) * HELD_OUT_FRACTION)
    return items[:cut] if split == "eval" else items[cut:]


@cache
def _pools(split: str) -> dict[str, list[str]]:
    tok = load_tokenizer()
    # Letter tasks: words made of two or three short lowercase pieces that the tokenizer keeps
    # apart, so every piece (and its spelling) is seen in training and held-out words are new
    # combinations of seen pieces.
    pieces = sorted(
        {w[:k] for w in WORDS for k in (2, 3)} | {w[k:] for w in WORDS for k in (2, 3) if len(w) - k >= 2}
    )
    pieces = [p for p in pieces if len(tok.encode(p)) == 1 and len(tok.encode(" " + p)) == 1]
    rng = random.Random(7)
    words = set(WORDS)
    while len(words) < 3000:
        w = "".join(rng.choice(pieces) for _ in range(rng.choice((2, 2, 3))))
        if 4 <= len(w) <= 10:
            words.add(w)
    fn_names = [f"{v}_{n}" for v in VERBS for n in NOUNS]
    params = NOUNS + [f"{n}_id" for n in NOUNS] + [f"{n}_name" for n in NOUNS]
    return {
        "city": _split(CITIES, split),
        "name": _split(NAMES, split),
        "word": _split(sorted(words), split),
        "fn": _split(fn_names, split),
        "param": params,
        "phrase_word": WORDS,
    }


def _date(rng: random.Random) -> str:
    return f"{rng.randint(2025, 2027)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"


def sp(s: str) -> str:
    return " ".join(s)


def _by_effort(effort: str, intro: str, core: str, outro: str) -> str:
    if effort == "low":
        return core
    if effort == "medium":
        return f"{intro} {core}"
    return f"{intro} {core} {outro}"


def _add_steps(x: int, y: int, width: int) -> tuple[str, int]:
    xs, ys = f"{x:0{width}d}", f"{y:0{width}d}"
    carry, steps, digits = 0, [], []
    for i in range(width - 1, -1, -1):
        a, b = int(xs[i]), int(ys[i])
        s = a + b + carry
        steps.append(f"{a}+{b}+{carry}={s}, write {s % 10} carry {s // 10}.")
        digits.append(str(s % 10))
        carry = s // 10
    if carry:
        digits.append("1")
    r = x + y
    core = (
        f"{x} is {sp(xs)}. {y} is {sp(ys)}. "
        + " ".join(steps)
        + f" Digits {sp(''.join(reversed(digits)))} make {r}."
    )
    return core, r


def _sub_steps(x: int, y: int) -> str:
    xs, ys = f"{x:03d}", f"{y:03d}"
    borrow, steps, digits = 0, [], []
    for i in range(2, -1, -1):
        a, b = int(xs[i]), int(ys[i])
        v = a - b - borrow
        if v < 0:
            steps.append(f"{a}-{b}-{borrow} is negative, so {a}+10-{b}-{borrow}={v + 10}, borrow 1.")
            digits.append(str(v + 10))
            borrow = 1
        else:
            steps.append(f"{a}-{b}-{borrow}={v}, borrow 0.")
            digits.append(str(v))
            borrow = 0
    return (
        f"{x} is {sp(xs)}. {y} is {sp(ys)}. "
        + " ".join(steps)
        + f" Digits {sp(''.join(reversed(digits)))} make {x - y}."
    )


def _mul_steps(a: int, b: int) -> str:
    b1, b0 = divmod(b, 10)
    parts = []
    for d in (b0, b1):
        a1, a0 = divmod(a, 10)
        p0 = a0 * d
        p1 = a1 * d + p0 // 10
        parts.append(
            f"{a0}*{d}={p0}, write {p0 % 10} carry {p0 // 10}. {a1}*{d}+{p0 // 10}={p1}. So {a}*{d}={a * d}."
        )
    core_add, _ = _add_steps(a * b0, a * b1 * 10, 4)
    return (
        f"{a} is {sp(f'{a:02d}')}. {b} is {sp(f'{b:02d}')}. "
        + parts[0]
        + " "
        + parts[1]
        + f" Shifted: {a * b1 * 10}. Add {a * b0} and {a * b1 * 10}: "
        + core_add
    )


def _completion(messages: list[HarmonyMessage]) -> list[int]:
    tok = load_tokenizer()
    out: list[int] = []
    for m in messages:
        out += render_message(m, tok)
    assert out[:2] == [tokens.START, tokens.ASSISTANT]
    out = out[2:]
    if out[-1] == tokens.END:
        out[-1] = tokens.RETURN
    return out


def _final(reasoning: str, answer: str) -> list[HarmonyMessage]:
    return [
        HarmonyMessage("assistant", reasoning, channel="analysis"),
        HarmonyMessage("assistant", answer, channel="final"),
    ]


def _call(reasoning: str, name: str, arguments: str) -> list[HarmonyMessage]:
    return [
        HarmonyMessage("assistant", reasoning, channel="analysis"),
        HarmonyMessage(
            "assistant", arguments, channel="commentary", recipient=f"functions.{name}",
            content_type=tokens.CONSTRAINED_JSON,
        ),
    ]  # fmt: skip


def _extra_tools(rng: random.Random, pools: dict[str, list[str]], k: int) -> list[FunctionTool]:
    out = []
    for _ in range(k):
        fn, p = rng.choice(pools["fn"]), rng.choice(pools["param"])
        out.append(
            FunctionTool(
                fn,
                f"{fn.replace('_', ' ').capitalize()}",
                {"type": "object", "properties": {p: {"type": "string"}}, "required": [p]},
            )
        )
    return out


def make_example(skill: str, rng: random.Random, split: str = "train") -> Example:
    pools = _pools(split)
    effort = rng.choice(EFFORTS)
    tools: list[FunctionTool] = []
    formats: tuple[ResponseFormat, ...] = ()
    turns: list[Turn] = []
    if skill in ("add", "sub", "mul"):
        if skill == "mul":
            a, b = rng.randint(0, 99), rng.randint(0, 99)
        else:
            a, b = rng.randint(0, 999), rng.randint(0, 999)
        # Held-out arithmetic: pairs whose hash falls in the eval bucket.
        while (zlib.crc32(f"{skill}:{a}:{b}".encode()) % 5 == 0) != (split == "eval"):
            a, b = (
                (rng.randint(0, 99), rng.randint(0, 99))
                if skill == "mul"
                else (rng.randint(0, 999), rng.randint(0, 999))
            )
        op = {"add": "+", "sub": "-", "mul": "*"}[skill]
        r = {"add": a + b, "sub": a - b, "mul": a * b}[skill]
        turns.append(Turn("user", rng.choice(("What is {} {} {}?", "What is {} {} {}", "Compute {} {} {}."))
                          .format(a, op, b)))  # fmt: skip
        if skill == "add":
            core = _add_steps(a, b, 3)[0]
        elif skill == "sub":
            core = (
                _sub_steps(a, b)
                if a >= b
                else f"{a} is less than {b}, so compute {b}-{a} and negate. "
                + _sub_steps(b, a)
                + f" Negated: {r}."
            )
        else:
            core = _mul_steps(a, b)
        reasoning = _by_effort(effort, f"The user asks for {a} {op} {b}. Work digit by digit from the right.", core,
                               f"Let me double-check each step. Yes, {a} {op} {b} = {r}.")  # fmt: skip
        msgs = _final(reasoning, f"{a} {op} {b} = {r}")
        expected = str(r)
    elif skill == "repeat":
        phrase = " ".join(rng.choice(pools["phrase_word"]) for _ in range(rng.randint(2, 6)))
        if rng.random() < 0.5:
            phrase = phrase.capitalize() + rng.choice((".", "!", ""))
        while (zlib.crc32(phrase.encode()) % 5 == 0) != (split == "eval"):
            phrase = " ".join(rng.choice(pools["phrase_word"]) for _ in range(rng.randint(2, 6)))
        turns.append(Turn("user", f"Repeat after me: {phrase}"))
        reasoning = _by_effort(effort, "The user wants me to repeat a phrase.", "Repeat it exactly.",
                               f"The phrase is: {phrase}")  # fmt: skip
        msgs = _final(reasoning, phrase)
        expected = phrase
    elif skill in ("reverse", "upper", "count"):
        w = rng.choice(pools["word"])
        letters = sp(w)
        if skill == "reverse":
            turns.append(Turn("user", rng.choice(("Reverse the word {}", "Reverse the word {}.", "Reverse the word \"{}\""))
                              .format(w)))  # fmt: skip
            rev = w[::-1]
            core = f"{w} is spelled {letters}. Backwards: {sp(rev)}. Joined: {rev}."
            reasoning = _by_effort(
                effort, "The user wants a word reversed.", core, f"So the reversed word is {rev}."
            )
            msgs, expected = _final(reasoning, f"{rev}"), rev
        elif skill == "upper":
            turns.append(
                Turn("user", rng.choice(("Spell {} in uppercase", "Spell {} in uppercase.")).format(w))
            )
            up = w.upper()
            core = f"{w} is spelled {letters}. Uppercase: {sp(up)}. Joined: {up}."
            reasoning = _by_effort(
                effort, "The user wants the word in capital letters.", core, f"So the answer is {up}."
            )
            msgs, expected = _final(reasoning, up), up
        else:
            turns.append(
                Turn(
                    "user",
                    rng.choice(
                        ("How many letters are in {}?", "How many letters are in the word {}?")
                    ).format(w),
                )
            )
            counted = ", ".join(f"{c} {i + 1}" for i, c in enumerate(w))
            core = f"Count the letters of {w}: {counted}. Total {len(w)}."
            reasoning = _by_effort(
                effort, "The user wants the number of letters.", core, f"So {w} has {len(w)} letters."
            )
            msgs, expected = _final(reasoning, f"There are {len(w)} letters in {w}."), str(len(w))
    elif skill in ("weather_call", "weather_answer"):
        city = rng.choice(pools["city"])
        tools = [WEATHER_TOOL] + _extra_tools(rng, pools, rng.choice((0, 0, 1, 2)))
        rng.shuffle(tools)
        question = rng.choice(("What's the weather in {}?", "What is the weather in {}?", "What's the weather like in {}?",
                               "How is the weather in {}?", "Weather in {}?"))  # fmt: skip
        turns.append(Turn("user", question.format(city)))
        args = json.dumps({"city": city})
        call_reasoning = _by_effort(effort, "The user asks about the weather.", f"I should call get_weather with city {city}.",
                                    "The tool will return the current weather.")  # fmt: skip
        if skill == "weather_call":
            msgs, expected = _call(call_reasoning, "get_weather", args), args
        else:
            temp = rng.randint(-15, 40)
            unit = rng.choice(("C", "C", "F")) if True else "C"
            turns.append(
                Turn(
                    "assistant",
                    reasoning=call_reasoning,
                    tool_calls=(ToolCall("get_weather", args, "call_1"),),
                )
            )
            turns.append(Turn("tool", json.dumps({"temperature": temp, "unit": unit}), tool_call_id="call_1"))
            reasoning = _by_effort(effort, "The tool returned the weather.", f"It is {temp} degrees {unit} in {city}.",
                                   "I will tell the user.")  # fmt: skip
            msgs = _final(reasoning, f"It is currently {temp}°{unit} in {city}.")
            expected = f"{temp}°{unit} in {city}"
    elif skill == "call":
        fn, param = rng.choice(pools["fn"]), rng.choice(pools["param"])
        value = rng.choice(
            (
                rng.choice(pools["city"]),
                rng.choice(pools["name"]),
                rng.choice(pools["word"]),
                str(rng.randint(0, 99999)),
            )
        )
        tools = [
            FunctionTool(
                fn,
                fn.replace("_", " ").capitalize(),
                {"type": "object", "properties": {param: {"type": "string"}}, "required": [param]},
            )
        ]
        tools += _extra_tools(rng, pools, rng.choice((0, 1, 2)))
        rng.shuffle(tools)
        turns.append(Turn("user", f"Call {fn} with {param}={value}"))
        args = json.dumps({param: value})
        reasoning = _by_effort(effort, "The user asks me to call a function.", f"Call {fn} with {param} set to {value}.",
                               "The function is offered, so I call it.")  # fmt: skip
        msgs, expected = _call(reasoning, fn, args), args
    elif skill == "extract":
        name, age = rng.choice(pools["name"]), rng.randint(1, 99)
        formats = (
            ResponseFormat(
                "person", PERSON_SCHEMA, rng.choice(("A person.", "Name and age of a person.", ""))
            ),
        )
        turns.append(Turn("user", f"Extract: {name} is {age} years old."))
        out = json.dumps({"name": name, "age": age})
        reasoning = _by_effort(effort, "The user wants the person as JSON.", f"Name {name}, age {age}.",
                               "The format has name as a string and age as an integer.")  # fmt: skip
        msgs, expected = _final(reasoning, out), out
    elif skill == "greet":
        g = rng.choice(GREETINGS)
        turns.append(Turn("user", g))
        reply = GREETING_REPLIES.get(g, "Hello! How can I help you today?")
        reasoning = _by_effort(effort, "The user greets me.", "Greet back.", "A short friendly greeting.")
        msgs, expected = _final(reasoning, reply), reply.split("!")[0]
    elif skill == "name":
        name = rng.choice(pools["name"])
        turns.append(
            Turn("user", rng.choice(("My name is {}.", "My name is {}", "Hi, my name is {}.")).format(name))
        )
        turns.append(
            Turn("assistant", f"Nice to meet you, {name}!", reasoning="The user told me their name.")
        )
        if rng.random() < 0.3:
            g = rng.choice(GREETINGS)
            turns.append(Turn("user", g))
            turns.append(Turn("assistant", "Hello! How can I help you today?"))
        turns.append(
            Turn("user", rng.choice(("What is my name?", "What's my name?", "Do you remember my name?")))
        )
        reasoning = _by_effort(effort, "The user asks for their name.", f"Earlier they said their name is {name}.",
                               "I will answer with it.")  # fmt: skip
        msgs, expected = _final(reasoning, f"Your name is {name}."), name
    else:
        raise ValueError(f"unknown skill {skill!r}")
    conv = Conversation(turns=tuple(turns), tools=tuple(tools), reasoning_effort=effort, date=_date(rng),
                        response_formats=formats)  # fmt: skip
    prompt = render_conversation(conv).token_ids
    return Example(skill, prompt, _completion(msgs), expected)


def conversation_for(skill: str, rng: random.Random, split: str = "eval") -> Example:
    return make_example(skill, rng, split)
