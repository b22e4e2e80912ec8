"""Sealed reasoning for ``store: false`` clients (``include: ["reasoning.encrypted_content"]``).

The Responses API hands the client its reasoning as an opaque token and takes it back on the
next turn, so a server that stores nothing can still continue the chain of thought. A token is
``base64url(version || nonce || AES-256-GCM(text, aad))`` without padding: version 1, a random
96-bit nonce, the associated data naming the purpose and version (a token sealed for another
purpose never opens here). The 256-bit key is HKDF-SHA256 of the secret, so any non-empty
string works as ``--reasoning-encryption-key``.

With no secret each process draws a random key: its tokens open only in that process, so
replicas behind one load balancer must share ``GPTOSS_REASONING_ENCRYPTION_KEY`` (as a
secret), and a restart invalidates the tokens given out before it. The secret and the key
are never logged or shown in a repr.
"""

from __future__ import annotations

import base64
import binascii
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

VERSION = 1
_NONCE_BYTES = 12
_TAG_BYTES = 16
_HKDF_SALT = b"gptoss-server/reasoning-seal"
_HKDF_INFO = b"gptoss-server reasoning.encrypted_content key v1"
_AAD = b"gptoss-server:reasoning.encrypted_content:v1"


class SealError(ValueError):
    """A token that does not open: not ours, altered, cut or garbage (HTTP: 400)."""


def derive_key(secret: str) -> bytes:
    """The AES-256 key of a secret string (HKDF-SHA256)."""
    if not secret:
        raise ValueError("the reasoning encryption secret is empty; pass None for a random key")
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=_HKDF_SALT, info=_HKDF_INFO)
    return hkdf.derive(secret.encode())


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(token: str) -> bytes:
    """Strict: only the URL-safe alphabet, no padding, and the one canonical spelling (so no
    two token texts open to the same bytes)."""
    try:
        raw = token.encode("ascii")
        data = base64.urlsafe_b64decode(raw + b"=" * (-len(raw) % 4))
    except (UnicodeEncodeError, binascii.Error, ValueError):
        raise SealError("encrypted reasoning is not valid base64url text") from None
    if _b64encode(data) != token:
        raise SealError("encrypted reasoning is not valid base64url text")
    return data


class ReasoningSealer:
    """``seal(text) -> token`` and ``open(token) -> text``; thread-safe, no state but the key."""

    def __init__(self, secret: str | None) -> None:
        self._random_key = secret is None
        key = AESGCM.generate_key(bit_length=256) if secret is None else derive_key(secret)
        self._aead = AESGCM(key)

    def __repr__(self) -> str:
        return f"ReasoningSealer({'random per-process key' if self._random_key else 'key from a secret'})"

    def seal(self, text: str) -> str:
        nonce = os.urandom(_NONCE_BYTES)
        ciphertext = self._aead.encrypt(nonce, text.encode("utf-8"), _AAD)
        return _b64encode(bytes([VERSION]) + nonce + ciphertext)

    def open(self, token: str) -> str:
        if not isinstance(token, str) or not token:
            raise SealError("encrypted reasoning is empty or not a string")
        data = _b64decode(token)
        if data[0] != VERSION:
            raise SealError(f"encrypted reasoning has an unknown version ({data[0]}); expected {VERSION}")
        if len(data) < 1 + _NONCE_BYTES + _TAG_BYTES:
            raise SealError("encrypted reasoning is truncated")
        nonce, ciphertext = data[1 : 1 + _NONCE_BYTES], data[1 + _NONCE_BYTES :]
        try:
            plaintext = self._aead.decrypt(nonce, ciphertext, _AAD)
        except InvalidTag:
            raise SealError(
                "encrypted reasoning does not open: altered, truncated, or sealed with another key "
                "(replicas must share --reasoning-encryption-key; a server without one loses its "
                "key on restart)"
            ) from None
        return plaintext.decode("utf-8")
