"""The o200k_harmony tokenizer: o200k_base ranks (shipped in harmony/data, sha256 checked) plus
the Harmony special tokens, through tiktoken. Never touches the network."""

from __future__ import annotations

import base64
import codecs
import functools
import hashlib
from collections.abc import Iterable
from pathlib import Path

import tiktoken

from harmony import tokens

VOCAB_PATH = Path(__file__).resolve().parent / "data" / "o200k_base.tiktoken"
VOCAB_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"

# The o200k_base split pattern (identical in tiktoken and harmony-rs).
O200K_PATTERN = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)


class VocabularyError(RuntimeError):
    """The shipped vocabulary file is missing or does not have the expected sha256."""


def _load_ranks(path: Path, expected_sha256: str) -> dict[bytes, int]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise VocabularyError(f"cannot read vocabulary {path}: {exc}") from exc
    digest = hashlib.sha256(data).hexdigest()
    if digest != expected_sha256:
        raise VocabularyError(f"vocabulary {path} has sha256 {digest}, expected {expected_sha256}")
    ranks: dict[bytes, int] = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


class HarmonyTokenizer:
    """o200k_harmony. Ordinary tokens are ids 0..199997; 199998..201088 are special tokens.

    Ids outside the vocabulary (negative, or beyond the last reserved id) are treated as
    special tokens without text: they never raise, they decode to nothing.
    """

    name = "o200k_harmony"
    vocab_size = tokens.VOCAB_SIZE

    def __init__(self, vocab_path: Path = VOCAB_PATH, expected_sha256: str = VOCAB_SHA256) -> None:
        ranks = _load_ranks(vocab_path, expected_sha256)
        self.num_ordinary = len(ranks)
        if self.num_ordinary != tokens.FIRST_SPECIAL or max(ranks.values()) != tokens.FIRST_SPECIAL - 1:
            raise VocabularyError("vocabulary does not hold the 199998 o200k_base ranks")
        self._specials = tokens.special_tokens()
        self._special_text = {token_id: name for name, token_id in self._specials.items()}
        self._encoding = tiktoken.Encoding(
            name=self.name,
            pat_str=O200K_PATTERN,
            mergeable_ranks=ranks,
            special_tokens=self._specials,
        )

    @property
    def encoding(self) -> tiktoken.Encoding:
        """The tiktoken encoding (for libraries that build their own view of the vocabulary)."""
        return self._encoding

    # -- encoding -----------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Ordinary text only: text that looks like a special token stays ordinary text."""
        return self._encoding.encode_ordinary(text)

    def encode_with_specials(self, text: str) -> list[int]:
        """Special-token text (`<|start|>`, `<|reserved_200013|>`...) becomes control tokens."""
        return self._encoding.encode(text, allowed_special="all")

    def single_token(self, data: bytes) -> int:
        """The id of the ordinary token whose bytes are exactly `data` (KeyError if none)."""
        return self._encoding.encode_single_token(data)

    # -- decoding -----------------------------------------------------------------------------

    def is_special(self, token_id: int) -> bool:
        """True for every id that is not an ordinary text token (control, reserved, unknown)."""
        return not 0 <= token_id < self.num_ordinary

    def is_known(self, token_id: int) -> bool:
        """True for ids that name a token (ordinary or special)."""
        return 0 <= token_id < self.num_ordinary or token_id in self._special_text

    def token_bytes(self, token_id: int) -> bytes:
        """Bytes of an ordinary token; b"" for special and unknown ids."""
        if self.is_special(token_id):
            return b""
        return self._encoding.decode_single_token_bytes(token_id)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Bytes of the ordinary tokens among `ids` (special and unknown ids are skipped)."""
        return self._encoding.decode_bytes([i for i in ids if not self.is_special(i)])

    def decode(self, ids: Iterable[int]) -> str:
        """Text of the ordinary tokens among `ids`; invalid UTF-8 becomes U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_text(self, token_id: int) -> str:
        """One token as text: special tokens as `<|...|>`, unknown ids as "", ordinary tokens
        decoded on their own (a partial UTF-8 character becomes U+FFFD)."""
        if self.is_special(token_id):
            return self._special_text.get(token_id, "")
        return self.token_bytes(token_id).decode("utf-8", errors="replace")

    def decode_with_specials(self, ids: Iterable[int]) -> str:
        """Raw text: special tokens as their `<|...|>` text, ordinary bytes decoded with U+FFFD."""
        decoder = IncrementalDecoder(self, include_special=True)
        return "".join(decoder.feed(i) for i in ids) + decoder.flush()


class IncrementalDecoder:
    """Streams text token by token, holding back a UTF-8 character split across tokens.

    Special tokens either appear as their `<|...|>` text (include_special) or are dropped.
    """

    def __init__(self, tokenizer: HarmonyTokenizer, include_special: bool = False) -> None:
        self._tokenizer = tokenizer
        self._include_special = include_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id: int) -> str:
        if self._tokenizer.is_special(token_id):
            if not self._include_special:
                return ""
            # A special token ends any pending partial character.
            return self.flush() + self._tokenizer.token_text(token_id)
        return self._utf8.decode(self._tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        """Text of held-back bytes (U+FFFD for an incomplete character); resets the decoder."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text


@functools.lru_cache(maxsize=1)
def load_tokenizer() -> HarmonyTokenizer:
    """The process-wide tokenizer (immutable, so sharing it is safe)."""
    return HarmonyTokenizer()
