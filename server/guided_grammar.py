"""The grammar of a constrained Harmony turn, in llguidance's Lark (spec harmony.md §5-§8).

A completion starts right after the prompt's ``<|start|>assistant``. What a request permits:
- any number of ``analysis`` messages first, their text free (only special tokens are out,
  and the message must end in ``<|end|>``), each followed by ``<|start|>assistant``;
- recipient-less ``commentary`` preambles, when the request leaves the model its choice;
- then the one message the turn ends with:
  - a ``final`` answer ended by ``<|return|>``, its text free or held to a JSON Schema;
  - or a call: ``commentary`` to ``functions.NAME`` in either header order Harmony allows
    (``<|channel|>commentary to=functions.NAME`` or ``to=functions.NAME<|channel|>commentary``),
    with ``<|constrain|>json`` and arguments held to the function's schema (or any JSON), or
    for a free-form tool no content type and text held to its own Lark or regex grammar,
    ended by ``<|call|>``.
Special tokens are written as llguidance's ``<|name|>`` terminals, so no text can forge one,
and the model cannot leave the answer through a header the request does not allow.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

AnyJson = Literal["any"]  # arguments or answer held to JSON of any shape


@dataclass(frozen=True)
class CallRule:
    """A call the turn may end with. ``body``: a JSON Schema, ``"any"`` JSON, or free-form:
    ``("lark", text)`` / ``("regex", text)`` / ``("text", "")`` for a custom tool."""

    name: str
    body: dict | AnyJson | tuple[str, str]


@dataclass(frozen=True)
class FinalRule:
    """The final answer: free text (None), any JSON object, or a JSON Schema."""

    schema: dict | None = None
    json_object: bool = False


# JSON as gpt-oss writes it: at most one space between tokens. Unbounded whitespace would let a
# weak model pad forever instead of finishing the value.
JSON_OPTIONS = {"whitespace_flexible": True, "whitespace_pattern": "[ ]?"}


_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties")
_SUBSCHEMAS = ("items", "not", "if", "then", "else", "additionalItems", "contains")


def closed_objects(schema: object) -> object:
    """The schema with every object that declares properties but says nothing of
    ``additionalProperties`` closed to them (as xgrammar's strict mode does, and as OpenAI's
    strict mode requires): a model has no reason to invent keys, and an open object lets a weak
    one write keys until the limit. An explicit ``additionalProperties`` is kept."""
    if isinstance(schema, list):
        return [closed_objects(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _SUBSCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [closed_objects(s) for s in out[key]]
    for key in _SUBSCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: closed_objects(s) for name, s in out[key].items()}
    for key in _SUBSCHEMAS:
        if isinstance(out.get(key), dict):
            out[key] = closed_objects(out[key])
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = closed_objects(out["additionalProperties"])
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def _json(schema: dict) -> str:
    return "%json " + json.dumps({"x-guidance": JSON_OPTIONS, **closed_objects(schema)})  # type: ignore[dict-item]


def _literal(text: str) -> str:
    return json.dumps(text)


def _regex_grammar(pattern: str) -> str:
    return "start: /" + pattern.replace("/", "\\/") + "/"


def turn_grammar(
    final: FinalRule | None,
    calls: Sequence[CallRule],
    *,
    preambles: bool,
    analysis: bool = True,
    restart: bool = False,
) -> str:
    """The llguidance grammar (its JSON form) of one assistant turn. ``final`` None: no answer
    without a call; ``calls`` empty: no call. ``analysis`` False: no analysis message (a spent
    reasoning budget); ``restart``: the turn goes on after a closed message, so it starts with
    the ``<|start|>assistant`` the prompt otherwise supplies."""
    if final is None and not calls:
        raise ValueError("a turn must be allowed to end somehow")
    rules = [
        'analysis: <|channel|> "analysis" <|message|> TEXT <|end|> <|start|> "assistant"',
        'preamble: <|channel|> "commentary" <|message|> TEXT <|end|> <|start|> "assistant"',
        "TEXT: /(?s:.*)/",
    ]
    subgrammars: list[dict] = []
    ends = []
    if final is not None:
        if final.schema is not None:
            body = _json(final.schema)
        elif final.json_object:
            body = _json({"type": "object"})
        else:
            body = "TEXT"
        rules.append(f'final: <|channel|> "final" <|message|> {body} <|return|>')
        ends.append("final")
    for i, call in enumerate(calls):
        recipient = _literal(f"to=functions.{call.name}")
        if isinstance(call.body, tuple):
            kind, definition = call.body
            content_type = ""
            if kind == "text":
                body = "TEXT"
            else:
                name = f"tool{i}"
                grammar = definition if kind == "lark" else _regex_grammar(definition)
                subgrammars.append({"name": name, "lark_grammar": grammar})
                body = f"@{name}"
        else:
            content_type = '" "? <|constrain|> "json"'
            body = _json({"type": "object"} if call.body == "any" else call.body)
        rules.append(
            f'call{i}: (<|channel|> "commentary " {recipient} | " " {recipient} <|channel|> "commentary")'
            f" {content_type} <|message|> {body} <|call|>"
        )
        ends.append(f"call{i}")
    before = [name for name, on in (("analysis", analysis), ("preamble", preambles)) if on]
    head = '<|start|> "assistant" ' if restart else ""
    lead = f"({' | '.join(before)})* " if before else ""
    start = f"start: {head}{lead}({' | '.join(ends)})"
    return json.dumps({"grammars": [{"lark_grammar": "\n".join([start, *rules])}, *subgrammars]})


def content_grammar(kind: str, definition: str | dict) -> str:
    """A grammar over a whole raw completion (``/v1/completions``, no Harmony): a JSON Schema,
    a regex or a Lark grammar."""
    if kind == "json":
        lark = "start: " + _json(definition)  # type: ignore[arg-type]
    elif kind == "regex":
        lark = _regex_grammar(str(definition))
    else:
        lark = str(definition)
    return json.dumps({"grammars": [{"lark_grammar": lark}]})
