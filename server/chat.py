"""``POST /v1/chat/completions``: render with Harmony, generate, map the output back (§10-§11)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from engine.types import RequestOutput, TokenLogprob
from harmony import tokens
from harmony.render import RenderError, render_chat_request
from harmony.tokenizer import HarmonyTokenizer
from server.errors import APIError
from server.generation import EngineSession, open_session, run_to_end, stream_error_event
from server.harmony_output import HarmonyOutputMapper, OutputDelta
from server.protocol import ChatCompletionRequest
from server.responses import (
    GENERATION_RESPONSES,
    AssistantMessage,
    ChatChoice,
    ChatCompletionResponse,
    ChoiceLogprobs,
    CompletionTokensDetails,
    FunctionCallOut,
    PromptTokensDetails,
    TokenLogprobOut,
    ToolCallOut,
    TopLogprob,
    Usage,
)
from server.sampling import build_sampling_params, stop_strings
from server.sse import DONE, SSE_HEADERS, sse_event
from server.state import ServerState, get_state, request_id_of
from server.stop_strings import StopStringFilter

logger = logging.getLogger("server.chat")
text_logger = logging.getLogger("server.requests")  # prompt/completion text, only with --log-requests
router = APIRouter()


def logprob_out(tokenizer: HarmonyTokenizer, lp: TokenLogprob) -> TokenLogprobOut:
    def entry(token_id: int) -> tuple[str, list[int]]:
        text = tokenizer.token_text(token_id)
        raw = tokenizer.token_bytes(token_id) or text.encode()
        return text, list(raw)

    text, raw = entry(lp.token_id)
    tops = []
    for token_id, value in lp.top:
        t, b = entry(token_id)
        tops.append(TopLogprob(token=t, logprob=value, bytes=b))
    return TokenLogprobOut(token=text, logprob=lp.logprob, bytes=raw, top_logprobs=tops)


class ChatChoiceState:
    """One choice: Harmony mapping, stop strings on the content, finish reason, token counts."""

    def __init__(self, index: int, tokenizer: HarmonyTokenizer, stops: list[str], include_reasoning: bool):
        self.index = index
        self.mapper = HarmonyOutputMapper(tokenizer)
        self.stop = StopStringFilter(stops)
        self.include_reasoning = include_reasoning
        self.finish_reason: str | None = None
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.completion_tokens = 0
        self.total = OutputDelta()  # everything sent so far (the non-streaming message)

    def on_output(self, out: RequestOutput) -> OutputDelta:
        delta = OutputDelta()
        logprobs = out.logprobs or [None] * len(out.token_ids)
        for token_id, lp in zip(out.token_ids, logprobs, strict=False):
            delta.extend(self._filter(self.mapper.feed(token_id, lp)))
            if self.stop.stopped is not None:
                break
        self.prompt_tokens = out.num_prompt_tokens
        self.cached_tokens = out.num_cached_tokens
        self.completion_tokens = out.num_output_tokens
        if self.stop.stopped is not None:
            self.finish_reason = "stop"
        elif out.finished:
            delta.extend(self._filter(self.mapper.finish()))
            delta.content += self.stop.flush()
            self.finish_reason = self._finish_reason(out)
        self.total.extend(delta)
        return delta

    def _filter(self, delta: OutputDelta) -> OutputDelta:
        if self.stop.active and delta.content:
            delta.content = self.stop.feed(delta.content)
        if not self.include_reasoning:
            delta.reasoning = ""
        return delta

    def _finish_reason(self, out: RequestOutput) -> str:
        if out.finish_reason == "length":
            return "length"
        ended_in_call = self.mapper.last_terminator == "call" or out.stop_token_id == tokens.CALL
        if out.finish_reason == "stop" and ended_in_call and self.mapper.tool_calls:
            return "tool_calls"
        return "stop"


def _delta_dict(delta: OutputDelta) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if delta.reasoning:
        out["reasoning"] = delta.reasoning
        out["reasoning_content"] = delta.reasoning
    if delta.content:
        out["content"] = delta.content
    if delta.tool_calls:
        calls = []
        for call in delta.tool_calls:
            if call.id is not None:
                calls.append(
                    {
                        "index": call.index,
                        "id": call.id,
                        "type": "function",
                        "function": {"name": call.name, "arguments": call.arguments},
                    }
                )
            else:
                calls.append({"index": call.index, "function": {"arguments": call.arguments}})
        out["tool_calls"] = calls
    return out


def _usage(states: list[ChatChoiceState]) -> Usage:
    prompt = states[0].prompt_tokens if states else 0
    completion = sum(s.completion_tokens for s in states)
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=states[0].cached_tokens if states else 0),
        completion_tokens_details=CompletionTokensDetails(
            reasoning_tokens=sum(s.mapper.reasoning_tokens for s in states)
        ),
    )


def _message(state: ChatChoiceState) -> AssistantMessage:
    total = state.total
    calls = [
        ToolCallOut(id=c.id, function=FunctionCallOut(name=c.name, arguments=c.arguments))
        for c in state.mapper.tool_calls
    ]
    reasoning = total.reasoning or None
    return AssistantMessage(
        content=total.content if (total.content or not calls) else None,
        reasoning=reasoning,
        reasoning_content=reasoning,
        tool_calls=calls or None,
    )


def check_tool_choice(body: ChatCompletionRequest) -> None:
    choice = body.tool_choice
    if choice == "required" or (choice is not None and not isinstance(choice, str)):
        raise APIError(
            400,
            "tool_choice `required` or a named function needs constrained decoding, which this server does "
            "not support yet; use `auto` or `none`.",
            param="tool_choice",
            code="unsupported_tool_choice",
        )


def render_request_dict(body: ChatCompletionRequest, state: ServerState) -> dict[str, Any]:
    """The JSON-shaped request the Harmony renderer takes (tools dropped for tool_choice none)."""
    data = body.model_dump(mode="json", exclude_none=True)
    if body.tool_choice == "none":
        data.pop("tools", None)
    if body.reasoning_effort is None and (body.reasoning is None or body.reasoning.effort is None):
        data["reasoning_effort"] = state.settings.default_reasoning_effort
    return data


async def render_prompt(data: dict[str, Any], state: ServerState):
    tokenizer = state.require_tokenizer()
    try:
        return await asyncio.to_thread(render_chat_request, data, state.prompt_date(), tokenizer)
    except RenderError as exc:
        raise APIError(400, exc.message, param=exc.param) from exc


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletionResponse,
    responses=GENERATION_RESPONSES,
    summary="Create a chat completion (Harmony reasoning and tool calls mapped to OpenAI fields)",
)
async def chat_completions(body: ChatCompletionRequest, request: Request):
    state = get_state(request)
    request_id = request_id_of(request)
    if body.model_extra:
        logger.debug("%s: ignoring unknown fields %s", request_id, sorted(body.model_extra))
    engine = state.require_engine()
    model = state.resolve_model(body.model)
    check_tool_choice(body)
    rendered = await render_prompt(render_request_dict(body, state), state)
    if state.settings.log_requests:
        text_logger.info("%s prompt: %r", request_id, rendered.text)
    top = body.top_logprobs if body.top_logprobs is not None else 0
    requests = [
        (
            rendered.token_ids,
            build_sampling_params(
                body,
                max_tokens=body.max_completion_tokens or body.max_tokens,
                prompt_len=len(rendered.token_ids),
                max_model_len=state.max_model_len,
                stop_token_ids=rendered.stop_token_ids,
                logprobs=top if body.logprobs else None,
                choice_index=i,
            ),
        )
        for i in range(body.n)
    ]
    tokenizer = state.require_tokenizer()
    states = [
        ChatChoiceState(i, tokenizer, stop_strings(body.stop), body.include_reasoning) for i in range(body.n)
    ]
    session = open_session(engine, "chatcmpl", state.drain, state.metrics, requests, request_id)
    response_id = session.response_id
    created = int(time.time())
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            _stream(
                session, states, state, response_id, created, model, include_usage, body.logprobs, request_id
            ),
            media_type="text/event-stream",
            headers=SSE_HEADERS,
        )
    try:
        await run_to_end(session, states, request_id, request.receive)
    finally:
        _account(state, states, request_id)
    return ChatCompletionResponse(
        id=response_id,
        created=created,
        model=model,
        choices=[
            ChatChoice(
                index=s.index,
                message=_message(s),
                logprobs=(
                    ChoiceLogprobs(content=[logprob_out(tokenizer, lp) for lp in s.total.content_logprobs])
                    if body.logprobs
                    else None
                ),
                finish_reason=s.finish_reason,
            )
            for s in states
        ],
        usage=_usage(states),
    )


def _account(state: ServerState, states: list[ChatChoiceState], request_id: str) -> None:
    for s in states:
        state.metrics.add_tokens(
            s.prompt_tokens if s.index == 0 else 0, s.completion_tokens, s.mapper.reasoning_tokens
        )
        if s.mapper.problems:
            logger.debug(
                "%s choice %d: %d Harmony parse problem(s)", request_id, s.index, len(s.mapper.problems)
            )
        if state.settings.log_requests:
            text_logger.info(
                "%s choice %d: reasoning=%r content=%r tool_calls=%r",
                request_id,
                s.index,
                s.total.reasoning,
                s.total.content,
                [(c.name, c.arguments) for c in s.mapper.tool_calls],
            )


async def _stream(
    session: EngineSession,
    states: list[ChatChoiceState],
    state: ServerState,
    response_id: str,
    created: int,
    model: str,
    include_usage: bool,
    want_logprobs: bool,
    request_id: str,
) -> AsyncIterator[bytes]:
    tokenizer = state.require_tokenizer()

    def chunk(choices: list[dict[str, Any]], usage: dict | None = None, with_usage_key: bool = True) -> bytes:
        payload: dict[str, Any] = {
            "id": response_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": choices,
        }
        if include_usage and with_usage_key:
            payload["usage"] = usage
        return sse_event(payload)

    try:
        for s in states:
            yield chunk(
                [
                    {
                        "index": s.index,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                ]
            )
        while (item := await session.next_output()) is not None:
            index, out = item
            s = states[index]
            delta = s.on_output(out)
            if s.stop.stopped is not None:
                session.finish_early(index)
            if not delta.is_empty():
                logprobs = None
                if want_logprobs:
                    logprobs = {
                        "content": [logprob_out(tokenizer, lp).model_dump() for lp in delta.content_logprobs]
                    }
                yield chunk(
                    [
                        {
                            "index": index,
                            "delta": _delta_dict(delta),
                            "logprobs": logprobs,
                            "finish_reason": None,
                        }
                    ]
                )
            if s.finish_reason is not None:
                yield chunk(
                    [{"index": index, "delta": {}, "logprobs": None, "finish_reason": s.finish_reason}]
                )
        if include_usage:
            yield chunk([], usage=_usage(states).model_dump())
        yield DONE
    except Exception as exc:  # never cut a stream silently: an error event, then [DONE]
        yield stream_error_event(exc, request_id)
        yield DONE
    finally:
        session.close()
        _account(state, states, request_id)
