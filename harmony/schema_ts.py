"""JSON Schema -> the TypeScript-like text Harmony puts in a `# Tools` section (spec §5).

A faithful port of the rules of harmony-rs `json_schema_to_typescript`, quirks included (a
description's later lines are written without `//`, a nested object's description shows twice,
`anyOf` renders as `any`), because the model was trained on exactly this text.

Defaults are printed the way serde_json prints a value (compact JSON, floats in ryu's shortest
form such as `1e20` or `0.00001`), since that is what the reference implementation writes.
"""

from __future__ import annotations

import decimal
import json
from typing import Any

_MISSING = object()


def _get(value: Any, key: str) -> Any:
    """serde_json's `Value::get`: a member of an object, else missing."""
    if isinstance(value, dict):
        return value.get(key, _MISSING)
    return _MISSING


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _is_enum(schema: Any) -> bool:
    values = _get(schema, "enum")
    return isinstance(values, list) and len(values) > 0


def _is_nullable(schema: Any) -> bool:
    return _get(schema, "nullable") is True


def format_float(value: float) -> str:
    """A finite float as serde_json (ryu) writes it: shortest round-trip digits, `1e20`,
    `1.5e-7`, `100.0`, `0.00001`."""
    if value == 0:
        return "-0.0" if str(value).startswith("-") else "0.0"
    sign = "-" if value < 0 else ""
    digits_tuple, exponent = decimal.Decimal(repr(abs(value))).as_tuple()[1:]
    digits = "".join(map(str, digits_tuple))
    stripped = digits.rstrip("0")
    exponent += len(digits) - len(stripped)
    digits = stripped
    length = len(digits)
    point = length + exponent  # value = 0.digits * 10**point
    if exponent >= 0 and point <= 16:
        body = digits + "0" * exponent + ".0"
    elif 0 < point <= 16:
        body = digits[:point] + "." + digits[point:]
    elif -5 < point <= 0:
        body = "0." + "0" * (-point) + digits
    elif length == 1:
        body = f"{digits}e{point - 1}"
    else:
        body = f"{digits[0]}.{digits[1:]}e{point - 1}"
    return sign + body


_U64_MAX = 2**64 - 1
_POW10 = [float(f"1e{i}") for i in range(309)]


def _f64_from_parts(positive: bool, significand: int, exponent: int) -> float:
    """serde_json's default (not `float_roundtrip`) float assembly: significand times or divided
    by a power of ten in f64, which can be off by an ulp from the correctly rounded value."""
    f = float(significand)
    while True:
        if abs(exponent) < len(_POW10):
            f = f * _POW10[abs(exponent)] if exponent >= 0 else f / _POW10[abs(exponent)]
            break
        if f == 0.0 or exponent >= 0:  # (an overflow is an error in serde_json)
            break
        f /= 1e308
        exponent += 308
    return f if positive else -f


