"""Building gpt-oss completions (token ids after `<|start|>assistant`) for parser tests, the way
the renderer writes them and the way the model writes them."""

from __future__ import annotations

from dataclasses import dataclass

from harmony import tokens
from harmony.tokenizer import load_tokenizer


@dataclass(frozen=True)
class Spec:
    """One assistant message of a completion."""

    channel: str
    content: str
    recipient: str | None = None
    constrained: bool = False  # content type <|constrain|>json
    model_order: bool = True  # `<|channel|>c to=r` (model) or ` to=r<|channel|>c` (renderer)
    adjacent_constrain: bool = False  # `to=r<|constrain|>json` without the space
    byte_tokens: bool = False  # content as one token per byte (splits UTF-8 characters)
    terminator: int = tokens.END


def content_ids(text: str, byte_tokens: bool) -> list[int]:
    tokenizer = load_tokenizer()
    if not byte_tokens:
        return tokenizer.encode(text)
    return [tokenizer.single_token(bytes([b])) for b in text.encode("utf-8")]


def message_ids(spec: Spec) -> list[int]:
    enc = load_tokenizer().encode
    out = [tokens.START, *enc("assistant")]
    recipient = enc(f" to={spec.recipient}") if spec.recipient else []
    if spec.model_order:
        out += [tokens.CHANNEL, *enc(spec.channel), *recipient]
    else:
        out += [*recipient, tokens.CHANNEL, *enc(spec.channel)]
    if spec.constrained:
        space = [] if spec.adjacent_constrain and spec.recipient and spec.model_order else enc(" ")
        out += [*space, tokens.CONSTRAIN, *enc("json")]
    return [*out, tokens.MESSAGE, *content_ids(spec.content, spec.byte_tokens), spec.terminator]


def completion_ids(specs: list[Spec]) -> list[int]:
    """The messages concatenated, without the `<|start|>assistant` the prompt already holds."""
    ids = [t for spec in specs for t in message_ids(spec)]
    assert ids[:2] == [tokens.START, tokens.ASSISTANT]
    return ids[2:]
