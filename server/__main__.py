"""``python -m server`` / ``gptoss-server``: parse flags and env, set up logging, serve."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from server.cli import parse_settings


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # Library chatter stays at warning unless we debug.
    for noisy in ("uvicorn.access", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING if level != "debug" else logging.DEBUG)


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_settings(argv)
    setup_logging(settings.log_level)
    from server.runner import run_server  # after logging: importing torch is slow

    return run_server(settings)


if __name__ == "__main__":
    sys.exit(main())
