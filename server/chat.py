"""``POST /v1/chat/completions``: the chat adapter of the generation pipeline.

The request renders to a Harmony prompt (``server.chat_request``); the pipeline's events map to
``chat.completion.chunk`` deltas (``ChatChunks``); the non-streaming body is the fold of those
very chunks (``fold``), so the concatenated deltas equal the message by construction.
"""

from __future__ import annotations

import logging
import time

from fastapi import APIRouter, Request

from engine.types import TokenLogprob
from harmony.tokenizer import HarmonyTokenizer
from server import events as ev
from server.chat_request import engine_requests, render_chat
from server.harmony_output import HarmonyAssembler
from server.pipeline import open_generation
from server.protocol import ChatCompletionRequest
from server.sampling import stop_strings
from server.sse import data_stream, sse_response
from server.state import get_state, request_id_of
from server.wire import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    ChoiceLogprobs,
    CompletionTokensDetails,
    FunctionCallDelta,
    FunctionCallOut,
    PromptTokensDetails,
    TokenLogprobOut,
    ToolCallDelta,
    ToolCallOut,
    TopLogprob,
    Usage,
    generation_responses,
)

logger = logging.getLogger("server.chat")
text_logger = logging.getLogger("server.requests")  # prompt text, only with --log-requests
router = APIRouter()


def logprob_out(tokenizer: HarmonyTokenizer, lp: TokenLogprob) -> TokenLogprobOut:
    def entry(token_id: int) -> tuple[str, list[int]]:
        text = tokenizer.token_text(token_id)
        return text, list(tokenizer.token_bytes(token_id) or text.encode())

    text, raw = entry(lp.token_id)
    tops = [TopLogprob(token=t, logprob=v, bytes=b) for (t, b), v in ((entry(i), v) for i, v in lp.top)]
    return TokenLogprobOut(token=text, logprob=lp.logprob, bytes=raw, top_logprobs=tops)


def usage_out(usage: ev.Usage) -> Usage:
    return Usage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=usage.cached_tokens),
        completion_tokens_details=CompletionTokensDetails(reasoning_tokens=usage.reasoning_tokens),
    )


class ChatChunks:
    """Pipeline events -> ``chat.completion.chunk`` models."""

    def __init__(
        self,
        response_id: str,
        model: str,
        n: int,
        tokenizer: HarmonyTokenizer,
        *,
        logprobs: bool,
        usage: bool,
    ) -> None:
        self._head = {"id": response_id, "created": int(time.time()), "model": model}
        self._n = n
        self._tokenizer = tokenizer
        self._logprobs = logprobs
        self._usage = usage  # every chunk carries `usage` (null until the last one)

    def _chunk(self, choices: list[ChatChunkChoice], usage: Usage | None = None) -> ChatCompletionChunk:
        extra = {"usage": usage} if self._usage else {}
        return ChatCompletionChunk(**self._head, choices=choices, **extra)

    def _delta(
        self, choice: int, delta: ChatDelta, logprobs: ChoiceLogprobs | None = None
    ) -> list[ChatCompletionChunk]:
        return [
            self._chunk([ChatChunkChoice(index=choice, delta=delta, logprobs=logprobs, finish_reason=None)])
        ]

    def head(self) -> list[ChatCompletionChunk]:
        """The role chunk of every choice (no `content` key: there is no content yet)."""
        return [c for i in range(self._n) for c in self._delta(i, ChatDelta(role="assistant"))]

    def __call__(self, event: ev.Event) -> list[ChatCompletionChunk]:
        if isinstance(event, ev.ReasoningText):
            return self._delta(event.choice, ChatDelta(reasoning=event.text, reasoning_content=event.text))
        if isinstance(event, ev.ContentText):
            logprobs = None
            if self._logprobs:
                logprobs = ChoiceLogprobs(
                    content=[logprob_out(self._tokenizer, p.logprob) for p in event.logprobs]
                )
            elif not event.text:
                return []
            delta = ChatDelta(content=event.text) if event.text else ChatDelta()
            return self._delta(event.choice, delta, logprobs)
        if isinstance(event, ev.ToolCallBegun):
            call = ToolCallDelta(
                index=event.call,
                id=event.id,
                type="function",
                function=FunctionCallDelta(name=event.name, arguments=""),
            )
            return self._delta(event.choice, ChatDelta(tool_calls=[call]))
        if isinstance(event, ev.ToolCallArguments):
            call = ToolCallDelta(index=event.call, function=FunctionCallDelta(arguments=event.text))
            return self._delta(event.choice, ChatDelta(tool_calls=[call]))
        if isinstance(event, ev.Finished):
            choice = ChatChunkChoice(
                index=event.choice, delta=ChatDelta(), logprobs=None, finish_reason=event.reason
            )
            return [self._chunk([choice])]
        if isinstance(event, ev.Usage) and self._usage:
            return [self._chunk([], usage_out(event))]
        return []  # ToolCallEnded: chat has no event for it


