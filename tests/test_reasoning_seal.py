"""server/reasoning_seal.py: sealed reasoning opens only unaltered, under the same key."""

from __future__ import annotations

import base64
import logging
import os
import re
import string

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from server.cli import parse_settings
from server.reasoning_seal import VERSION, ReasoningSealer, SealError, derive_key

SECRET = "correct horse battery staple"
B64URL = string.ascii_letters + string.digits + "-_"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(token: str) -> bytes:
    return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))


@pytest.mark.parametrize(
    "text",
    ["", "a", "Thinking about Paris… 🗼 naïve — 日本語\n\t\u0000 end", "x" * 1_000_000, "é" * 500_000],
    ids=["empty", "one", "unicode", "1MB", "1MB-utf8"],
)
def test_round_trip(text: str) -> None:
    sealer = ReasoningSealer(SECRET)
    token = sealer.seal(text)
    assert re.fullmatch(r"[A-Za-z0-9_-]+", token)  # URL-safe, no padding
    assert sealer.open(token) == text
    if len(text) > 100:
        assert text[:20] not in token  # not the plain text
    assert unb64(token)[0] == VERSION


def test_a_random_nonce_per_seal() -> None:
    sealer = ReasoningSealer(SECRET)
    tokens = {sealer.seal("same") for _ in range(50)}
    assert len(tokens) == 50
    assert {sealer.open(t) for t in tokens} == {"same"}


def test_every_single_byte_tamper_fails() -> None:
    sealer = ReasoningSealer(SECRET)
    token = sealer.seal("the answer is 42")
    data = unb64(token)
    for i in range(len(data)):  # every byte of the token: version, nonce, ciphertext, tag
        for flip in (0x01, 0x80, 0xFF):
            altered = bytearray(data)
            altered[i] ^= flip
            with pytest.raises(SealError):
                sealer.open(b64(bytes(altered)))
    for i in range(len(token)):  # every character of the text, to every other base64url character
        for c in B64URL:
            if c != token[i]:
                with pytest.raises(SealError):
                    sealer.open(token[:i] + c + token[i + 1 :])


def test_truncated_and_extended_tokens_fail() -> None:
    sealer = ReasoningSealer(SECRET)
    token = sealer.seal("reasoning")
    for n in range(len(token)):
        with pytest.raises(SealError):
            sealer.open(token[:n])
    data = unb64(token)
    for extra in (b"\x00", b"more"):
        with pytest.raises(SealError):
            sealer.open(b64(data + extra))
    with pytest.raises(SealError, match="truncated"):
        sealer.open(b64(data[:20]))


def test_another_key_fails_the_same_secret_interoperates() -> None:
    token = ReasoningSealer(SECRET).seal("hidden")
    assert ReasoningSealer(SECRET).open(token) == "hidden"  # another replica with the same secret
    for other in (ReasoningSealer(SECRET + " "), ReasoningSealer("x"), ReasoningSealer(None)):
        with pytest.raises(SealError, match="another key"):
            other.open(token)


def test_no_secret_means_a_random_key_per_instance() -> None:
    one, two = ReasoningSealer(None), ReasoningSealer(None)
    token = one.seal("process-local")
    assert one.open(token) == "process-local"
    with pytest.raises(SealError):
        two.open(token)
    with pytest.raises(SealError):
        one.open(two.seal("x"))


def test_a_token_sealed_for_another_purpose_fails() -> None:
    """Same key, other associated data: the purpose is bound into the tag."""
    nonce = os.urandom(12)
    foreign = AESGCM(derive_key(SECRET)).encrypt(nonce, b"text", b"some other purpose")
    with pytest.raises(SealError):
        ReasoningSealer(SECRET).open(b64(bytes([VERSION]) + nonce + foreign))
    with pytest.raises(SealError, match="unknown version"):
        ReasoningSealer(SECRET).open(b64(bytes([VERSION + 1]) + nonce + foreign))


@pytest.mark.parametrize(
    "garbage",
    [
        "",
        "!!!!",
        "not base64 at all",
        "AAAA====",
        "AQ==",
        "é",
        "gAAAAABl",  # a Fernet-looking prefix
        "a",  # one character decodes to nothing
        b64(os.urandom(64)),
        b64(bytes([VERSION]) + os.urandom(64)),
    ],
)
def test_garbage_fails_with_a_seal_error(garbage: str) -> None:
    with pytest.raises(SealError) as info:
        ReasoningSealer(SECRET).open(garbage)
    assert str(info.value).startswith("encrypted reasoning")


def test_non_canonical_base64_fails() -> None:
    sealer = ReasoningSealer(SECRET)
    token = sealer.seal("x")
    for variant in (token + "=", token + "\n", " " + token, token.replace("-", "+").replace("_", "/") + "+/"):
        with pytest.raises(SealError):
            sealer.open(variant)
    with pytest.raises(SealError):
        sealer.open(None)  # type: ignore[arg-type]


def test_empty_secret_is_refused() -> None:
    with pytest.raises(ValueError, match="empty"):
        ReasoningSealer("")


def test_the_secret_is_never_shown_or_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG):
        sealer = ReasoningSealer(SECRET)
        token = sealer.seal("x")
        for bad in (token[:-1], "garbage!"):
            with pytest.raises(SealError) as info:
                sealer.open(bad)
            assert SECRET not in str(info.value)
    assert SECRET not in caplog.text and SECRET not in repr(sealer)
    assert derive_key(SECRET).hex() not in repr(sealer)
    settings = parse_settings([], environ={"GPTOSS_REASONING_ENCRYPTION_KEY": SECRET})
    assert settings.reasoning_encryption_key == SECRET and SECRET not in repr(settings)
    assert ReasoningSealer(settings.reasoning_encryption_key).open(ReasoningSealer(SECRET).seal("y")) == "y"


def test_key_derivation_is_stable_and_32_bytes() -> None:
    assert derive_key("a") == derive_key("a") != derive_key("b")
    assert len(derive_key("a")) == 32