def serde_json_number(text: str) -> int | float:
    """The number serde_json reads from a JSON number literal (u64/i64 when it fits, else f64
    through serde_json's inexact default parser)."""
    positive = not text.startswith("-")
    digits = text.lstrip("-")
    mantissa, _, exp_text = digits.lower().partition("e")
    integer_part, _, fraction = mantissa.partition(".")
    significand, exponent, overflowed = 0, 0, False
    for i, ch in enumerate(integer_part + fraction):
        in_fraction = i >= len(integer_part)
        if (
            overflowed
            or significand > _U64_MAX // 10
            or (significand == _U64_MAX // 10 and int(ch) > _U64_MAX % 10)
        ):
            overflowed = True  # later digits are ignored (integer digits still scale by ten)
            if not in_fraction:
                exponent += 1
            continue
        significand = significand * 10 + int(ch)
        if in_fraction:
            exponent -= 1
    if exp_text:
        exponent += int(exp_text)
    if not fraction and not exp_text and not overflowed:
        if positive:
            return significand
        if 0 < significand <= 2**63:
            return -significand
        return -float(significand)
    return _f64_from_parts(positive, significand, exponent)


def serde_json_compact(value: Any) -> str:
    """`format!("{value}")` of the serde_json Value that openai-harmony reads from Python's
    `json.dumps(value)`: compact JSON, keys in insertion order, numbers as serde_json reads
    and prints them."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, (int, float)):
        number = serde_json_number(json.dumps(value))
        return str(number) if isinstance(number, int) else format_float(number)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ",".join(serde_json_compact(item) for item in value) + "]"
    if isinstance(value, dict):
        members = (
            f"{json.dumps(str(k), ensure_ascii=False)}:{serde_json_compact(v)}" for k, v in value.items()
        )
        return "{" + ",".join(members) + "}"
    raise TypeError(f"not a JSON value: {type(value).__name__}")


def _default_comment(schema: Any, default: Any) -> str:
    """`default: ...` for a property default: strings quoted unless the schema is an enum."""
    if isinstance(default, str):
        return f'default: "{default}"' if not _is_enum(schema) else f"default: {default}"
    return f"default: {serde_json_compact(default)}"


def _with_nullable(variant: Any, type_str: str) -> str:
    if _is_nullable(variant) and "null" not in type_str:
        return f"{type_str} | null"
    return type_str


def _top_level_one_of(variants: list, indent: str) -> str:
    out = ""
    for variant in variants:
        out += f"\n{indent} | "
        out += _with_nullable(variant, json_schema_to_typescript(variant, indent + "   "))
        comments = []
        description = _str(_get(variant, "description"))
        if description is not None:
            comments.append(description)
        default = _get(variant, "default")
        if default is not _MISSING:
            if isinstance(default, str) and not _is_enum(variant):
                comments.append(f'default: "{default}"')
            else:  # an enum's string default is printed as JSON here (quirk)
                comments.append(f"default: {serde_json_compact(default)}")
        if comments:
            out += " // " + " ".join(comments)
    return out


def _one_of_property(key: str, val: Any, variants: list, optional: str, indent: str) -> str:
    out = ""
    property_desc = _str(_get(val, "description"))
    first_desc = _str(_get(variants[0], "description")) if variants else None
    rendered_desc_above = False
    if property_desc is not None and property_desc != first_desc:
        out += f"{indent}// {property_desc}\n"
        rendered_desc_above = True
    default = _get(val, "default")
    if default is not _MISSING:
        out += f"{indent}// {_default_comment(val, default)}\n"
    out += f"{indent}{key}{optional}:\n"
    for i, variant in enumerate(variants):
        out += f"{indent} | "
        out += _with_nullable(variant, json_schema_to_typescript(variant, indent + "   "))
        comments = []
        description = _str(_get(variant, "description"))
        if not (i == 0 and rendered_desc_above) and description is not None and description != property_desc:
            comments.append(description)
        variant_default = _get(variant, "default")
        if variant_default is not _MISSING:
            comments.append(_default_comment(variant, variant_default))
        if comments:
            out += " // " + " ".join(comments)
        out += "\n"
    out += f"{indent},\n"
    return out


def _object(schema: Any, indent: str) -> str:
    out = ""
    description = _str(_get(schema, "description"))
    if description is not None:
        out += f"{indent}// {description}\n"
    out += "{\n"
    properties = _get(schema, "properties")
    if isinstance(properties, dict):
        required_list = _get(schema, "required")
        required = (
            {r for r in required_list if isinstance(r, str)} if isinstance(required_list, list) else set()
        )
        for key, val in properties.items():
            optional = "" if key in required else "?"
            title = _str(_get(val, "title"))
            if title is not None:
                out += f"{indent}// {title}\n{indent}//\n"
            one_of = _get(val, "oneOf")
            if one_of is _MISSING:
                prop_desc = _str(_get(val, "description"))
                if prop_desc is not None:
                    out += f"{indent}// {prop_desc}\n"
            examples = _get(val, "examples")
            if isinstance(examples, list) and examples:
                out += f"{indent}// Examples:\n"
                for example in examples:
                    if isinstance(example, str):
                        out += f'{indent}// - "{example}"\n'
            if isinstance(one_of, list):
                out += _one_of_property(key, val, one_of, optional, indent)
                continue
            out += f"{indent}{key}{optional}: "
            out += _with_nullable(val, json_schema_to_typescript(val, indent + "    "))
            out += ","
            if one_of is _MISSING:
                default = _get(val, "default")
                if default is not _MISSING:
                    out += f" // {_default_comment(val, default)}"
            out += "\n"
    out += f"{indent}}}"
    return out


def json_schema_to_typescript(schema: Any, indent: str = "") -> str:
    """The TypeScript-like rendering of one JSON Schema (see module docstring)."""
    one_of = _get(schema, "oneOf")
    if isinstance(one_of, list):
        return _top_level_one_of(one_of, indent)
    schema_type = _get(schema, "type")
    if isinstance(schema_type, list):
        names = ["number" if t == "integer" else t for t in schema_type if isinstance(t, str)]
        if names:
            return " | ".join(names)
    if not isinstance(schema_type, str):
        return "any"
    if schema_type == "object":
        return _object(schema, indent)
    if schema_type == "string":
        values = _get(schema, "enum")
        if isinstance(values, list):
            names = [f'"{v}"' for v in values if isinstance(v, str)]
            if names:
                return " | ".join(names)
        return "string"
    if schema_type in ("number", "integer"):
        return "number"
    if schema_type == "boolean":
        return "boolean"
    if schema_type == "array":
        items = _get(schema, "items")
        if items is _MISSING:
            return "Array<any>"
        return f"{json_schema_to_typescript(items, indent)}[]"
    return "any"
