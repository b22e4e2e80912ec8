"""Validity of constrained decoding over generated JSON Schemas, many seeds at temperature 1, on
the real engine with a random-weight model: every structured answer parses, validates with
``jsonschema`` and finishes ``stop``; every ``required`` turn ends in a valid call (50 seeds
each, sampled as one continuous batch, as a server would)."""

from __future__ import annotations

import json
import os
import re

import jsonschema
import pytest
import torch
from harmony_oracle import oracle_parse
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.types import SamplingParams
from harmony import tokens
from harmony.tokenizer import load_tokenizer
from server.guided import GrammarCompiler
from server.guided_grammar import CallRule, FinalRule
from server.structured import RequestGuide, TurnRules

SEEDS = 50
PROMPT = "<|start|>user<|message|>Answer.<|end|><|start|>assistant"
LARK = 'start: "echo " WORD (" " WORD)?\nWORD: /[a-z]{1,4}/'

names = st.sampled_from(["a", "b", "id", "name", "tags"])
leaf = st.one_of(
    st.just({"type": "boolean"}),
    st.builds(lambda lo, span: {"type": "integer", "minimum": lo, "maximum": lo + span}, st.integers(-50, 50), st.integers(0, 99)),
    st.builds(lambda n: {"type": "string", "maxLength": n}, st.integers(0, 6)),
    st.builds(lambda vs: {"enum": vs}, st.lists(st.sampled_from(["x", "y", 1, None, True]), min_size=1, max_size=3, unique=True)),
)  # fmt: skip


def _object(children):
    return st.builds(
        lambda props, required: {
            "type": "object",
            "properties": props,
            "required": [k for k in props if k in required],
            "additionalProperties": False,
        },
        st.dictionaries(names, children, min_size=1, max_size=3),
        st.sets(names),
    )


schemas = st.recursive(
    leaf,
    lambda children: st.one_of(
        _object(children),
        st.builds(
            lambda item, n: {"type": "array", "items": item, "maxItems": n}, children, st.integers(0, 3)
        ),
        st.builds(lambda a, b: {"anyOf": [a, b]}, children, children),
    ),
    max_leaves=6,
)
object_schemas = _object(schemas)


@pytest.fixture(scope="module")
def engine(tiny_checkpoint_dir):
    return LLMEngine(
        EngineConfig(model_dir=str(tiny_checkpoint_dir), kv_cache_memory=128 << 20, max_num_seqs=64)
    )


@pytest.fixture(scope="module")
def compiler():
    return GrammarCompiler(load_tokenizer())


def run_batch(engine, compiler, rules: TurnRules, max_tokens: int = 160) -> list[tuple[list[int], str]]:
    """SEEDS requests at temperature 1, one batch: (completion tokens, finish reason) each."""
    guide = RequestGuide(rules, max_reasoning_tokens=6)
    prompt = compiler.tokenizer.encode_with_specials(PROMPT)
    results: dict[str, list[int]] = {}
    reasons: dict[str, str] = {}
    for seed in range(SEEDS):
        params = SamplingParams(temperature=1.0, seed=seed, max_tokens=max_tokens, stop_token_ids=[tokens.RETURN, tokens.CALL],
                                constraint=compiler.constraint(guide.guide(max_tokens)))  # fmt: skip
        engine.add_request(f"r{seed}", prompt, params)
        results[f"r{seed}"] = []
    while engine.has_unfinished():
        for out in engine.step():
            results[out.request_id] += out.token_ids
            if out.finished:
                reasons[out.request_id] = out.finish_reason
    return [(results[k], reasons[k]) for k in results]


@pytest.mark.slow
@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(schema=object_schemas)
def test_structured_answers_validate_for_generated_schemas(engine, compiler, schema):
    compiler.check(
        RequestGuide(TurnRules(FinalRule(schema=schema), constrained=True), 6).guide(160).grammar, "s"
    )
    for completion, reason in run_batch(
        engine, compiler, TurnRules(FinalRule(schema=schema), constrained=True)
    ):
        assert reason == "stop", compiler.tokenizer.decode_with_specials(completion)
        final = oracle_parse(completion)[-1]
        assert final["channel"] == "final"
        jsonschema.validate(json.loads(final["content"]), schema)


def test_required_named_and_custom_calls_always_hold(engine, compiler):
    weather = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 5}}, "required": ["city"],
               "additionalProperties": False}  # fmt: skip
    calls = [CallRule("get_weather", weather), CallRule("shell", ("lark", LARK))]
    required = TurnRules(None, calls, preambles=False, constrained=True)
    for completion, reason in run_batch(engine, compiler, required):
        assert reason == "stop" and completion[-1] == tokens.CALL
        call = oracle_parse(completion)[-1]
        assert call["recipient"] in ("functions.get_weather", "functions.shell")
        if call["recipient"] == "functions.shell":
            assert re.fullmatch(r"echo [a-z]{1,4}( [a-z]{1,4})?", call["content"])
        else:
            jsonschema.validate(json.loads(call["content"]), weather)
    named = TurnRules(None, calls[:1], preambles=False, constrained=True)
    for completion, _ in run_batch(engine, compiler, named):
        assert oracle_parse(completion)[-1]["recipient"] == "functions.get_weather"
    # auto with a strict function: any call the model makes has valid arguments.
    auto = TurnRules(FinalRule(), calls[:1], constrained=True)
    for completion, reason in run_batch(engine, compiler, auto):
        last = oracle_parse(completion)[-1] if reason == "stop" else None
        if last and last["recipient"]:
            jsonschema.validate(json.loads(last["content"]), weather)


def test_a_batch_without_constraints_does_no_mask_work(tiny_checkpoint_dir):
    engine = LLMEngine(EngineConfig(model_dir=str(tiny_checkpoint_dir), kv_cache_memory=32 << 20))
    engine.add_request("plain", [1, 2, 3], SamplingParams(max_tokens=4))
    while engine.has_unfinished():
        engine.step()
    assert engine._mask_worker is None  # never created: no mask was ever asked for


def _os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def test_the_mask_worker_runs_no_parallel_region(tiny_checkpoint_dir, compiler):
    """The mask worker never enters an OpenMP parallel region: a pool of workers of its own
    would outlive the step and stop GNU OpenMP's spin-wait for the engine thread for good
    (engine/async_engine.py). Counted as OS threads: the worker adds itself, a pool would add
    its OpenMP workers. 50 constrained rows make every mask tensor big enough to go parallel."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        engine = LLMEngine(
            EngineConfig(model_dir=str(tiny_checkpoint_dir), kv_cache_memory=64 << 20, max_num_seqs=64)
        )
        engine.add_request("plain", [1, 2, 3], SamplingParams(max_tokens=2))
        while engine.has_unfinished():
            engine.step()  # this thread's own pool, if any, exists from here on
        before = _os_threads()
        calls = [CallRule("get_weather", {"type": "object", "properties": {"city": {"type": "string"}}})]
        run_batch(engine, compiler, TurnRules(None, calls, preambles=False, constrained=True), max_tokens=8)
        assert engine._mask_worker is not None
        assert _os_threads() == before + 1  # the mask worker alone
    finally:
        torch.set_num_threads(threads)
