"""The tools' JSON Schema rendered as TypeScript in the developer message (harmony.md §5), through
whole requests checked token for token against openai-harmony, and ``schema_ts`` directly."""

from __future__ import annotations

import pytest
from test_harmony_render import fn, render, tools_text, user

from harmony.schema_ts import format_float, json_schema_to_typescript

# -- §5 JSON Schema rendering -----------------------------------------------------------------


def test_the_documented_get_weather_example():
    parameters = {
        "type": "object",
        "properties": {
            "city": {"type": "string", "description": "City name"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"},
        },
        "required": ["city"],
    }
    prompt = render(
        {
            "messages": [user()],
            "tools": [fn("get_weather", parameters, "Gets the weather\nfor a city"), fn("no_args")],
        }
    )
    assert (
        "namespace functions {\n\n// Gets the weather\n// for a city\ntype get_weather = (_: {\n// City name\n"
        'city: string,\nunit?: "celsius" | "fahrenheit", // default: celsius\n}) => any;\n\n'
        "type no_args = () => any;\n\n} // namespace functions"
    ) in prompt.text


@pytest.mark.parametrize(
    ("prop", "line"),
    [
        ({"type": "string", "default": "hello"}, 'p?: string, // default: "hello"'),
        ({"type": "boolean", "default": True}, "p?: boolean, // default: true"),
        ({"type": "number", "default": 0.5}, "p?: number, // default: 0.5"),
        ({"type": "array", "items": {"type": "integer"}, "default": [1]}, "p?: number[], // default: [1]"),
        ({"type": "object", "default": {"source": "api"}}, 'p?: {\n    }, // default: {"source":"api"}'),
        ({"type": ["string", "null"]}, "p?: string | null,"),
        ({"type": ["integer", "boolean"]}, "p?: number | boolean,"),
        ({"type": "string", "nullable": True}, "p?: string | null,"),
        ({"type": "array", "items": {"type": "string", "enum": ["S", "M"]}}, 'p?: "S" | "M"[],'),
        ({"type": "array"}, "p?: Array<any>,"),
        ({"anyOf": [{"type": "string"}, {"type": "number"}]}, "p?: any,"),
        ({"$ref": "#/defs/x"}, "p?: any,"),
        ({"const": 3}, "p?: any,"),
        ({"type": "null"}, "p?: any,"),
        ({"enum": ["a", "b"]}, "p?: any,"),
        ({"type": "integer", "enum": [1, 2]}, "p?: number,"),
        ({"type": "number", "default": 1e20}, "p?: number, // default: 1e20"),
        ({"type": "number", "default": 1e-05}, "p?: number, // default: 0.00001"),
        ({"type": "number", "default": 100.0}, "p?: number, // default: 100.0"),
        # serde_json's default float parser is off by an ulp here; the oracle prints what it read
        ({"type": "number", "default": 0.9999899864196777}, "p?: number, // default: 0.9999899864196776"),
        ({"type": "integer", "default": 2**64 + 1}, "p?: number, // default: 1.8446744073709552e19"),
        ({"type": "integer", "default": -(2**63)}, "p?: number, // default: -9223372036854775808"),
    ],
)
def test_property_types_and_defaults(prop, line):
    assert f"\n{line}\n" in tools_text({"type": "object", "properties": {"p": prop}})


def test_titles_examples_and_multiline_description_quirk():
    text = tools_text(
        {
            "type": "object",
            "properties": {
                "q": {
                    "type": "string",
                    "title": "Query",
                    "description": "line one\nline two",
                    "examples": ["a", 1, "b"],
                }
            },
            "required": ["q"],
        }
    )
    assert '{\n// Query\n//\n// line one\nline two\n// Examples:\n// - "a"\n// - "b"\nq: string,\n}' in text


def test_nested_objects_are_indented_and_descriptions_show_twice():
    text = tools_text(
        {
            "type": "object",
            "description": "Top",
            "properties": {
                "outer": {
                    "type": "object",
                    "description": "Outer",
                    "properties": {"inner": {"type": "object", "properties": {"x": {"type": "number"}}}},
                },
                "empty": {"type": "object"},
            },
        }
    )
    assert (
        "type f = (_: // Top\n{\n// Outer\nouter?:     // Outer\n{\n    inner?: {\n        x?: number,\n        },\n"
        "    },\nempty?: {\n    },\n}) => any;"
    ) in text


def test_one_of_property_and_top_level_one_of():
    text = tools_text(
        {
            "type": "object",
            "properties": {
                "v": {
                    "description": "A value",
                    "default": "x",
                    "oneOf": [
                        {"type": "string", "description": "as text"},
                        {"type": "number", "description": "as n"},
                    ],
                }
            },
        }
    )
    assert '// A value\n// default: "x"\nv?:\n | string\n | number // as n\n,\n}' in text
    top = tools_text({"oneOf": [{"type": "string"}, {"type": "number", "description": "n", "default": 1}]})
    assert "type f = (_: \n | string\n | number // n default: 1) => any;" in top


def test_schema_to_typescript_directly():
    assert json_schema_to_typescript({"type": "object"}) == "{\n}"
    assert json_schema_to_typescript("not a schema") == "any"
    assert json_schema_to_typescript({"type": "array", "items": None}) == "any[]"


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0.0, "0.0"),
        (-0.0, "-0.0"),
        (1.5, "1.5"),
        (1e16, "1e16"),
        (1e15, "1000000000000000.0"),
        (1.25e-7, "1.25e-7"),
        (0.0001, "0.0001"),
        (123456.789, "123456.789"),
        (-2.5e300, "-2.5e300"),
    ],
)
def test_floats_print_like_serde_json(value, text):
    assert format_float(value) == text
