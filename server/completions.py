"""``POST /v1/completions``: the raw-completion adapter of the generation pipeline.

The prompt is text the caller built (Harmony special tokens written as text) or token ids, one
or several; each gets ``n`` choices. The pipeline's events map to ``text_completion`` chunks;
the non-streaming body is the fold of those very chunks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from fastapi import APIRouter, Request

from harmony import tokens
from harmony.tokenizer import HarmonyTokenizer
from server import events as ev
from server.errors import APIError
from server.pipeline import EngineRequest, open_generation
from server.protocol import CompletionRequest
from server.sampling import OutputLimit, sampling_params, stop_strings
from server.sse import data_stream, sse_response
from server.state import ServerState, get_state, request_id_of
from server.structured import RequestGuide, attach_guides, completion_content
from server.text_output import TextAssembler
from server.wire import (
    CompletionChoice,
    CompletionChunk,
    CompletionChunkChoice,
    CompletionLogprobs,
    CompletionResponse,
    PromptTokensDetails,
    Usage,
    generation_responses,
)

logger = logging.getLogger("server.completions")
text_logger = logging.getLogger("server.requests")
router = APIRouter()

# What the model's generation config stops on: <|return|>, <|call|>, <|endoftext|>.
COMPLETION_STOP_IDS = [tokens.RETURN, tokens.CALL, tokens.ENDOFTEXT]
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for this legacy endpoint
MAX_CHOICES = 64  # prompts x n


def prompts_of(body: CompletionRequest, tokenizer: HarmonyTokenizer) -> list[list[int]]:
    raw = body.prompt
    items: list[Any] = [raw] if isinstance(raw, str) or (raw and isinstance(raw[0], int)) else list(raw)
    prompts = []
    for i, item in enumerate(items):
        param = "prompt" if len(items) == 1 else f"prompt[{i}]"
        ids = tokenizer.encode_with_specials(item) if isinstance(item, str) else list(item)
        if not ids:
            raise APIError(400, "the prompt is empty", param=param)
        bad = next((t for t in ids if not tokenizer.is_known(t)), None)
        if bad is not None:
            raise APIError(400, f"token id {bad} is not in the vocabulary", param=param)
        prompts.append(ids)
    return prompts


async def engine_requests(
    body: CompletionRequest, prompts: list[list[int]], state: ServerState
) -> list[EngineRequest]:
    if len(prompts) * body.n > MAX_CHOICES:
        raise APIError(400, f"at most {MAX_CHOICES} choices (prompts x n) per request", param="n")
    limit = OutputLimit(body.max_tokens, "max_tokens", DEFAULT_MAX_TOKENS)
    stop_ids = [] if body.ignore_eos else COMPLETION_STOP_IDS
    requests = [
        EngineRequest(
            prompt,
            sampling_params(
                body,
                limit=limit,
                prompt_len=len(prompt),
                prompt_param="prompt",
                max_model_len=state.max_model_len,
                stop_token_ids=stop_ids,
                logprobs=body.logprobs,
                choice_index=j,
            ),
            prompt_index=p,
        )
        for p, prompt in enumerate(prompts)
        for j in range(body.n)
    ]
    guide = RequestGuide(None, body.max_reasoning_tokens, content=completion_content(body))
    await attach_guides(requests, guide, state.grammar_compiler, "structured_outputs")
    return requests


class CompletionChunks:
    """Pipeline events -> ``text_completion`` chunk models."""

    def __init__(
        self, response_id: str, model: str, tokenizer: HarmonyTokenizer, *, logprobs: bool, usage: bool
    ):
        self._head = {"id": response_id, "created": int(time.time()), "model": model}
        self._tokenizer = tokenizer
        self._logprobs = logprobs
        self._usage = usage

    def _chunk(self, choices: list[CompletionChunkChoice], usage: Usage | None = None) -> CompletionChunk:
        extra = {"usage": usage} if self._usage else {}
        return CompletionChunk(**self._head, choices=choices, **extra)

    def _logprobs_of(self, placed: tuple[ev.PlacedLogprob, ...]) -> CompletionLogprobs:
        text = self._tokenizer.token_text
        return CompletionLogprobs(
            tokens=[text(p.logprob.token_id) for p in placed],
            token_logprobs=[p.logprob.logprob for p in placed],
            top_logprobs=[{text(t): v for t, v in p.logprob.top} for p in placed],
            text_offset=[p.text_offset for p in placed],
        )

    def __call__(self, event: ev.Event) -> list[CompletionChunk]:
        if isinstance(event, ev.ContentText):
            logprobs = self._logprobs_of(event.logprobs) if self._logprobs else None
            choice = CompletionChunkChoice(
                index=event.choice, text=event.text, logprobs=logprobs, finish_reason=None, stop_reason=None
            )
            return [self._chunk([choice])]
        if isinstance(event, ev.Finished):
            choice = CompletionChunkChoice(
                index=event.choice,
                text="",
                logprobs=CompletionLogprobs() if self._logprobs else None,
                finish_reason=event.reason,  # type: ignore[arg-type]
                stop_reason=event.stop_reason,
            )
            return [self._chunk([choice])]
        if isinstance(event, ev.Usage) and self._usage:
            usage = Usage(
                prompt_tokens=event.prompt_tokens,
                completion_tokens=event.completion_tokens,
                total_tokens=event.total_tokens,
                prompt_tokens_details=PromptTokensDetails(cached_tokens=event.cached_tokens),
            )
            return [self._chunk([], usage)]
        return []


def fold(chunks: list[CompletionChunk], n: int, logprobs: bool) -> CompletionResponse:
    """The non-streaming body: every chunk's text and logprobs, accumulated per choice."""
    text = [""] * n
    lps = [CompletionLogprobs() for _ in range(n)]
    finish: list[Any] = [None] * n
    stop: list[int | str | None] = [None] * n
    usage = None
    for chunk in chunks:
        usage = chunk.usage or usage
        for c in chunk.choices:
            text[c.index] += c.text
            if c.logprobs is not None:
                for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                    getattr(lps[c.index], key).extend(getattr(c.logprobs, key))
            if c.finish_reason is not None:
                finish[c.index], stop[c.index] = c.finish_reason, c.stop_reason
    assert usage is not None
    first = chunks[0]
    choices = [
        CompletionChoice(
            index=i,
            text=text[i],
            logprobs=lps[i] if logprobs else None,
            finish_reason=finish[i],
            stop_reason=stop[i],
        )
        for i in range(n)
    ]
    return CompletionResponse(
        id=first.id, created=first.created, model=first.model, choices=choices, usage=usage
    )


