"""The real server with scripted sampling, for subprocess tests (never part of the product).

    python tests/scripted_server.py --script FILE [any server flag ...]

Everything runs as ``python -m server`` would (settings, model load in the background, engine,
HTTP, drain), except that the engine's sampler takes its tokens from the script
(``tests/scripted.py``); the model still runs every step.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from scripted import ScriptedTokenSource, install_script

from engine.async_engine import AsyncEngine
from engine.types import EngineClient
from harmony.tokenizer import load_tokenizer
from server.__main__ import setup_logging
from server.app import build_engine
from server.cli import parse_settings
from server.runner import serve
from server.settings import ServerSettings


def main(argv: list[str] | None = None) -> int:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--script", type=Path, required=True)
    args, rest = pre.parse_known_args(argv)
    settings = parse_settings(rest)
    setup_logging(settings.log_level)
    source = ScriptedTokenSource.from_file(args.script, load_tokenizer())

    def scripted_engine(settings: ServerSettings) -> EngineClient:
        engine = build_engine(settings)
        assert isinstance(engine, AsyncEngine)
        install_script(engine.engine, source)
        logging.getLogger("tests").warning(
            "TEST MODE: outputs scripted by %s (the model still runs)", args.script
        )
        return engine

    return asyncio.run(serve(settings, engine_factory=scripted_engine))


if __name__ == "__main__":
    sys.exit(main())
