"""A chat request's meaning: the typed Harmony conversation it renders to, and its engine requests.

Pydantic has checked the body's shape (``server.protocol``); this is the one semantic pass of a
chat request. ``/tokenize`` renders through the same function, so it counts exactly the prompt
generation uses.
"""

from __future__ import annotations

import asyncio

from harmony.conversation import Conversation, FunctionTool, ResponseFormat, ToolCall, Turn
from harmony.render import RenderedPrompt, RenderError, render_conversation
from server.errors import APIError
from server.guided_grammar import FinalRule
from server.pipeline import EngineRequest
from server.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    NamedToolChoice,
    TextPart,
    TokenizeChatRequest,
)
from server.sampling import OutputLimit, sampling_params
from server.state import ServerState
from server.structured import (
    RequestGuide,
    TurnRules,
    apply_choice,
    attach_guides,
    call_rule,
    json_format,
)


def _format(body: ChatCompletionRequest | TokenizeChatRequest) -> tuple[FinalRule, ResponseFormat | None]:
    fmt = body.response_format
    if fmt is None or fmt.type == "text":
        return FinalRule(), None
    spec = fmt.json_schema
    if fmt.type == "json_schema" and spec is None:
        raise APIError(400, "response_format json_schema needs `json_schema`", param="response_format")
    return json_format(
        fmt.type,
        spec.schema_ if spec else None,
        spec.name if spec else None,
        spec.description if spec else None,
        "response_format.json_schema",
    )


def turn_rules(body: ChatCompletionRequest) -> TurnRules:
    """The structured-output rules of a chat turn (``server.structured``)."""
    final, _ = _format(body)
    tools = () if body.tool_choice == "none" else (body.tools or ())
    calls = [call_rule(t.function.name, t.function.parameters, bool(t.function.strict)) for t in tools]
    rules = TurnRules.of(final, calls, format_param="response_format")
    choice = body.tool_choice
    forced = [call_rule(t.function.name, t.function.parameters, True) for t in tools]
    apply_choice(rules, choice.function.name if isinstance(choice, NamedToolChoice) else choice, forced)
    return rules


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
    _, response_format = _format(body)
    effort = body.reasoning_effort or (body.reasoning.effort if body.reasoning else None)
    tools = () if body.tool_choice == "none" else (body.tools or ())
    return Conversation(
        turns=tuple(_turn(m) for m in body.messages),
        tools=tuple(
            FunctionTool(t.function.name, t.function.description or "", t.function.parameters) for t in tools
        ),
        reasoning_effort=effort or state.settings.default_reasoning_effort,
        date=state.prompt_date(),
        response_formats=(response_format,) if response_format else (),
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


async def engine_requests(
    body: ChatCompletionRequest, prompt: RenderedPrompt, state: ServerState
) -> list[EngineRequest]:
    """One engine request per choice (``n``), all on the same prompt, each with its own
    constraint when the request has structured-output rules."""
    if body.max_completion_tokens is not None:
        limit = OutputLimit(
            body.max_completion_tokens, "max_completion_tokens", state.settings.max_output_tokens
        )
    else:
        limit = OutputLimit(body.max_tokens, "max_tokens", state.settings.max_output_tokens)
    top = body.top_logprobs if body.top_logprobs is not None else 0
    requests = [
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
    rules = turn_rules(body)
    effort = body.reasoning_effort or (body.reasoning.effort if body.reasoning else None)
    guide = RequestGuide(rules, body.max_reasoning_tokens, effort or state.settings.default_reasoning_effort)
    await attach_guides(requests, guide, state.grammar_compiler, rules.param)
    return requests
