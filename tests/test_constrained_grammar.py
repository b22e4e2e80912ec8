"""The constrained Harmony turn (``server.guided_grammar`` + ``server.guided``), without a model.

The rule under test: whatever a model samples under the mask is a Harmony completion that
openai-harmony parses, ending the way the request permits (the final answer valid under its
schema, or a call of a permitted function with valid arguments, or a custom tool's input in its
grammar), with the lead-in inside the reasoning budget. Checked two ways: the shapes Harmony
writes are accepted and the known escapes are refused; and random walks, which sample
uniformly among the allowed tokens at every step, always end in a valid turn.
"""

from __future__ import annotations

import json
import random
import re

import jsonschema
import pytest
import torch
from harmony_oracle import oracle_parse

from engine.sampler import unpack_bits
from harmony import tokens
from harmony.tokenizer import load_tokenizer
from server.guided import GrammarCompiler, Guide
from server.guided_grammar import CallRule, FinalRule, content_grammar, turn_grammar

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
          "age": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["name", "age"], "additionalProperties": False}  # fmt: skip
CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 5}},
        "required": ["city"], "additionalProperties": False}  # fmt: skip
CODE = r"[A-Z]{2}-[0-9]{3}"


@pytest.fixture(scope="module")
def compiler() -> GrammarCompiler:
    return GrammarCompiler(load_tokenizer())


def accepts(compiler: GrammarCompiler, grammar: str, text: str) -> bool:
    matcher = compiler.matcher(grammar)
    return matcher.consume_tokens(compiler.tokenizer.encode_with_specials(text)) and matcher.is_accepting()


STRUCTURED = turn_grammar(FinalRule(schema=PERSON), [], preambles=False)
REQUIRED = turn_grammar(None, [CallRule("get_weather", CITY), CallRule("lookup", "any")], preambles=False)
NAMED_CUSTOM = turn_grammar(None, [CallRule("code", ("regex", CODE))], preambles=False)
AUTO_STRICT = turn_grammar(FinalRule(), [CallRule("get_weather", CITY)], preambles=True)

ANALYSIS = "<|channel|>analysis<|message|>Think.<|end|><|start|>assistant"
ACCEPTED = {
    "structured answer": (STRUCTURED, ANALYSIS + '<|channel|>final<|message|>{"name": "Bo", "age": 3}<|return|>'),
    "structured, no analysis": (STRUCTURED, '<|channel|>final<|message|>{"name":"Al","age":40}<|return|>'),
    "call, channel first": (REQUIRED, ANALYSIS + '<|channel|>commentary to=functions.get_weather <|constrain|>json'
                            '<|message|>{"city": "Oslo"}<|call|>'),
    "call, recipient first": (REQUIRED, ' to=functions.get_weather<|channel|>commentary <|constrain|>json'
                              '<|message|>{"city":"Rome"}<|call|>'),
    "any-JSON arguments": (REQUIRED, '<|channel|>commentary to=functions.lookup <|constrain|>json<|message|>'
                           '{"q": [1, 2]}<|call|>'),
    "custom tool input": (NAMED_CUSTOM, ANALYSIS + "<|channel|>commentary to=functions.code<|message|>AB-123<|call|>"),
    "auto: free answer": (AUTO_STRICT, ANALYSIS + "<|channel|>final<|message|>Anything at all.<|return|>"),
    "auto: preamble then call": (AUTO_STRICT, "<|channel|>commentary<|message|>Checking.<|end|><|start|>assistant"
                                 '<|channel|>commentary to=functions.get_weather <|constrain|>json'
                                 '<|message|>{"city": "Lima"}<|call|>'),
}  # fmt: skip
REFUSED = {
    # vLLM #23120: a constrain header on the final channel escapes a JSON grammar.
    "constrain header on final": (STRUCTURED, '<|channel|>final <|constrain|>json<|message|>{"name": "Bo", "age": 3}<|return|>'),
    "JSON not of the schema": (STRUCTURED, '<|channel|>final<|message|>{"name": "Bo"}<|return|>'),
    "answer ends in <|call|>": (STRUCTURED, '<|channel|>final<|message|>{"name": "Bo", "age": 3}<|call|>'),
    "a final answer under required": (REQUIRED, "<|channel|>final<|message|>No.<|return|>"),
    "an unoffered function": (REQUIRED, '<|channel|>commentary to=functions.rm <|constrain|>json<|message|>{}<|call|>'),
    "a built-in tool": (REQUIRED, '<|channel|>commentary to=browser.search <|constrain|>json<|message|>{}<|call|>'),
    "arguments off the schema": (REQUIRED, '<|channel|>commentary to=functions.get_weather <|constrain|>json'
                                 '<|message|>{"town": "Oslo"}<|call|>'),
    "a preamble under required": (REQUIRED, "<|channel|>commentary<|message|>Sure.<|end|><|start|>assistant"
                                  '<|channel|>commentary to=functions.lookup <|constrain|>json<|message|>{}<|call|>'),
    "custom input off its grammar": (NAMED_CUSTOM, "<|channel|>commentary to=functions.code<|message|>ab-12<|call|>"),
    "a call ending in <|return|>": (AUTO_STRICT, '<|channel|>commentary to=functions.get_weather <|constrain|>json'
                                    '<|message|>{"city": "Lima"}<|return|>'),
}  # fmt: skip


