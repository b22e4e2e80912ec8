"""A chat request's meaning: the typed Harmony conversation it renders to, and its engine requests.

Pydantic has checked the body's shape (``server.protocol``); this is the one semantic pass of a
chat request. ``/tokenize`` renders through the same function, so it counts exactly the prompt
generation uses.
"""

from __future__ import annotations

import asyncio

from harmony.conversation import Conversation, FunctionTool, ToolCall, Turn
from harmony.render import RenderedPrompt, RenderError, render_conversation
from server.errors import APIError
from server.pipeline import EngineRequest
from server.protocol import ChatCompletionRequest, ChatMessage, TextPart, TokenizeChatRequest
from server.sampling import OutputLimit, sampling_params
from server.state import ServerState


def check_tool_choice(body: ChatCompletionRequest | TokenizeChatRequest) -> None:
    choice = body.tool_choice
    if choice == "required" or (choice is not None and not isinstance(choice, str)):
        raise APIError(
            400,
            "tool_choice `required` or a named function needs constrained decoding, which this server does "
            "not support yet; use `auto` or `none`.",
            param="tool_choice",
            code="unsupported_tool_choice",
        )


def _text(content: str | list[TextPart] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(part.text for part in content)


def _turn(message: ChatMessage) -> Turn:
    calls = tuple(ToolCall(c.function.name, c.function.arguments, c.id) for c in message.tool_calls or ())
    return Turn(
        role=message.role,
        content=_text(message.content),
        reasoning=message.reasoning or message.reasoning_content or "",
        tool_calls=calls,
        tool_call_id=message.tool_call_id,
        name=message.name,
    )


def conversation_of(body: ChatCompletionRequest | TokenizeChatRequest, state: ServerState) -> Conversation:
    check_tool_choice(body)
    effort = body.reasoning_effort or (body.reasoning.effort if body.reasoning else None)
    tools = () if body.tool_choice == "none" else (body.tools or ())
    return Conversation(
        turns=tuple(_turn(m) for m in body.messages),
        tools=tuple(
            FunctionTool(t.function.name, t.function.description or "", t.function.parameters) for t in tools
        ),
        reasoning_effort=effort or state.settings.default_reasoning_effort,
        date=state.prompt_date(),
    )


async def render_chat(
    body: ChatCompletionRequest | TokenizeChatRequest, state: ServerState
) -> RenderedPrompt:
    conversation = conversation_of(body, state)
    tokenizer = state.require_tokenizer()
    try:  # long prompts: off the event loop
        return await asyncio.to_thread(render_conversation, conversation, tokenizer)
    except RenderError as exc:
        raise APIError(400, exc.message, param=exc.param) from exc


def engine_requests(
    body: ChatCompletionRequest, prompt: RenderedPrompt, state: ServerState
) -> list[EngineRequest]:
    """One engine request per choice (``n``), all on the same prompt."""
    if body.max_completion_tokens is not None:
        limit = OutputLimit(
            body.max_completion_tokens, "max_completion_tokens", state.settings.max_output_tokens
        )
    else:
        limit = OutputLimit(body.max_tokens, "max_tokens", state.settings.max_output_tokens)
    top = body.top_logprobs if body.top_logprobs is not None else 0
    return [
        EngineRequest(
            prompt.token_ids,
            sampling_params(
                body,
                limit=limit,
                prompt_len=len(prompt.token_ids),
                prompt_param="messages",
                max_model_len=state.max_model_len,
                stop_token_ids=prompt.stop_token_ids,
                logprobs=top if body.logprobs else None,
                choice_index=i,
            ),
        )
        for i in range(body.n)
    ]
