"""The value types of settings: sizes (``2GiB``), the response store spec, secrets.

Each parses from a flag's or env var's text and raises ``SettingValueError`` (an argparse
type error) with a message that never shows a secret.
"""

from __future__ import annotations

import argparse
import re
from urllib.parse import urlsplit

from engine.step_budget import parse_step_target
from server.response_store_redis import redact_url

_BYTE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "t": 1000**4,
    "tb": 1000**4,
    "tib": 1024**4,
}


def parse_bytes(text: str) -> int:
    """``"2GiB"`` -> 2147483648, ``"512MB"`` -> 512000000, ``"1e9"`` -> 1000000000."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    if not match:
        raise ValueError(f"not a size: {text!r} (examples: 2GiB, 512MiB, 1e9)")
    number, unit = match.groups()
    factor = _BYTE_UNITS.get(unit.lower())
    if factor is None:
        raise ValueError(f"unknown size unit {unit!r} in {text!r} (use B, KiB, MiB, GiB, KB, MB, GB)")
    value = int(float(number) * factor)
    if value <= 0:
        raise ValueError(f"size must be positive: {text!r}")
    return value


def format_bytes(n: int) -> str:
    """The shortest exact binary spelling: 4194304 -> ``4MiB``, 1000 -> ``1000``."""
    for suffix, factor in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n % factor == 0:
            return f"{n // factor}{suffix}"
    return str(n)


class SettingValueError(argparse.ArgumentTypeError, ValueError):
    """A value a setting's type rejects; argparse and ``parse_settings`` report its message."""


class ResponseStoreSpec(str):
    """``memory`` or a ``redis://HOST:PORT/DB`` / ``rediss://...`` URL, checked when parsed."""

    def __new__(cls, text: str) -> ResponseStoreSpec:
        text = text.strip()
        if text != "memory":
            _check_redis_url(text)
        return super().__new__(cls, text)

    def __repr__(self) -> str:
        return repr(redact_url(str(self)))


def _check_redis_url(text: str) -> None:
    hint = "use `memory` or a URL like redis://HOST:6379/0 (rediss:// for TLS)"
    url = urlsplit(text)
    if url.scheme not in ("redis", "rediss"):
        raise SettingValueError(f"not a response store: {text!r}; {hint}")
    try:
        url.port  # noqa: B018 - raises on a non-numeric port
    except ValueError:
        raise SettingValueError(f"bad port in the response store URL {redact_url(text)!r}; {hint}") from None
    if not url.hostname:
        raise SettingValueError(f"no host in the response store URL {redact_url(text)!r}; {hint}")
    db = url.path.strip("/")
    if db and not db.isdigit():
        raise SettingValueError(
            f"the response store URL's database must be a number, not {db!r}: {redact_url(text)!r}; {hint}"
        )


class StepTarget(str):
    """``auto``, ``off`` or a step time in milliseconds (engine/step_budget.py)."""

    def __new__(cls, text: str) -> StepTarget:
        text = text.strip().lower()
        try:
            parse_step_target(text)
        except ValueError as exc:
            raise SettingValueError(str(exc)) from None
        return super().__new__(cls, text)


class SecretText(str):
    """A secret setting's text: usable as a str, but its repr (and so ``ServerSettings``'s)
    never shows it."""

    def __new__(cls, text: str) -> SecretText:
        if not text:
            raise SettingValueError("empty secret: set a non-empty value, or leave it unset")
        return super().__new__(cls, text)

    def __repr__(self) -> str:
        return "'***'"
