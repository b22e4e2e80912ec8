"""What a request's structured-output fields mean: the rules of its turn (``server.guided_grammar``),
the response formats its prompt shows, and the guide each of its choices decodes under.

The fields, per API:
- chat completions: ``response_format`` (``json_object``, ``json_schema`` strict or not),
  ``tool_choice`` (``required``, a named function) and ``tools[].function.strict``;
- Responses: ``text.format``, ``tool_choice`` (``required``, a named function or custom tool),
  ``strict`` (true unless false, as OpenAI's), and custom tools' Lark or regex grammars;
- completions: ``structured_outputs`` (``json``, ``regex``, ``grammar``, ``choice``) or vLLM's
  older ``guided_json`` / ``guided_regex`` / ``guided_grammar`` / ``guided_choice``.
Every one of them: ``max_reasoning_tokens``.

A request is constrained when one of its rules goes beyond the free turn; only then is there a
mask. A constrained request without ``max_reasoning_tokens`` gets a share of its output limit
for reasoning (``REASONING_SHARE``, by effort), so the answer always has room.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field

from harmony.conversation import ResponseFormat
from server.errors import APIError
from server.guided import GrammarCompiler, Guide, schema_of
from server.guided_grammar import CallRule, FinalRule, content_grammar, turn_grammar
from server.pipeline import EngineRequest

# The default reasoning budget of a constrained request, as a share of its output limit.
REASONING_SHARE = {"low": 0.25, "medium": 0.5, "high": 0.75}


@dataclass
class TurnRules:
    """What a Harmony turn may do. ``final`` None: it must end in a call."""

    final: FinalRule | None = field(default_factory=FinalRule)
    calls: list[CallRule] = field(default_factory=list)
    preambles: bool = True
    constrained: bool = False  # some rule goes beyond the free turn
    param: str = "response_format"  # the field a compile error names

    @classmethod
    def of(cls, final: FinalRule, calls: list[CallRule], format_param: str) -> TurnRules:
        """A turn with an answer format and the offered calls: constrained when either goes
        beyond the free turn; a compile error then names the format, or else the tools."""
        constrained = final != FinalRule() or strict_args(calls)
        param = format_param if final != FinalRule() or not constrained else "tools"
        return cls(final, calls, constrained=constrained, param=param)


@dataclass
class RequestGuide:
    """The guide of a request, before its output limit is known."""

    rules: TurnRules | None  # None: a raw completion (``content`` grammar or nothing)
    max_reasoning_tokens: int | None
    effort: str = "medium"
    content: str | None = None  # a raw completion's grammar

    @property
    def needed(self) -> bool:
        return (
            self.max_reasoning_tokens is not None
            or self.content is not None
            or bool(self.rules and self.rules.constrained)
        )

    def guide(self, max_tokens: int) -> Guide:
        if self.rules is None:
            return Guide(self.content, None, self.max_reasoning_tokens)
        rules = self.rules
        budget = self.max_reasoning_tokens
        if budget is None and rules.constrained:
            budget = int(max_tokens * REASONING_SHARE[self.effort])
        if not rules.constrained:  # free until a budget closes the analysis
            if budget == 0:
                return Guide(self._grammar(rules, analysis=False, restart=False), None, 0)
            return Guide(None, self._grammar(rules, analysis=False, restart=True), budget)
        whole = self._grammar(rules, analysis=budget != 0, restart=False)
        return Guide(whole, self._grammar(rules, analysis=False, restart=True), budget)

    @staticmethod
    def _grammar(rules: TurnRules, *, analysis: bool, restart: bool) -> str:
        # Preambles introduce calls; once a budget closed the lead-in there are none.
        preambles = rules.preambles and bool(rules.calls) and not restart
        return turn_grammar(rules.final, rules.calls, preambles=preambles, analysis=analysis, restart=restart)


def json_format(kind: str, schema: object, name: str | None, description: str | None, param: str):
    """(FinalRule, ResponseFormat to render or None) of a json_object / json_schema format."""
    if kind == "json_object":
        return FinalRule(json_object=True), None
    if kind != "json_schema":
        raise APIError(400, f"unknown response format type `{kind}`", param=param)
    parsed = schema_of(schema if schema is not None else {}, f"{param}.schema")
    return FinalRule(schema=parsed), ResponseFormat(name or "response", parsed, description or "")


def call_rule(name: str, parameters: dict | None, strict: bool) -> CallRule:
    return CallRule(name, parameters if strict and parameters else "any")


def apply_choice(
    rules: TurnRules, choice: object, forced: list[CallRule], param: str = "tool_choice"
) -> None:
    """``tool_choice`` ``required`` or named: the turn must end in a call (of that tool), its
    arguments held to the function's parameters whether or not it is strict (``forced``: the
    offered tools with their schemas)."""
    names = [c.name for c in forced]
    if choice in (None, "auto", "none"):
        return
    if choice == "required":
        if not forced:
            raise APIError(400, "tool_choice `required` needs at least one tool", param=param)
        rules.calls = forced
        rules.final, rules.preambles, rules.constrained, rules.param = None, False, True, param
    elif isinstance(choice, str) and choice in names:
        rules.calls = [c for c in forced if c.name == choice]
        rules.final, rules.preambles, rules.constrained, rules.param = None, False, True, param
    elif isinstance(choice, str):
        raise APIError(400, f"tool_choice names `{choice}`, which is not among the tools", param=param)


def strict_args(calls: list[CallRule]) -> bool:
    return any(c.body != "any" and not (isinstance(c.body, tuple) and c.body[0] == "text") for c in calls)


def completion_content(body: object) -> str | None:
    """A raw completion's grammar from ``structured_outputs`` or ``guided_*`` (first found)."""
    extra = dict(getattr(body, "model_extra", None) or {})
    outputs = extra.get("structured_outputs")
    sources = dict(outputs) if isinstance(outputs, dict) else {}
    for key in ("json", "regex", "grammar", "choice"):
        if f"guided_{key}" in extra and key not in sources:
            sources[key] = extra[f"guided_{key}"]
    param = "structured_outputs" if isinstance(outputs, dict) else "guided_"
    for key, value in sources.items():
        if value is None:
            continue
        where = f"{param}.{key}" if param == "structured_outputs" else f"guided_{key}"
        if key == "json":
            return content_grammar("json", schema_of(value, where))
        if key == "regex" and isinstance(value, str):
            return content_grammar("regex", value)
        if key == "grammar" and isinstance(value, str):
            return content_grammar("lark", value)
        if key == "choice" and isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            return content_grammar("regex", "|".join(re.escape(v) for v in value))
        raise APIError(400, f"`{where}` has the wrong type", param=where)
    return None


async def attach_guides(requests: list[EngineRequest], guide: RequestGuide, compiler_of, param: str) -> None:
    """Each choice its own constraint (checked before anything is queued: a grammar that does not
    compile is a 400 naming ``param``)."""
    if not guide.needed:
        return
    compiler: GrammarCompiler = await compiler_of()
    built = guide.guide(requests[0].params.max_tokens)
    for grammar in {g for g in (built.grammar, built.rest) if g is not None}:
        await asyncio.to_thread(compiler.check, grammar, param)
    for request in requests:
        request.params.constraint = await asyncio.to_thread(
            compiler.constraint, guide.guide(request.params.max_tokens)
        )
