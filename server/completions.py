"""``POST /v1/completions``: raw continuation of a prompt the caller built (Harmony text or ids)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from engine.types import RequestOutput
from harmony import tokens
from harmony.tokenizer import HarmonyTokenizer, IncrementalDecoder
from server.errors import APIError
from server.generation import EngineSession, open_session, run_to_end, stream_error_event
from server.protocol import CompletionRequest
from server.responses import (
    GENERATION_RESPONSES,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    PromptTokensDetails,
    Usage,
)
from server.sampling import build_sampling_params, stop_strings
from server.sse import DONE, SSE_HEADERS, sse_event
from server.state import ServerState, get_state, request_id_of
from server.stop_strings import StopStringFilter

logger = logging.getLogger("server.completions")
text_logger = logging.getLogger("server.requests")
router = APIRouter()

# What the model's generation config stops on: <|return|>, <|call|>, <|endoftext|>.
COMPLETION_STOP_IDS = [tokens.RETURN, tokens.CALL, tokens.ENDOFTEXT]


def prompts_of(body: CompletionRequest, tokenizer: HarmonyTokenizer) -> list[list[int]]:
    raw = body.prompt
    items: list[Any] = [raw] if isinstance(raw, str) or (raw and isinstance(raw[0], int)) else list(raw)
    prompts = []
    for i, item in enumerate(items):
        ids = tokenizer.encode_with_specials(item) if isinstance(item, str) else list(item)
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt" if len(items) == 1 else f"prompt[{i}]")
        bad = next((t for t in ids if not tokenizer.is_known(t)), None)
        if bad is not None:
            raise APIError(400, f"token id {bad} is not in the vocabulary", param="prompt")
        prompts.append(ids)
    return prompts


class TextChoiceState:
    def __init__(
        self, index: int, tokenizer: HarmonyTokenizer, stops: list[str], skip_special: bool, logprobs: bool
    ):
        self.index = index
        self.tokenizer = tokenizer
        self.decoder = IncrementalDecoder(tokenizer, include_special=not skip_special)
        self.stop = StopStringFilter(stops)
        self.want_logprobs = logprobs
        self.text = ""
        self.logprobs = CompletionLogprobs()
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.completion_tokens = 0

    def on_output(self, out: RequestOutput) -> tuple[str, CompletionLogprobs | None]:
        pieces = []
        step_logprobs = CompletionLogprobs() if self.want_logprobs else None
        lps = out.logprobs or [None] * len(out.token_ids)
        for token_id, lp in zip(out.token_ids, lps, strict=False):
            if out.finish_reason == "stop" and token_id == out.stop_token_id:
                continue  # the stop token itself is not part of the text
            piece = self.stop.feed(self.decoder.feed(token_id))
            if step_logprobs is not None and lp is not None:
                step_logprobs.tokens.append(self.tokenizer.token_text(token_id))
                step_logprobs.token_logprobs.append(lp.logprob)
                step_logprobs.top_logprobs.append({self.tokenizer.token_text(t): v for t, v in lp.top})
                step_logprobs.text_offset.append(len(self.text) + sum(map(len, pieces)))
            pieces.append(piece)
            if self.stop.stopped is not None:
                break
        self.prompt_tokens, self.cached_tokens = out.num_prompt_tokens, out.num_cached_tokens
        self.completion_tokens = out.num_output_tokens
        if self.stop.stopped is not None:
            self.finish_reason, self.stop_reason = "stop", self.stop.stopped
        elif out.finished:
            pieces.append(self.stop.feed(self.decoder.flush()))
            pieces.append(self.stop.flush())
            self.finish_reason = "length" if out.finish_reason == "length" else "stop"
            self.stop_reason = out.stop_token_id if out.finish_reason == "stop" else None
        text = "".join(pieces)
        self.text += text
        if step_logprobs is not None:
            for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                getattr(self.logprobs, key).extend(getattr(step_logprobs, key))
        return text, step_logprobs


def _usage(states: list[TextChoiceState], n: int) -> Usage:
    prompt = sum(s.prompt_tokens for s in states[::n])  # each prompt once
    completion = sum(s.completion_tokens for s in states)
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=sum(s.cached_tokens for s in states[::n])),
    )


@router.post(
    "/v1/completions",
    response_model=CompletionResponse,
    responses=GENERATION_RESPONSES,
    summary="Create a raw text completion of a (Harmony) prompt",
)
async def completions(body: CompletionRequest, request: Request):
    state = get_state(request)
    request_id = request_id_of(request)
    if body.model_extra:
        logger.debug("%s: ignoring unknown fields %s", request_id, sorted(body.model_extra))
    engine = state.require_engine()
    model = state.resolve_model(body.model)
    tokenizer = state.require_tokenizer()
    prompts = await asyncio.to_thread(prompts_of, body, tokenizer)  # long prompts: off the loop
    if len(prompts) * body.n > 64:
        raise APIError(400, "at most 64 choices (prompts x n) per request", param="n")
    if state.settings.log_requests:
        text_logger.info("%s prompts: %r", request_id, [tokenizer.decode_with_specials(p) for p in prompts])
    stop_ids = [] if body.ignore_eos else COMPLETION_STOP_IDS
    requests = []
    for prompt in prompts:
        for j in range(body.n):
            params = build_sampling_params(
                body,
                max_tokens=body.max_tokens if body.max_tokens is not None else 16,
                prompt_len=len(prompt),
                max_model_len=state.max_model_len,
                stop_token_ids=stop_ids,
                logprobs=body.logprobs,
                choice_index=j,
            )
            requests.append((prompt, params))
    stops = stop_strings(body.stop)
    states = [
        TextChoiceState(i, tokenizer, stops, body.skip_special_tokens, body.logprobs is not None)
        for i in range(len(requests))
    ]
    session = open_session(engine, "cmpl", state.drain, state.metrics, requests, request_id)
    response_id = session.response_id
    created = int(time.time())
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            _stream(session, states, state, response_id, created, model, include_usage, body.n, request_id),
            media_type="text/event-stream",
            headers=SSE_HEADERS,
        )
    try:
        await run_to_end(session, states, request_id, request.receive)
    finally:
        _account(state, states, body.n, request_id)
    return CompletionResponse(
        id=response_id,
        created=created,
        model=model,
        choices=[
            CompletionChoice(
                index=s.index,
                text=s.text,
                logprobs=s.logprobs if body.logprobs is not None else None,
                finish_reason=s.finish_reason,
                stop_reason=s.stop_reason,
            )
            for s in states
        ],
        usage=_usage(states, body.n),
    )


def _account(state: ServerState, states: list[TextChoiceState], n: int, request_id: str) -> None:
    for i, s in enumerate(states):
        state.metrics.add_tokens(s.prompt_tokens if i % n == 0 else 0, s.completion_tokens, 0)
        if state.settings.log_requests:
            text_logger.info("%s choice %d: text=%r", request_id, s.index, s.text)


async def _stream(
    session: EngineSession,
    states: list[TextChoiceState],
    state: ServerState,
    response_id: str,
    created: int,
    model: str,
    include_usage: bool,
    n: int,
    request_id: str,
) -> AsyncIterator[bytes]:
    def chunk(choices: list[dict[str, Any]], usage: dict | None = None) -> bytes:
        payload: dict[str, Any] = {
            "id": response_id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": choices,
        }
        if include_usage:
            payload["usage"] = usage
        return sse_event(payload)

    try:
        while (item := await session.next_output()) is not None:
            index, out = item
            s = states[index]
            text, logprobs = s.on_output(out)
            if s.stop.stopped is not None:
                session.finish_early(index)
            if text or s.finish_reason is not None:
                yield chunk(
                    [
                        {
                            "index": index,
                            "text": text,
                            "logprobs": logprobs.model_dump() if logprobs is not None else None,
                            "finish_reason": s.finish_reason,
                            "stop_reason": s.stop_reason,
                        }
                    ]
                )
        if include_usage:
            yield chunk([], usage=_usage(states, n).model_dump())
        yield DONE
    except Exception as exc:  # never cut a stream silently: an error event, then [DONE]
        yield stream_error_event(exc, request_id)
        yield DONE
    finally:
        session.close()
        _account(state, states, n, request_id)
