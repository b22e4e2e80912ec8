"""Held-out accuracy per skill, through the real engine (`LLMEngine`, the normal loader).

Well-formed: the completion parses (harmony.parser) into assistant messages without a problem,
every message but the last ends in `<|end|>`, and the last is a `final` answer ending in
`<|return|>` or, for the tool skills, a `commentary` call to `functions.NAME` ending in
`<|call|>`. Correct: well-formed and the skill's rule holds (see `correct`).
"""

from __future__ import annotations

import json
import random
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from demo.data import SKILLS, Example, make_example
from harmony import tokens
from harmony.parser import MessageEnd, ParsedMessage, StreamingParser

CALL_SKILLS = ("weather_call", "call")
GREETING_WORDS = ("Hello", "Hi", "Hey", "Good morning", "Good afternoon", "Good evening")
MAX_TOKENS = 512


@dataclass(frozen=True)
class Parsed:
    messages: list[MessageEnd]
    problems: list[str]


def parse(completion: list[int]) -> Parsed:
    parser = StreamingParser()
    events = [e for t in completion for e in parser.feed(t)] + parser.finish()
    return Parsed([e for e in events if isinstance(e, MessageEnd)], list(parser.problems))


def well_formed(skill: str, completion: list[int]) -> bool:
    p = parse(completion)
    if p.problems or not p.messages or any(m.message.role != "assistant" for m in p.messages):
        return False
    if any(m.terminator != "end" for m in p.messages[:-1]):
        return False
    last = p.messages[-1]
    if skill in CALL_SKILLS:
        recipient = last.message.recipient or ""
        return (
            last.terminator == "call"
            and last.message.channel == "commentary"
            and recipient.startswith("functions.")
        )
    return last.terminator == "return" and last.message.channel == "final"


def _json(text: str) -> object:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _has_number(text: str, value: int) -> bool:
    return re.search(rf"(?<![\d.-]){re.escape(str(value))}(?![\d])", text) is not None


def correct(skill: str, expected: str, last: ParsedMessage) -> bool:
    """The skill's rule on the last message (the final answer or the call)."""
    text = last.content.strip()
    if skill in ("add", "sub", "mul"):
        numbers = re.findall(r"-?\d+", text.replace(",", ""))
        return bool(numbers) and numbers[-1] == expected
    if skill in ("repeat", "reverse", "upper"):
        return text == expected
    if skill == "count":
        numbers = re.findall(r"\d+", text)
        return bool(numbers) and numbers[0] == expected
    if skill == "weather_call":
        return last.recipient == "functions.get_weather" and _json(text) == json.loads(expected)
    if skill == "call":
        want = json.loads(expected)
        return last.recipient == f"functions.{want['name']}" and _json(text) == want["arguments"]
    if skill == "weather_answer":
        want = json.loads(expected)
        return _has_number(text, want["temperature"]) and want["city"] in text
    if skill == "extract":
        return _json(text) == json.loads(expected)
    if skill == "greet":
        return len(text) <= 80 and any(text.startswith(g) for g in GREETING_WORDS)
    if skill == "name":
        return re.search(rf"\b{re.escape(expected)}\b", text) is not None
    raise ValueError(f"unknown skill {skill!r}")


def score(example: Example, completion: list[int]) -> tuple[bool, bool]:
    """-> (well-formed, correct)."""
    if not well_formed(example.skill, completion):
        return False, False
    return True, correct(example.skill, example.expected, parse(completion).messages[-1].message)


def eval_examples(per_skill: int, seed: int) -> list[Example]:
    rng = random.Random(seed)
    return [make_example(skill, rng, "eval") for skill in SKILLS for _ in range(per_skill)]


def generate(checkpoint: Path, examples: list[Example], temperature: float, seed: int) -> list[list[int]]:
    """One completion per example, all in flight at once on the engine."""
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine
    from engine.types import SamplingParams

    # Every example is queued at once: the queue bound must hold them all (--per-skill 200 is
    # 2,600 requests).
    engine = LLMEngine(EngineConfig(model_dir=str(checkpoint), max_num_seqs=64, seed=seed,
                                    max_waiting=len(examples)))  # fmt: skip
    stops = [tokens.RETURN, tokens.CALL]
    out: dict[str, list[int]] = {}
    for i, e in enumerate(examples):
        params = SamplingParams(
            temperature=temperature, max_tokens=MAX_TOKENS, stop_token_ids=stops, seed=seed + i
        )
        engine.add_request(str(i), e.prompt, params)
        out[str(i)] = []
    while engine.has_unfinished():
        for o in engine.step():
            out[o.request_id] += o.token_ids
    return [out[str(i)] for i in range(len(examples))]


def table(examples: list[Example], runs: dict[str, list[list[int]]]) -> str:
    """Markdown: per skill and run, % well-formed and % correct."""
    head = "| skill | n | " + " | ".join(f"{r} well-formed | {r} correct" for r in runs) + " |"
    lines = [head, "|" + "---|" * (2 + 2 * len(runs))]
    for skill in (*SKILLS, "all"):
        idx = [i for i, e in enumerate(examples) if skill in ("all", e.skill)]
        cells = [skill, str(len(idx))]
        for completions in runs.values():
            scores = [score(examples[i], completions[i]) for i in idx]
            cells += [f"{100 * sum(s[k] for s in scores) / len(idx):.1f}%" for k in (0, 1)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(checkpoint: Path, per_skill: int = 50, seed: int = 1) -> str:
    examples = eval_examples(per_skill, seed)
    with tempfile.TemporaryDirectory() as tmp:
        if (checkpoint / "trained.pt").exists():  # a run folder: export it first
            from demo.export import expand_artifact, write_artifact

            artifact = Path(tmp) / "artifact" / "model.safetensors"
            write_artifact(checkpoint / "trained.pt", artifact)
            expand_artifact(artifact, Path(tmp) / "hf")
            checkpoint = Path(tmp) / "hf"
        runs = {"greedy": generate(checkpoint, examples, 0.0, seed),
                "T=1": generate(checkpoint, examples, 1.0, seed)}  # fmt: skip
    report = table(examples, runs)
    print(report)
    return report
