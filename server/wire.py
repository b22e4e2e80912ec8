"""Response bodies and stream chunks, declared so the OpenAPI schema tells the truth (schemathesis
checks it). Chunks are dumped with ``exclude_unset``: a field given as None is sent as null, a
field never set is not sent (a delta carries only what it has)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class FunctionCallOut(BaseModel):
    name: str
    arguments: str


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning: str | None = Field(default=None, description="The analysis channel (chain of thought).")
    reasoning_content: str | None = Field(default=None, description="Same text as `reasoning`.")
    tool_calls: list[ToolCallOut] | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprobOut(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprobOut] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls"] | None = None


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class CompletionTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None
    completion_tokens_details: CompletionTokensDetails | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChoice]
    usage: Usage


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None
    stop_reason: int | str | None = Field(
        default=None, description="The stop token id or stop string that ended the choice, if any."
    )


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: Usage


class FunctionCallDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(BaseModel):
    index: int
    id: str | None = None  # the first delta of a call only
    type: Literal["function"] | None = None
    function: FunctionCallDelta


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls"] | None = None


class _Chunk(BaseModel):
    """A stream chunk: its ``object`` is always sent, though it is a default."""

    def model_post_init(self, context: Any, /) -> None:
        self.model_fields_set.add("object")


class ChatCompletionChunk(_Chunk):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = Field(
        default=None, description="With `stream_options.include_usage`: null, then set on the last chunk."
    )


class CompletionChunkChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None
    stop_reason: int | str | None = None


class CompletionChunk(_Chunk):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChunkChoice]
    usage: Usage | None = None


STREAM_CHUNKS: tuple[type[BaseModel], ...] = (ChatCompletionChunk, CompletionChunk)


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "gptoss-server"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(BaseModel):
    prompt: str


class StatusResponse(BaseModel):
    status: str
    detail: dict[str, Any] | None = None


# Shapes of the SSE events, documented for humans (the stream itself is text/event-stream).
SSE_DESCRIPTION = (
    "With `stream: true`: Server-Sent Events, each `data: {json}\\n\\n` (chunks of object "
    "`chat.completion.chunk` / `text_completion`), ending with `data: [DONE]\\n\\n`. An error "
    'after the stream started is sent as `data: {"error": {...}}` before `[DONE]`.'
)


def documented_errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    descriptions = {
        400: "Invalid request",
        401: "Missing or wrong API key",
        404: "Unknown model",
        413: "Body too large",
        429: "Waiting queue full; retry after `Retry-After` seconds",
        500: "Internal fault",
        503: "Not ready or draining; retry after `Retry-After` seconds",
    }
    return {s: {"model": ErrorResponse, "description": descriptions[s]} for s in statuses}


def generation_responses(chunk: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """The documented responses of a generation endpoint: JSON, or SSE frames of ``chunk``
    (named in ``x-sse-data``; its schema is among the components)."""
    sse = {"schema": {"type": "string"}, "x-sse-data": {"$ref": f"#/components/schemas/{chunk.__name__}"}}
    return {
        200: {"description": SSE_DESCRIPTION, "content": {"text/event-stream": sse}},
        **documented_errors(400, 401, 404, 413, 429, 500, 503),
    }