@pytest.mark.parametrize("case", list(ACCEPTED))
def test_what_harmony_writes_is_accepted(compiler, case):
    grammar, text = ACCEPTED[case]
    assert accepts(compiler, grammar, text)
    messages = oracle_parse(
        compiler.tokenizer.encode_with_specials(text)
    )  # well-formed for the official parser
    assert messages and messages[-1]["role"] == "assistant"


@pytest.mark.parametrize("case", list(REFUSED))
def test_escapes_are_refused(compiler, case):
    grammar, text = REFUSED[case]
    assert not accepts(compiler, grammar, text)


_ONE_BYTE: dict[int, frozenset[int]] = {}


def one_byte_tokens(compiler: GrammarCompiler) -> frozenset[int]:
    if id(compiler) not in _ONE_BYTE:
        token_bytes = compiler.tokenizer.token_bytes
        _ONE_BYTE[id(compiler)] = frozenset(
            t for t in range(tokens.FIRST_SPECIAL) if len(token_bytes(t)) == 1
        )
    return _ONE_BYTE[id(compiler)]


def walk(compiler: GrammarCompiler, guide: Guide, seed: int, max_steps: int = 600) -> list[int]:
    """Sample uniformly among the allowed tokens (half the time among the allowed ones of one
    byte, so values end in reasonable time) until a stop token."""
    rng = random.Random(seed)
    constraint = compiler.constraint(guide)
    out: list[int] = []
    short = one_byte_tokens(compiler)
    for _ in range(max_steps):
        row = torch.zeros((tokens.VOCAB_SIZE + 31) // 32, dtype=torch.int32)
        if constraint.fill_mask(row):
            allowed = unpack_bits(row[None], tokens.VOCAB_SIZE)[0].nonzero().flatten().tolist()
        else:
            allowed = list(range(tokens.FIRST_SPECIAL))
        small = [t for t in allowed if t in short or t >= tokens.FIRST_SPECIAL]
        token = rng.choice(small if small and rng.random() < 0.5 else allowed)
        constraint.advance(token)
        out.append(token)
        if token in (tokens.RETURN, tokens.CALL):
            return out
    raise AssertionError("the walk did not end")


def lead_in_tokens(completion: list[int]) -> int:
    """Body tokens of analysis and preamble messages (what the budget counts)."""
    count, body, header = 0, False, []
    for token in completion:
        if token == tokens.START:
            body, header = False, []
        elif not body:
            body = token == tokens.MESSAGE
            header.append(token)
        elif token in tokens.TERMINATORS:
            body = False
        else:
            text = load_tokenizer().decode_with_specials(header)
            count += "to=" not in text and "final" not in text
    return count


@pytest.mark.parametrize("seed", range(6))
def test_random_walks_end_in_a_valid_turn(compiler, seed):
    budget = 12
    # Structured answer: the final JSON is valid under the schema.
    rest = turn_grammar(FinalRule(schema=PERSON), [], preambles=False, analysis=False, restart=True)
    completion = walk(compiler, Guide(STRUCTURED, rest, budget), seed)
    messages = oracle_parse(completion)
    assert messages[-1]["channel"] == "final" and completion[-1] == tokens.RETURN
    jsonschema.validate(json.loads(messages[-1]["content"]), PERSON)
    assert lead_in_tokens(completion) <= budget
    # Required: a call of an offered function, arguments valid.
    calls = [CallRule("get_weather", CITY), CallRule("code", ("regex", CODE))]
    rest = turn_grammar(None, calls, preambles=False, analysis=False, restart=True)
    completion = walk(compiler, Guide(turn_grammar(None, calls, preambles=False), rest, budget), seed)
    last = oracle_parse(completion)[-1]
    assert completion[-1] == tokens.CALL and last["recipient"] in ("functions.get_weather", "functions.code")
    if last["recipient"] == "functions.code":
        assert re.fullmatch(CODE, last["content"]) and last["content_type"] in (None, "")
    else:
        jsonschema.validate(json.loads(last["content"]), CITY)
        assert last["content_type"] == "<|constrain|>json"
    # A budget of 0: no lead-in at all.
    grammar = turn_grammar(FinalRule(schema=PERSON), [], preambles=False, analysis=False)
    completion = walk(compiler, Guide(grammar, None, 0), seed)
    assert lead_in_tokens(completion) == 0 and oracle_parse(completion)[0]["channel"] == "final"


def test_a_budget_alone_closes_free_reasoning(compiler):
    """No grammar until the budget: then the analysis closes and the turn goes on without one."""
    rest = turn_grammar(FinalRule(), [], preambles=False, analysis=False, restart=True)
    constraint = compiler.constraint(Guide(None, rest, 3))
    row = torch.zeros((tokens.VOCAB_SIZE + 31) // 32, dtype=torch.int32)
    assert not constraint.fill_mask(row) and not row.any()  # free: no mask work
    for token in compiler.tokenizer.encode_with_specials("<|channel|>analysis<|message|>one two three"):
        constraint.advance(token)
    assert constraint.fill_mask(row)
    assert unpack_bits(row[None], tokens.VOCAB_SIZE)[0].nonzero().flatten().tolist() == [tokens.END]


def test_content_grammars_and_compile_errors(compiler):
    assert accepts(compiler, content_grammar("regex", CODE), "XY-007")
    assert not accepts(compiler, content_grammar("regex", CODE), "XY-07")
    assert accepts(compiler, content_grammar("json", CITY), '{"city": "Oslo"}')
    assert accepts(compiler, content_grammar("lark", 'start: "yes" | "no"'), "no")
    for grammar in (content_grammar("lark", "start: nothing_here"), content_grammar("json", {"type": "wat"}),
                    content_grammar("regex", "(unclosed")):  # fmt: skip
        with pytest.raises(Exception) as exc:
            compiler.check(grammar, "structured_outputs")
        assert exc.value.status == 400 and exc.value.param == "structured_outputs"


@pytest.mark.parametrize("seed", range(4))
def test_constrained_turns_come_back_as_reasoning_and_answer_without_leaks(compiler, seed):
    """The leak fuzz with constraints on: what a constrained walk writes, assembled as the
    server does, gives the analysis as reasoning and the JSON as content, no special text."""
    from engine.types import RequestOutput
    from server import events as ev
    from server.harmony_output import HarmonyAssembler

    rest = turn_grammar(FinalRule(schema=PERSON), [], preambles=False, analysis=False, restart=True)
    completion = walk(compiler, Guide(STRUCTURED, rest, 10), seed)
    assembler = HarmonyAssembler(0, compiler.tokenizer, [])
    out = RequestOutput("r", completion, finish_reason="stop", stop_token_id=completion[-1])
    events = assembler.feed(out)
    reasoning = "".join(e.text for e in events if isinstance(e, ev.ReasoningText))
    content = "".join(e.text for e in events if isinstance(e, ev.ContentText))
    messages = oracle_parse(completion)
    assert content == messages[-1]["content"]
    assert reasoning == "".join(m["content"] for m in messages if m["channel"] == "analysis")
    for text in (reasoning, content):
        assert not any(special in text for special in tokens.NAMED_SPECIALS)
    jsonschema.validate(json.loads(content), PERSON)
