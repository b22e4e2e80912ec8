"""Response bodies and stream events of the Responses API (OpenAI's shapes: every body and event
parses with the ``openai`` SDK's ``openai.types.responses`` models; tests check it)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

ItemStatus = Literal["in_progress", "completed", "incomplete"]


class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[Any] = Field(default_factory=list)


class ReasoningTextPart(BaseModel):
    type: Literal["reasoning_text"] = "reasoning_text"
    text: str


class ReasoningOut(BaseModel):
    id: str
    type: Literal["reasoning"] = "reasoning"
    summary: list[Any] = Field(default_factory=list, description="gpt-oss writes no summaries: always empty.")
    content: list[ReasoningTextPart] = Field(default_factory=list)
    encrypted_content: str | None = None
    status: ItemStatus = "in_progress"


class MessageOut(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    status: ItemStatus = "in_progress"
    content: list[OutputText] = Field(default_factory=list)
    phase: Literal["commentary", "final_answer"] = Field(
        "final_answer", description="`commentary`: a preamble the model wrote before its tool calls."
    )


class FunctionCallOut(BaseModel):
    id: str
    type: Literal["function_call"] = "function_call"
    call_id: str
    name: str
    arguments: str = ""
    namespace: str | None = None
    status: ItemStatus = "in_progress"


class CustomToolCallOut(BaseModel):
    id: str
    type: Literal["custom_tool_call"] = "custom_tool_call"
    call_id: str
    name: str
    input: str = ""
    namespace: str | None = None
    status: ItemStatus = "in_progress"


OutputItem = ReasoningOut | MessageOut | FunctionCallOut | CustomToolCallOut


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0
    cache_write_tokens: int = Field(0, description="Prompt tokens computed here (now in the prefix cache).")


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class ResponseErrorOut(BaseModel):
    code: str
    message: str


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens"] = "max_output_tokens"


class ReasoningConfig(BaseModel):
    effort: str | None = None
    summary: str | None = None


class ResponseBody(BaseModel):
    id: str
    object: Literal["response"] = "response"
    created_at: float
    status: Literal["in_progress", "completed", "incomplete", "failed"] = "in_progress"
    model: str
    output: list[OutputItem] = Field(default_factory=list)
    instructions: str | None = None
    tools: list[dict[str, Any]] = Field(default_factory=list)
    tool_choice: Any = "auto"
    parallel_tool_calls: bool = True
    temperature: float | None = None
    top_p: float | None = None
    max_output_tokens: int | None = None
    previous_response_id: str | None = None
    reasoning: ReasoningConfig | None = None
    store: bool = True
    truncation: Literal["auto", "disabled"] = "disabled"
    usage: ResponseUsage | None = None
    error: ResponseErrorOut | None = None
    incomplete_details: IncompleteDetails | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    text: dict[str, Any] = Field(default_factory=lambda: {"format": {"type": "text"}})
    user: str | None = None


class StreamEvent(BaseModel):
    """One ``event: {type}`` / ``data: {json}`` frame; its other fields are the event's own."""

    model_config = ConfigDict(extra="allow")

    type: str
    sequence_number: int


class DeletedResponse(BaseModel):
    id: str
    object: Literal["response.deleted"] = "response.deleted"
    deleted: bool = True


class InputItemList(BaseModel):
    object: Literal["list"] = "list"
    data: list[dict[str, Any]]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


class InputTokens(BaseModel):
    object: Literal["response.input_tokens"] = "response.input_tokens"
    input_tokens: int
