"""Request bodies of the OpenAI-compatible API (pydantic, strict types: ``"1"`` is not a number).

Unknown fields are accepted and ignored (logged at debug by the handlers); wrong types and
out-of-range values become a 400 through the validation handler.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

ReasoningEffort = Literal["low", "medium", "high"]


class _Lenient(BaseModel):
    """Unknown keys allowed, known keys strictly typed."""

    model_config = ConfigDict(extra="allow", strict=True)


class TextPart(_Lenient):
    type: Literal["text"] = Field(description="Only text parts are supported.")
    text: str


NonEmpty = Annotated[str, Field(min_length=1)]


class FunctionCall(_Lenient):
    name: NonEmpty
    arguments: str = Field(description="JSON text of the arguments, as the model wrote them.")


class ToolCall(_Lenient):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    reasoning: str | None = Field(default=None, description="Assistant chain of thought of an earlier turn.")
    reasoning_content: str | None = Field(default=None, description="Alias of `reasoning`.")


class FunctionDefinition(_Lenient):
    name: NonEmpty
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Lenient):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Lenient):
    name: str


class NamedToolChoice(_Lenient):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(_Lenient):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | str | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormatParam(_Lenient):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


MaxReasoningTokens = Annotated[int, Field(ge=0)] | None
MAX_REASONING_DOC = (
    "Analysis tokens allowed before the server closes the reasoning (default for a constrained "
    "request: a share of the output limit by effort, low 1/4, medium 1/2, high 3/4)."
)


class ReasoningOptions(_Lenient):
    effort: ReasoningEffort | None = None


class StreamOptions(_Lenient):
    include_usage: bool | None = None


class SamplerFields(_Lenient):
    """The sampler's knobs, shared by every generation API."""

    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=-1)] | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    seed: Annotated[int, Field(ge=-(2**63), le=2**63 - 1)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0, le=10)] | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    min_tokens: Annotated[int, Field(ge=0)] | None = None
    ignore_eos: bool = False


class SamplingFields(SamplerFields):
    """Fields shared by chat and text completions."""

    model: str | None = Field(default=None, description="A name from /v1/models; omitted = the served model.")
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    stop: str | Annotated[list[str], Field(max_length=16)] | None = Field(
        default=None, description="Strings that end the answer (applied to the final channel in chat)."
    )
    n: Annotated[int, Field(ge=1, le=16)] = 1
    user: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    reasoning_effort: ReasoningEffort | None = None
    reasoning: ReasoningOptions | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    response_format: ResponseFormatParam | None = None
    max_reasoning_tokens: MaxReasoningTokens = Field(default=None, description=MAX_REASONING_DOC)
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    include_reasoning: bool = Field(default=True, description="False drops the reasoning fields.")


TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class CompletionRequest(SamplingFields):
    prompt: (
        str
        | TokenIds
        | Annotated[list[str], Field(min_length=1)]
        | Annotated[list[TokenIds], Field(min_length=1)]
    ) = Field(
        description="Raw (Harmony) prompt text with special tokens written as text, or token ids; or a list."
    )
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    max_reasoning_tokens: MaxReasoningTokens = Field(default=None, description=MAX_REASONING_DOC)
    skip_special_tokens: bool = Field(default=False, description="True drops special tokens from `text`.")


class TokenizeChatRequest(_Lenient):
    model: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    response_format: ResponseFormatParam | None = None
    reasoning_effort: ReasoningEffort | None = None
    reasoning: ReasoningOptions | None = None


class TokenizePromptRequest(_Lenient):
    model: str | None = None
    prompt: str


class DetokenizeRequest(_Lenient):
    model: str | None = None
    tokens: Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=1_000_000)]
