"""o200k_harmony tokenizer vs openai-harmony's, the vocabulary check, and the package's imports."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from harmony_oracle import encoding
from harmony_strategies import TRICKY
from hypothesis import given, settings
from hypothesis import strategies as st

from harmony import tokens
from harmony.tokenizer import (
    VOCAB_PATH,
    HarmonyTokenizer,
    IncrementalDecoder,
    VocabularyError,
    load_tokenizer,
)

TOK = load_tokenizer()
texts = st.lists(
    st.one_of(st.text(max_size=12), st.sampled_from([*TRICKY, "<|reserved_200013|>", "<|return|>"])),
    max_size=6,
).map("".join)


def test_special_tokens_match_openai_harmony():
    oracle = encoding()
    for name, token_id in tokens.special_tokens().items():
        assert oracle.encode(name, allowed_special="all") == [token_id] == TOK.encode_with_specials(name)
        assert TOK.token_text(token_id) == name == oracle.decode([token_id])
        assert TOK.is_special(token_id) and oracle.is_special_token(token_id)
    assert TOK.encode("assistant") == [tokens.ASSISTANT]
    assert sorted(oracle.stop_tokens_for_assistant_actions()) == list(tokens.STOP_TOKEN_IDS)
    assert TOK.vocab_size == 201088


@settings(max_examples=300, deadline=None)
@given(texts)
def test_encoding_matches_openai_harmony(text):
    oracle = encoding()
    ordinary = TOK.encode(text)
    assert ordinary == oracle.encode(text, disallowed_special=())
    assert not any(TOK.is_special(t) for t in ordinary)
    assert TOK.decode(ordinary) == text
    assert TOK.encode_with_specials(text) == oracle.encode(text, allowed_special="all")


def test_ids_without_text_never_crash():
    for token_id in (-1, 201089, 10**9):
        assert TOK.is_special(token_id) and not TOK.is_known(token_id)
        assert TOK.token_text(token_id) == "" and TOK.token_bytes(token_id) == b""
    assert TOK.decode([-1, *TOK.encode("hi"), 10**9, tokens.START]) == "hi"
    assert TOK.decode_bytes([TOK.single_token(b"\xff")]) == b"\xff"
    assert TOK.decode([TOK.single_token(b"\xff")]) == "\ufffd"


def test_incremental_decoder_holds_back_split_characters():
    pieces = [TOK.single_token(bytes([b])) for b in "é😀".encode()]
    decoder = IncrementalDecoder(TOK, include_special=True)
    out = [decoder.feed(t) for t in [*pieces, tokens.END, pieces[0]]]
    assert out == ["", "é", "", "", "", "😀", "<|end|>", ""]
    assert decoder.flush() == "\ufffd"
    assert TOK.decode_with_specials([tokens.START, *TOK.encode("x")]) == "<|start|>x"


def test_vocabulary_hash_is_checked(tmp_path: Path):
    broken = tmp_path / "o200k_base.tiktoken"
    data = bytearray(VOCAB_PATH.read_bytes())
    data[-2] = ord("7") if data[-2] != ord("7") else ord("8")
    broken.write_bytes(bytes(data))
    with pytest.raises(VocabularyError, match="sha256"):
        HarmonyTokenizer(broken)
    with pytest.raises(VocabularyError):
        HarmonyTokenizer(tmp_path / "missing.tiktoken")


def test_harmony_imports_neither_torch_nor_fastapi_nor_pydantic():
    code = (
        "import sys, harmony.render, harmony.parser, harmony.cli, harmony.tokenizer;"
        "bad = [m for m in ('torch', 'fastapi', 'pydantic') if m in sys.modules]; print(bad); sys.exit(bool(bad))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1]
    )
    assert result.returncode == 0, result.stdout + result.stderr
