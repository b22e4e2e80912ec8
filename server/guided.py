"""Constrained decoding: a request's grammar compiled by llguidance, and the per-choice
constraint the engine applies (``engine.types.TokenConstraint``).

A ``Guide`` is what one request permits: the grammar of its whole turn (None: the model is
free), the grammar that takes over once its reasoning budget closes the analysis, and the
budget. Each choice gets its own ``GuidedConstraint``: an llguidance matcher advanced token
by token, and a small Harmony tracker that counts the tokens of analysis messages (and of
preambles, which come before the answer too). When the count reaches the budget the only
allowed token is ``<|end|>``; after it the rest of the turn follows the grammar without
analysis or preambles, so the constrained part begins and the answer fits in the limit.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import llguidance
import torch

from harmony import tokens
from harmony.tokenizer import HarmonyTokenizer
from server.errors import APIError

logger = logging.getLogger("server.guided")
_ENDING = (tokens.RETURN, tokens.CALL, tokens.ENDOFTEXT)  # what a failed constraint still allows


def _set_bit(row: torch.Tensor, token_id: int) -> None:
    word, bit = divmod(token_id, 32)
    value = int(row[word]) | (1 << bit)
    row[word] = value - (1 << 32) if value >= 1 << 31 else value  # int32 two's complement


@dataclass(frozen=True)
class Guide:
    """What a request permits. ``grammar``: llguidance grammar of the turn from its first token
    (None: unconstrained); ``rest``: of the turn after a budget-closed analysis, which starts at
    ``<|start|>`` (None: unconstrained); ``budget``: analysis tokens (None: no limit)."""

    grammar: str | None
    rest: str | None = None
    budget: int | None = None


class GrammarCompiler:
    """llguidance over the o200k_harmony vocabulary (its tokenizer takes ~1 s to build: one per
    app, built on first use). Grammars are checked here, before a request is queued."""

    def __init__(self, tokenizer: HarmonyTokenizer, vocab_size: int = tokens.VOCAB_SIZE) -> None:
        encoding = tokenizer.encoding
        # The model has VOCAB_SIZE rows; the encoding names one reserved id past them.
        specials = {text: i for text, i in encoding._special_tokens.items() if i < vocab_size}
        self.tokenizer = tokenizer
        self.lltokenizer = llguidance.LLTokenizer.from_tiktoken(  # type: ignore[attr-defined]
            encoder=encoding._mergeable_ranks,
            special_tokens=specials,
            pattern=encoding._pat_str,
            eos_token=list(_ENDING),
            n_vocab=vocab_size,
        )

    def check(self, grammar: str, param: str) -> None:
        """A 400 naming ``param``, with the compiler's message, for a grammar that cannot compile."""
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self.lltokenizer)
        if is_error:
            detail = messages[0].split("<state>")[0].strip() if messages else "invalid grammar"
            raise APIError(400, f"The schema or grammar cannot be compiled: {detail}", param=param,
                           code="invalid_grammar")  # fmt: skip

    def matcher(self, grammar: str) -> llguidance.LLMatcher:
        return llguidance.LLMatcher(self.lltokenizer, grammar, log_level=0)

    def constraint(self, guide: Guide) -> GuidedConstraint:
        return GuidedConstraint(self, guide)


class GuidedConstraint:
    """One choice's constraint (see the module doc). Never raises into the engine."""

    def __init__(self, compiler: GrammarCompiler, guide: Guide) -> None:
        self._compiler = compiler
        self._guide = guide
        self._matcher = compiler.matcher(guide.grammar) if guide.grammar is not None else None
        self._header: list[int] = []  # tokens of the header being written
        self._in_body = False
        self._in_analysis = False
        self._closing = False  # the budget is spent: <|end|> is the only token
        self.reasoning_tokens = 0

    def fill_mask(self, row: torch.Tensor) -> bool:
        if self._closing:
            _set_bit(row, tokens.END)
            return True
        matcher = self._matcher
        if matcher is None:
            return False
        if matcher.is_error():  # a token the grammar refused (cannot happen when sampled under it)
            for token_id in _ENDING:
                _set_bit(row, token_id)
            return True
        matcher.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())
        return True

    def advance(self, token_id: int) -> None:
        try:
            matcher = self._matcher
            if matcher is not None and not matcher.is_error() and not matcher.consume_token(token_id):
                logger.warning("constrained decoding: %s", matcher.get_error())
            self._track(token_id)
        except Exception:  # never into the engine: the mask then ends the choice
            logger.exception("constrained decoding failed")
            self._matcher = None
            self._closing = False

    def _track(self, token_id: int) -> None:
        """Follow the Harmony structure: headers, bodies, and the lead-in's tokens (each body
        token and its terminator, as usage counts reasoning), closing in time for ``<|end|>``."""
        if token_id == tokens.START:
            self._header, self._in_body = [], False
        elif not self._in_body:
            if token_id == tokens.MESSAGE:
                self._in_body = True
                header = self._compiler.tokenizer.decode_with_specials(self._header)
                # Analysis, and preambles (commentary to nobody), come before the answer: both
                # spend the budget, so a chatty preamble cannot starve the answer either.
                self._in_analysis = "to=" not in header and "<|channel|>final" not in header
                self._check_budget()
            else:
                self._header.append(token_id)
        elif token_id in tokens.TERMINATORS:
            if self._in_analysis:
                self.reasoning_tokens += 1
            self._in_body = self._in_analysis = False
            self._header = []
            if self._closing:  # the budget closed the analysis: the rest of the turn takes over
                self._closing = False
                rest = self._guide.rest
                self._matcher = self._compiler.matcher(rest) if rest is not None else None
        elif self._in_analysis:
            self.reasoning_tokens += 1
            self._check_budget()

    def _check_budget(self) -> None:
        budget = self._guide.budget
        if self._in_analysis and budget is not None and self.reasoning_tokens + 1 >= budget:
            self._closing = True  # the next token is the <|end|> that makes it budget


def grammar_param_error(param: str, message: str) -> APIError:
    return APIError(400, message, param=param, code="invalid_grammar")


def schema_of(value: object, param: str) -> dict:
    """A JSON Schema given as an object or as JSON text."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise grammar_param_error(param, f"not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise grammar_param_error(param, "a JSON Schema must be an object")
    return value
