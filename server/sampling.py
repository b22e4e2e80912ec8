"""Request fields -> ``engine.types.SamplingParams`` (with the checks that need the prompt length)."""

from __future__ import annotations

from engine.types import SamplingParams
from harmony.tokens import VOCAB_SIZE
from server.errors import APIError
from server.protocol import _SamplingFields

_SEED_MOD = 2**63


def stop_strings(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [s for s in ([stop] if isinstance(stop, str) else stop) if s]


def _logit_bias(raw: dict[str, float] | None) -> dict[int, float] | None:
    if not raw:
        return None
    out = {}
    for key, value in raw.items():
        try:
            token_id = int(key)
        except ValueError:
            raise APIError(
                400, f"logit_bias keys must be token ids, got {key!r}", param="logit_bias"
            ) from None
        if not 0 <= token_id < VOCAB_SIZE:
            raise APIError(
                400, f"logit_bias token id {token_id} is out of the vocabulary", param="logit_bias"
            )
        out[token_id] = float(value)
    return out


def build_sampling_params(
    req: _SamplingFields,
    *,
    max_tokens: int | None,
    prompt_len: int,
    max_model_len: int,
    stop_token_ids: list[int],
    logprobs: int | None,
    choice_index: int = 0,
) -> SamplingParams:
    room = max_model_len - prompt_len
    if room <= 0:
        raise APIError(
            400,
            f"This model's maximum context length is {max_model_len} tokens; the prompt has {prompt_len}.",
            param="messages",
            code="context_length_exceeded",
        )
    # A max_tokens beyond the context is clamped (clients often send a large round number).
    limit = room if max_tokens is None else min(max_tokens, room)
    min_tokens = req.min_tokens or 0
    if min_tokens > limit:
        raise APIError(400, f"min_tokens ({min_tokens}) exceeds max_tokens ({limit})", param="min_tokens")
    seed = None if req.seed is None else (req.seed + choice_index) % _SEED_MOD
    top_k = req.top_k if req.top_k is not None and req.top_k > 0 else 0
    return SamplingParams(
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=top_k,
        min_p=req.min_p or 0.0,
        seed=seed,
        max_tokens=limit,
        min_tokens=min_tokens,
        stop_token_ids=list(stop_token_ids),
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        logit_bias=_logit_bias(req.logit_bias),
        logprobs=logprobs,
        ignore_eos=req.ignore_eos,
    )
