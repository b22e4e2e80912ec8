"""Hypothesis strategies for chat-completions requests (tests of the Harmony renderer)."""

from __future__ import annotations

import string

from hypothesis import strategies as st

# Text users and models write, plus the pieces most likely to confuse a renderer.
TRICKY = [
    "<|end|>",
    "<|start|>",
    "<|message|>",
    "<|channel|>",
    "<|constrain|>",
    "to=",
    "\n",
    "\r\n",
    "\r",
    "\n\n",
    " ",
    "  ",
    "\t",
    "😀",
    "é",
    "日本語",
    "\u2028",
    "//",
    "{",
    "}",
    '"',
    "\\",
    "null",
    "```",
]
plain_chars = st.characters(blacklist_categories=("Cs",))
text = st.lists(st.one_of(st.text(plain_chars, max_size=8), st.sampled_from(TRICKY)), max_size=5).map("".join)
nonempty_text = text.filter(bool)
identifier = st.text(string.ascii_letters + string.digits + "_", min_size=1, max_size=12).filter(
    lambda s: not s[0].isdigit()
)
property_name = st.one_of(identifier, st.sampled_from(["a-b", "with space", "ünï", "$x", "123"]))

nice_float = st.one_of(
    st.sampled_from([0.0, -0.0, 0.5, 1.5, -2.25, 100.0, 1e16, 1e20, 1e-5, 1.25e-7, 3.14159, 123456.789]),
    st.floats(allow_nan=False, allow_infinity=False, width=32),
    # (beyond ~1.8e308 serde_json refuses the number and openai-harmony cannot render at all)
    st.floats(allow_nan=False, allow_infinity=False, min_value=-1e300, max_value=1e300),
)
json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), nice_float, text)
json_value = st.recursive(
    json_scalar,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(property_name, inner, max_size=3)),
    max_leaves=6,
)


def _annotate(base: st.SearchStrategy[dict]) -> st.SearchStrategy[dict]:
    """Add the optional keywords the renderer prints: description, title, examples, default..."""
    extras = st.fixed_dictionaries(
        {},
        optional={
            "description": text,
            "title": text,
            "examples": st.lists(st.one_of(text, st.integers()), max_size=3),
            "default": json_value,
            "nullable": st.booleans(),
        },
    )
    return st.tuples(base, extras).map(lambda pair: {**pair[0], **pair[1]})


scalar_schema = st.one_of(
    st.just({"type": "string"}),
    st.builds(
        lambda values: {"type": "string", "enum": values},
        st.lists(st.one_of(text, st.integers()), max_size=4),
    ),
    st.sampled_from([{"type": "integer"}, {"type": "number"}, {"type": "boolean"}, {"type": "null"}, {}]),
    st.builds(
        lambda types: {"type": types},
        st.lists(st.sampled_from(["string", "integer", "number", "null", "boolean"]), max_size=3),
    ),
    st.sampled_from([{"const": 1}, {"$ref": "#/$defs/x"}, {"enum": ["a", "b"]}, {"type": "array"}]),
)


def _compound(inner: st.SearchStrategy[dict]) -> st.SearchStrategy[dict]:
    return st.one_of(
        st.builds(lambda items: {"type": "array", "items": items}, inner),
        object_schema(inner),
        st.builds(lambda variants: {"oneOf": variants}, st.lists(inner, max_size=3)),
        st.builds(lambda variants: {"anyOf": variants}, st.lists(inner, max_size=3)),
    )


def object_schema(inner: st.SearchStrategy[dict]) -> st.SearchStrategy[dict]:
    def build(properties: dict, required_mask: list[bool], extra_required: list[str]) -> dict:
        names = list(properties)
        required = [n for n, r in zip(names, required_mask, strict=False) if r] + extra_required
        schema: dict = {"type": "object", "properties": properties}
        if required:
            schema["required"] = required
        return schema

    return st.builds(
        build,
        st.dictionaries(property_name, inner, max_size=4),
        st.lists(st.booleans(), max_size=4),
        st.lists(identifier, max_size=1),
    )


schema = st.recursive(_annotate(scalar_schema), lambda inner: _annotate(_compound(inner)), max_leaves=8)
parameters = st.one_of(
    object_schema(schema),
    _annotate(object_schema(schema)),
    st.builds(lambda variants: {"oneOf": variants}, st.lists(schema, max_size=3)),
    st.just({"type": "object", "properties": {}}),
)


@st.composite
def tools(draw) -> list[dict]:
    names = draw(st.lists(identifier, max_size=4, unique=True))
    result = []
    for name in names:
        function: dict = {"name": name}
        if draw(st.booleans()):
            function["description"] = draw(text)
        if draw(st.booleans()):
            function["parameters"] = draw(parameters)
        result.append({"type": "function", "function": function})
    return result


content = st.one_of(
    text,
    st.none(),
    st.lists(st.builds(lambda t: {"type": "text", "text": t}, text), max_size=3),
)


@st.composite
def conversations(draw) -> dict:
    """Every message kind: leading and later system/developer messages, users, assistants with
    reasoning (either field), preambles, parallel tool calls, tool results by id or by name."""
    messages: list[dict] = [
        {"role": draw(st.sampled_from(["system", "developer"])), "content": draw(content)}
        for _ in range(draw(st.integers(0, 2)))
    ]
    call_number = 0
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["user", "user", "answer", "tool_loop", "system", "reasoning_only"]))
        if kind == "user" or not messages:
            messages.append({"role": "user", "content": draw(content)})
        elif kind == "system":
            messages.append(
                {"role": draw(st.sampled_from(["system", "developer"])), "content": draw(content)}
            )
        elif kind in ("answer", "reasoning_only"):
            message = {"role": "assistant", "content": draw(content) if kind == "answer" else None}
            message[draw(st.sampled_from(["reasoning", "reasoning_content"]))] = draw(
                st.one_of(st.none(), text)
            )
            messages.append(message)
        else:
            calls = []
            for _ in range(draw(st.integers(1, 3))):
                call_number += 1
                calls.append(
                    {
                        "id": f"call_{call_number}",
                        "type": "function",
                        "function": {
                            "name": draw(identifier),
                            "arguments": draw(st.one_of(text, st.just('{"a": 1}'))),
                        },
                    }
                )
            message = {
                "role": "assistant",
                "content": draw(st.one_of(st.none(), st.just(""), text)),
                "tool_calls": calls,
            }
            if draw(st.booleans()):
                message["reasoning"] = draw(text)
            messages.append(message)
            for c in draw(st.permutations(calls)):
                if draw(st.integers(0, 4)) == 0:
                    messages.append({"role": "tool", "name": c["function"]["name"], "content": draw(content)})
                else:
                    messages.append({"role": "tool", "tool_call_id": c["id"], "content": draw(content)})
    request: dict = {"messages": messages}
    effort = draw(st.sampled_from([None, "low", "medium", "high", "High"]))
    if effort is not None:
        if draw(st.booleans()):
            request["reasoning_effort"] = effort
        else:
            request["reasoning"] = {"effort": effort}
    request["tools"] = draw(tools())
    return request


dates = st.one_of(st.none(), st.dates().map(lambda d: d.strftime("%Y-%m-%d")))
