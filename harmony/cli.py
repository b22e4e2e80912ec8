"""Command line for debugging prompts and completions.

- `render [--date YYYY-MM-DD]`: a chat-completions request body (JSON) on stdin ->
  `{"tokens": [...], "text": "..."}`; without `--date` no date line is written.
- `parse`: a JSON list of completion token ids (what the model wrote after
  `<|start|>assistant`) on stdin -> `{"messages": [...], "error": null | "..."}`; malformed
  Harmony is reported in `error` with exit code 0.
Bad input (invalid JSON, an unknown role, an unresolvable tool message...) -> one line on stderr,
exit code 2.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from typing import Any

from harmony.chat_json import render_chat_json
from harmony.parser import parse_completion
from harmony.render import RenderError
from harmony.tokenizer import load_tokenizer


class BadInput(Exception):
    pass


class _OneLineArgumentParser(argparse.ArgumentParser):
    """Usage errors as one line on stderr, exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _read_json(stream: Any) -> Any:
    try:
        return json.loads(stream.read())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadInput(f"invalid JSON on stdin: {exc}") from exc


def _date(text: str) -> str:
    try:
        datetime.date.fromisoformat(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a YYYY-MM-DD date: {text!r}") from exc
    if len(text) != 10:
        raise argparse.ArgumentTypeError(f"not a YYYY-MM-DD date: {text!r}")
    return text


def render_command(request: Any, date: str | None) -> dict:
    try:
        prompt = render_chat_json(request, date)
    except RenderError as exc:
        where = f" ({exc.param})" if exc.param else ""
        raise BadInput(f"{exc.message}{where}") from exc
    return {"tokens": prompt.token_ids, "text": prompt.text}


def parse_command(token_ids: Any) -> dict:
    if not isinstance(token_ids, list) or not all(type(t) is int for t in token_ids):
        raise BadInput("expected a JSON list of integer token ids")
    parser = parse_completion(token_ids, load_tokenizer())
    messages = [
        {
            "role": m.role,
            "channel": m.channel,
            "recipient": m.recipient,
            "content_type": m.content_type,
            "content": m.content,
        }
        for m in parser.messages
    ]
    return {"messages": messages, "error": "; ".join(parser.problems) or None}


def main(argv: list[str] | None = None) -> int:
    arg_parser = _OneLineArgumentParser(prog="python -m harmony", description=__doc__.split("\n\n")[0])
    commands = arg_parser.add_subparsers(dest="command", required=True, parser_class=_OneLineArgumentParser)
    render = commands.add_parser("render", help="chat-completions request (stdin) -> prompt tokens")
    render.add_argument("--date", type=_date, default=None, help="conversation date, YYYY-MM-DD")
    commands.add_parser("parse", help="completion token ids (stdin) -> Harmony messages")
    args = arg_parser.parse_args(argv)
    try:
        payload = _read_json(sys.stdin)
        if args.command == "render":
            result = render_command(payload, args.date)
        else:
            result = parse_command(payload)
    except BadInput as exc:
        print(f"error: {exc}".replace("\n", " "), file=sys.stderr)
        return 2
    print(json.dumps(result, ensure_ascii=False))
    return 0