@router.post(
    "/v1/completions",
    response_model=CompletionResponse,
    responses=generation_responses(CompletionChunk),
    summary="Create a raw text completion of a (Harmony) prompt",
)
async def completions(body: CompletionRequest, request: Request):
    state = get_state(request)
    request_id = request_id_of(request)
    if body.model_extra:
        logger.debug("%s: ignoring unknown fields %s", request_id, sorted(body.model_extra))
    state.require_engine()
    model = state.resolve_model(body.model)
    tokenizer = state.require_tokenizer()
    prompts = await asyncio.to_thread(prompts_of, body, tokenizer)  # long prompts: off the loop
    if state.settings.log_requests:
        text_logger.info("%s prompts: %r", request_id, [tokenizer.decode_with_specials(p) for p in prompts])
    requests = await engine_requests(body, prompts, state)
    stops = stop_strings(body.stop)
    assemblers = [
        TextAssembler(i, tokenizer, stops, skip_special=body.skip_special_tokens)
        for i in range(len(requests))
    ]
    generation = open_generation(state, request_id, requests, assemblers, kind="cmpl-", prompt_param="prompt")
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    want_logprobs = body.logprobs is not None
    chunks = CompletionChunks(
        generation.response_id,
        model,
        tokenizer,
        logprobs=want_logprobs,
        usage=include_usage or not body.stream,
    )
    if body.stream:
        return sse_response(data_stream((), generation, chunks))
    events = await generation.collect(request.receive)
    return fold([c for e in events for c in chunks(e)], len(requests), want_logprobs)
