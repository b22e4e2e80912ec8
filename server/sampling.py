"""The meaning of the sampling fields every generation API shares -> ``engine.types.SamplingParams``.

Pydantic has checked their shapes and ranges; what needs the prompt, the context window or the
vocabulary is checked here, once, so the engine never refuses what the server accepted:
- an explicit output limit that does not fit in the context left after the prompt is a 400
  (OpenAI's and vLLM's message), never silently clamped;
- without one, a request gets the context left, capped by ``--max-output-tokens``, so a client
  that sends no limit cannot hold a slot for the whole window;
- ``logit_bias`` keys are token ids of the vocabulary; ``min_tokens`` fits the limit.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.types import SamplingParams
from harmony.tokens import VOCAB_SIZE
from server.errors import APIError
from server.protocol import SamplerFields

_SEED_MOD = 2**63


@dataclass(frozen=True)
class OutputLimit:
    """The client's output limit (None = not given), under the name it used."""

    value: int | None
    param: str
    default: int  # applied when ``value`` is None (before the context cap)


def stop_strings(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [s for s in ([stop] if isinstance(stop, str) else stop) if s]


def logit_bias_of(raw: dict[str, float] | None) -> dict[int, float] | None:
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


def max_tokens_for(limit: OutputLimit, *, prompt_len: int, prompt_param: str, max_model_len: int) -> int:
    room = max_model_len - prompt_len
    if room <= 0:
        raise APIError(
            400,
            f"This model's maximum context length is {max_model_len} tokens. However, your prompt "
            f"resulted in {prompt_len} tokens. Please reduce the length of the {prompt_param}.",
            param=prompt_param,
            code="context_length_exceeded",
        )
    if limit.value is None:
        return min(room, limit.default)
    if limit.value > room:
        raise APIError(
            400,
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{prompt_len + limit.value} tokens ({prompt_len} in the {prompt_param}, {limit.value} in the "
            f"completion). Please reduce the length of the {prompt_param} or completion.",
            param=limit.param,
            code="context_length_exceeded",
        )
    return limit.value


def sampling_params(
    fields: SamplerFields,
    *,
    limit: OutputLimit,
    prompt_len: int,
    prompt_param: str,
    max_model_len: int,
    stop_token_ids: list[int],
    logprobs: int | None,
    choice_index: int = 0,
) -> SamplingParams:
    max_tokens = max_tokens_for(
        limit, prompt_len=prompt_len, prompt_param=prompt_param, max_model_len=max_model_len
    )
    min_tokens = fields.min_tokens or 0
    if min_tokens > max_tokens:
        raise APIError(
            400, f"min_tokens ({min_tokens}) exceeds max_tokens ({max_tokens})", param="min_tokens"
        )
    seed = None if fields.seed is None else (fields.seed + choice_index) % _SEED_MOD
    return SamplingParams(
        temperature=1.0 if fields.temperature is None else fields.temperature,
        top_p=1.0 if fields.top_p is None else fields.top_p,
        top_k=fields.top_k if fields.top_k is not None and fields.top_k > 0 else 0,
        min_p=fields.min_p or 0.0,
        seed=seed,
        max_tokens=max_tokens,
        min_tokens=min_tokens,
        stop_token_ids=list(stop_token_ids),
        presence_penalty=fields.presence_penalty or 0.0,
        frequency_penalty=fields.frequency_penalty or 0.0,
        repetition_penalty=1.0 if fields.repetition_penalty is None else fields.repetition_penalty,
        logit_bias=logit_bias_of(fields.logit_bias),
        logprobs=logprobs,
        ignore_eos=fields.ignore_eos,
    )
