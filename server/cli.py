"""Command line and environment, built from the declaration in ``server.settings``.

Every setting has a flag ``--some-flag`` and an env var ``GPTOSS_SOME_FLAG``; flags win over
the environment. Repeatable flags (``--api-key``, ``--served-model-name``) take
comma-separated lists in the environment. Booleans are ``--x/--no-x`` flags and read
``1/true/yes/on`` and ``0/false/no/off`` from the environment. The flag names are a contract
with deploy/ (Dockerfile, compose, Kubernetes): keep them.

``python -m server.cli --settings-table`` prints the README's configuration table.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from server.setting_values import parse_bytes
from server.settings import (
    ENV_PREFIX,
    UNITS,
    ServerSettings,
    Setting,
    flag_env_name,
    settings_declaration,
    settings_table_markdown,
)

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
_TYPE_NAMES = {int: "an integer", float: "a number"}


def value_parser(s: Setting) -> Callable[[str], Any]:
    """Text -> one value of ``s`` (a flag's argument or one item of its env var), raising
    ``argparse.ArgumentTypeError`` with a message fit for the user."""

    def parse(text: str) -> Any:
        if s.unit == "bytes":
            try:
                return parse_bytes(text)
            except ValueError as exc:
                raise argparse.ArgumentTypeError(str(exc)) from exc
        if s.type in (int, float):
            try:
                value = s.type(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"not {_TYPE_NAMES[s.type]}: {text!r}") from None
            if s.minimum is not None and value < s.minimum:
                if s.minimum == 1 and s.type is int:
                    raise argparse.ArgumentTypeError(f"must be a positive integer: {text}")
                raise argparse.ArgumentTypeError(f"must be >= {s.minimum:g}: {text}")
            return value
        value = s.type(text.lower() if s.lower else text)
        if s.choices is not None and value not in s.choices:
            raise argparse.ArgumentTypeError(f"invalid choice {value!r} (choose from {', '.join(s.choices)})")
        return value

    parse.__name__ = s.type.__name__  # argparse names the type in some messages
    return parse


def _help(s: Setting) -> str:
    text = f"{s.what} (default: {s.default_text}; env {s.env})"
    return text.replace("`", "").replace("%", "%%")


def _parser() -> argparse.ArgumentParser:
    """The parser with no defaults: a namespace holds only the flags given."""
    p = argparse.ArgumentParser(
        prog="gptoss-server",
        description="OpenAI-compatible server for gpt-oss models. Every flag also reads the env var "
        f"{ENV_PREFIX}<FLAG_IN_UPPER_SNAKE_CASE> (flags win).",
        argument_default=argparse.SUPPRESS,
    )
    for s in settings_declaration():
        common: dict[str, Any] = {"dest": s.name, "help": _help(s)}
        if s.kind == "bool":
            p.add_argument(s.flag, action=argparse.BooleanOptionalAction, **common)
            continue
        if s.choices is not None:
            common["choices"] = s.choices
        else:
            common["metavar"] = UNITS[s.unit] if s.unit else s.flag[2:].replace("-", "_").upper()
        action = "append" if s.kind == "list" else "store"
        p.add_argument(s.flag, action=action, type=value_parser(s), **common)
    return p


def build_arg_parser() -> argparse.ArgumentParser:
    """The server's argument parser, with the declared defaults."""
    p = _parser()
    p.set_defaults(**{s.name: s.default for s in settings_declaration()})
    return p


def env_var_name(action: argparse.Action) -> str | None:
    """``GPTOSS_`` + the upper snake case of the action's long option (None for ``--no-x``
    only or positional actions)."""
    longs = [o for o in action.option_strings if o.startswith("--") and not o.startswith("--no-")]
    if not longs:
        return None
    return flag_env_name(longs[0])


def known_env_vars(parser: argparse.ArgumentParser | None = None) -> dict[str, str]:
    """Every env var the server reads, mapped to its flag (for deploy-file checks)."""
    parser = parser or build_arg_parser()
    out = {}
    for action in parser._actions:
        name = env_var_name(action)
        if name and not isinstance(action, argparse._HelpAction):
            out[name] = action.option_strings[0]
    return out


def env_value(s: Setting, raw: str) -> Any:
    """The value of ``s`` read from its env var's text; ValueError or ArgumentTypeError."""
    if s.kind == "bool":
        low = raw.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ValueError("expected one of 1/true/yes/on or 0/false/no/off")
    parse = value_parser(s)
    if s.kind == "list":
        return [parse(x.strip()) for x in raw.split(",") if x.strip()]
    return parse(raw)


def parse_settings(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> ServerSettings:
    """Flags (``argv``, default ``sys.argv[1:]``) over env vars (``environ``, default
    ``os.environ``) over the declared defaults. A bad value exits with a usage error naming
    the flag or the variable."""
    environ = os.environ if environ is None else environ
    parser = _parser()
    given = vars(parser.parse_args(argv))
    values: dict[str, Any] = {}
    for s in settings_declaration():
        if s.env in environ:  # checked even when a flag wins: a bad deploy value fails loudly
            raw = environ[s.env]
            try:
                values[s.name] = env_value(s, raw)
            except (ValueError, argparse.ArgumentTypeError) as exc:
                parser.error(f"environment variable {s.env}={raw!r}: {exc}")
        if s.name in given:
            values[s.name] = given[s.name]
        if s.kind == "list" and s.name in values:
            values[s.name] = [x for x in values[s.name] if x]
    return ServerSettings(**values)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args != ["--settings-table"]:
        print("usage: python -m server.cli --settings-table  (the server is python -m server)")
        return 2
    sys.stdout.write(settings_table_markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
