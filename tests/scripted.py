"""Scripted sampling for API tests: the real model, engine and server run; only the sampler's
choice of token is replaced (its logprobs stay the model's).

Random weights rarely write valid Harmony, so exact reasoning/tool-call tests script what the
model "writes". ``install_script(llm_engine, source)`` swaps the engine's sampler; a server
subprocess gets it through ``tests/scripted_server.py --script FILE`` (see
``tests/server_process.ServerProcess(script=...)``). The file is JSON::

    {"rules": [{"match": "SCRIPT:weather", "output": "<|channel|>analysis<|message|>..."}],
     "default": "<|channel|>final<|message|>Hello<|return|>",
     "repeat": false, "delay_seconds": 0.0}

A rule applies when its ``match`` occurs in the prompt text after the last user message
header (so tool definitions in the system part never match). ``output`` is Harmony text with
special tokens written as text. Past the end of the script the last token repeats, or with
``repeat`` the script starts over (long streams for drain tests); ``delay_seconds`` (per rule
or for all) sleeps per token so streams last a predictable time.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.llm_engine import LLMEngine
from engine.sampler import Sampler, SamplerOutput
from engine.sequence import Sequence as EngineSequence
from harmony.tokenizer import HarmonyTokenizer

TokenSource = Callable[[Sequence[int], Sequence[int]], int]  # (prompt ids, output ids) -> next id

_USER_HEADER = "<|start|>user"
_CACHE_LIMIT = 4096


@dataclass(frozen=True)
class ScriptRule:
    match: str
    token_ids: tuple[int, ...]
    repeat: bool
    delay_seconds: float = 0.0


class ScriptedTokenSource:
    def __init__(
        self,
        tokenizer: HarmonyTokenizer,
        rules: list[ScriptRule],
        default: ScriptRule,
    ) -> None:
        self._tokenizer = tokenizer
        self._rules = rules
        self._default = default
        self._chosen: dict[tuple[int, ...], ScriptRule] = {}

    @classmethod
    def from_file(cls, path: Path, tokenizer: HarmonyTokenizer) -> ScriptedTokenSource:
        spec = json.loads(Path(path).read_text())
        repeat = bool(spec.get("repeat", False))
        delay = float(spec.get("delay_seconds", 0.0))

        def rule(r: dict) -> ScriptRule:
            ids = tuple(tokenizer.encode_with_specials(r["output"]))
            if not ids:
                raise ValueError(f"empty scripted output for match {r.get('match')!r}")
            return ScriptRule(
                r.get("match", ""),
                ids,
                bool(r.get("repeat", repeat)),
                float(r.get("delay_seconds", delay)),
            )

        rules = [rule(r) for r in spec.get("rules", [])]
        default = rule({"output": spec.get("default", "<|channel|>final<|message|>OK<|return|>")})
        return cls(tokenizer, rules, default)

    def _rule_for(self, prompt_ids: Sequence[int]) -> ScriptRule:
        key = tuple(prompt_ids)
        rule = self._chosen.get(key)
        if rule is None:
            text = self._tokenizer.decode_with_specials(key)
            tail = text[text.rfind(_USER_HEADER) :] if _USER_HEADER in text else text
            rule = next((r for r in self._rules if r.match in tail), self._default)
            if len(self._chosen) >= _CACHE_LIMIT:
                self._chosen.clear()
            self._chosen[key] = rule
        return rule

    def __call__(self, prompt_ids: Sequence[int], output_ids: Sequence[int]) -> int:
        rule = self._rule_for(prompt_ids)
        n = len(output_ids)
        ids = rule.token_ids
        token = ids[n % len(ids)] if rule.repeat else ids[min(n, len(ids) - 1)]
        if rule.delay_seconds:
            time.sleep(rule.delay_seconds)
        return token


class ScriptedSampler:
    """Takes each row's token from ``source``; logprobs are the real sampler's for that token."""

    def __init__(self, sampler: Sampler, source: TokenSource) -> None:
        self.sampler = sampler
        self.source = source

    def new_masks(self, seqs: list[EngineSequence]):
        return self.sampler.new_masks(seqs)

    def fill_masks(self, seqs: list[EngineSequence], masks):
        return self.sampler.fill_masks(seqs, masks)

    def __call__(self, logits: torch.Tensor, seqs: list[EngineSequence], masks=None) -> SamplerOutput:
        """``masks`` are ignored: a script says which tokens come, constrained or not."""
        if not seqs:
            return SamplerOutput([], [])
        chosen = [int(self.source(s.prompt_ids, s.output_ids)) for s in seqs]
        tokens = torch.tensor(chosen, dtype=torch.long, device=logits.device)
        return SamplerOutput(chosen, self.sampler.logprobs_of(logits, seqs, tokens))


def install_script(engine: LLMEngine, source: TokenSource) -> LLMEngine:
    engine.sampler = ScriptedSampler(engine.sampler, source)  # type: ignore[assignment]
    return engine