def fold(chunks: list[ChatCompletionChunk], n: int, logprobs: bool) -> ChatCompletionResponse:
    """The non-streaming body: every delta of every chunk, accumulated per choice."""
    reasoning, content = [""] * n, [""] * n
    calls: list[dict[int, ToolCallOut]] = [{} for _ in range(n)]
    tokens: list[list[TokenLogprobOut]] = [[] for _ in range(n)]
    finish: list[str | None] = [None] * n
    usage = None
    for chunk in chunks:
        usage = chunk.usage or usage
        for c in chunk.choices:
            i, d = c.index, c.delta
            reasoning[i] += d.reasoning or ""
            content[i] += d.content or ""
            for tc in d.tool_calls or ():
                if tc.id is not None:
                    calls[i][tc.index] = ToolCallOut(
                        id=tc.id, function=FunctionCallOut(name=tc.function.name or "", arguments="")
                    )
                calls[i][tc.index].function.arguments += tc.function.arguments or ""
            tokens[i] += c.logprobs.content or [] if c.logprobs else []
            finish[i] = c.finish_reason or finish[i]
    assert usage is not None
    first = chunks[0]
    return ChatCompletionResponse(
        id=first.id,
        created=first.created,
        model=first.model,
        choices=[
            ChatChoice(
                index=i,
                message=AssistantMessage(
                    content=content[i] if (content[i] or not calls[i]) else None,
                    reasoning=reasoning[i] or None,
                    reasoning_content=reasoning[i] or None,
                    tool_calls=list(calls[i].values()) or None,
                ),
                logprobs=ChoiceLogprobs(content=tokens[i]) if logprobs else None,
                finish_reason=finish[i],  # type: ignore[arg-type]
            )
            for i in range(n)
        ],
        usage=usage,
    )


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletionResponse,
    responses=generation_responses(ChatCompletionChunk),
    summary="Create a chat completion (Harmony reasoning and tool calls mapped to OpenAI fields)",
)
async def chat_completions(body: ChatCompletionRequest, request: Request):
    state = get_state(request)
    request_id = request_id_of(request)
    if body.model_extra:
        logger.debug("%s: ignoring unknown fields %s", request_id, sorted(body.model_extra))
    state.require_engine()
    model = state.resolve_model(body.model)
    prompt = await render_chat(body, state)
    if state.settings.log_requests:
        text_logger.info("%s prompt: %r", request_id, prompt.text)
    requests = await engine_requests(body, prompt, state)
    tokenizer = state.require_tokenizer()
    stops = stop_strings(body.stop)
    assemblers = [
        HarmonyAssembler(i, tokenizer, stops, include_reasoning=body.include_reasoning) for i in range(body.n)
    ]
    generation = open_generation(
        state, request_id, requests, assemblers, kind="chatcmpl-", prompt_param="messages"
    )
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    chunks = ChatChunks(
        generation.response_id,
        model,
        body.n,
        tokenizer,
        logprobs=body.logprobs,
        usage=include_usage or not body.stream,
    )
    if body.stream:
        return sse_response(data_stream(chunks.head(), generation, chunks))
    events = await generation.collect(request.receive)
    return fold([c for e in events for c in chunks(e)], body.n, body.logprobs)
