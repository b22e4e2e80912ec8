"""``/v1/responses``: the Responses API adapter of the generation pipeline, with its store.

A request's items (after any stored conversation it continues) render to a Harmony prompt
(``server.responses_input``); the pipeline's events build the response and its stream
(``server.responses_events``). With ``store`` (the default) the response and its conversation are
kept in the bounded response store (``server.response_store``) for ``previous_response_id``,
``GET``, ``DELETE`` and ``input_items``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from harmony.render import RenderedPrompt, RenderError, render_conversation
from server.errors import APIError
from server.events import Failed, Usage
from server.harmony_output import HarmonyAssembler
from server.pipeline import EngineRequest, open_generation
from server.response_store import ResponseStoreUnavailable
from server.responses_events import ResponseBuilder, item_id
from server.responses_input import (
    ENCRYPTED_REASONING,
    Offered,
    conversation_of,
    offered_tools,
    request_items,
    stored_items,
    turn_rules,
)
from server.responses_protocol import (
    FunctionCallOutputItem,
    HostedTool,
    InputItem,
    InputTokensRequest,
    NamedTool,
    ResponsesRequest,
)
from server.responses_wire import DeletedResponse, InputItemList, InputTokens, ReasoningConfig, ResponseBody
from server.sampling import OutputLimit, max_tokens_for, sampling_params
from server.sse import sse_frame, sse_response
from server.state import ServerState, get_state, request_id_of
from server.structured import RequestGuide, attach_guides
from server.wire import documented_errors

logger = logging.getLogger("server.responses")
text_logger = logging.getLogger("server.requests")  # prompt text, only with --log-requests
router = APIRouter()
DROPPED_TOOLS_HEADER = "x-gptoss-dropped-tools"
_ID_PREFIX = {
    "message": "msg",
    "reasoning": "rs",
    "function_call": "fc",
    "function_call_output": "fco",
    "custom_tool_call": "ctc",
    "custom_tool_call_output": "ctco",
}


async def fit_prompt(
    body: ResponsesRequest | InputTokensRequest,
    items: list[InputItem],
    offered: Offered,
    limit: OutputLimit,
    state: ServerState,
) -> RenderedPrompt:
    """The prompt of ``items``; with ``truncation: auto`` the oldest items go until it fits
    (a tool result never loses its call), else a prompt that does not fit is a 400."""
    tokenizer = state.require_tokenizer()
    while True:
        conversation = conversation_of(body, items, offered, state)  # type: ignore[arg-type]
        try:
            prompt = await asyncio.to_thread(render_conversation, conversation, tokenizer)
        except RenderError as exc:
            raise APIError(400, exc.message, param="input") from exc
        try:
            max_tokens_for(
                limit,
                prompt_len=len(prompt.token_ids),
                prompt_param="input",
                max_model_len=state.max_model_len,
            )
            return prompt
        except APIError:
            if body.truncation != "auto" or len(items) <= 1:
                raise
        items = items[1:]
        while len(items) > 1 and isinstance(items[0], FunctionCallOutputItem):
            items = items[1:]


def _stored_form(item: InputItem) -> dict[str, Any]:
    """An input item as ``input_items`` lists it: with an id, a status and content parts."""
    data = item.model_dump(mode="json", exclude_none=True)
    data.setdefault("id", item_id(_ID_PREFIX.get(data.get("type", "message"), "item")))
    data.setdefault("status", "completed")
    if data.get("type", "message") == "message":
        data["type"] = "message"
        if isinstance(data["content"], str):
            part = "output_text" if data["role"] == "assistant" else "input_text"
            data["content"] = [{"type": part, "text": data["content"]}]
        for part in data["content"]:
            if part["type"] == "output_text":
                part.setdefault("annotations", [])
    return data


def _limit(body: ResponsesRequest, state: ServerState) -> OutputLimit:
    return OutputLimit(body.max_output_tokens, "max_output_tokens", state.settings.max_output_tokens)


@router.post(
    "/v1/responses",
    response_model=ResponseBody,
    responses=documented_errors(400, 401, 404, 413, 429, 500, 503),
)
async def create_response(body: ResponsesRequest, request: Request):
    state = get_state(request)
    request_id = request_id_of(request)
    state.require_engine()
    model = state.resolve_model(body.model)
    offered = offered_tools(body)
    history = await _read(stored_items(body.previous_response_id, state)) if body.previous_response_id else []
    own = request_items(body)
    limit = _limit(body, state)
    prompt = await fit_prompt(body, history + own, offered, limit, state)
    if state.settings.log_requests:
        text_logger.info("%s prompt: %r", request_id, prompt.text)
    params = sampling_params(
        body,
        limit=limit,
        prompt_len=len(prompt.token_ids),
        prompt_param="input",
        max_model_len=state.max_model_len,
        stop_token_ids=prompt.stop_token_ids,
        logprobs=None,
    )
    rules = turn_rules(body, offered)
    effort = (body.reasoning.effort if body.reasoning else None) or state.settings.default_reasoning_effort
    engine_request = EngineRequest(prompt.token_ids, params)
    guide = RequestGuide(rules, body.max_reasoning_tokens, effort)
    await attach_guides([engine_request], guide, state.grammar_compiler, rules.param)
    assembler = HarmonyAssembler(0, state.require_tokenizer(), [], join="")  # each message its own item
    generation = open_generation(
        state,
        request_id,
        [engine_request],
        [assembler],
        kind="resp_",
        prompt_param="input",
    )
    response = ResponseBody(
        id=generation.response_id,
        created_at=time.time(),
        model=model,
        instructions=body.instructions,
        tools=[
            t.model_dump(mode="json", exclude_none=True)
            for t in body.tools or ()
            if not isinstance(t, HostedTool)
        ],
        tool_choice=body.tool_choice.model_dump(mode="json", exclude_none=True)
        if isinstance(body.tool_choice, NamedTool)
        else body.tool_choice or "auto",
        parallel_tool_calls=body.parallel_tool_calls is not False,
        temperature=body.temperature,
        top_p=body.top_p,
        max_output_tokens=body.max_output_tokens,
        previous_response_id=body.previous_response_id,
        reasoning=ReasoningConfig(effort=effort, summary=body.reasoning.summary if body.reasoning else None),
        store=body.store,
        truncation=body.truncation or "disabled",
        metadata=body.metadata or {},
        user=body.user,
        text=body.text.model_dump(mode="json", by_alias=True, exclude_none=True)
        if body.text and body.text.format
        else {"format": {"type": "text"}},
    )
    sealer = state.sealer if ENCRYPTED_REASONING in (body.include or ()) else None
    builder = ResponseBuilder(response, sealer, offered.names)
    record = {"items": [_stored_form(i) for i in history + own], "own_from": len(history)}

    async def save(done: ResponseBody) -> None:
        if body.store:
            record["response"] = done.model_dump(mode="json")
            await state.require_response_store().put(done.id, json.dumps(record).encode())

    headers = {DROPPED_TOOLS_HEADER: ",".join(offered.dropped)} if offered.dropped else {}
    if body.stream:
        return sse_response(_stream(builder, generation, save), headers=headers)
    for event in await generation.collect(request.receive):
        builder(event)
    await _read(save(builder.response))
    return JSONResponse(builder.response.model_dump(mode="json"), headers=headers)


async def _stream(
    builder: ResponseBuilder, generation: Any, save: Callable[[ResponseBody], Awaitable[None]]
) -> AsyncIterator[bytes]:
    """``event: {type}`` frames, no ``[DONE]``; a failure is ``response.failed``, never a cut stream."""
    try:
        for frame in builder.start():
            yield sse_frame(frame, event=frame.type)
        async for event in generation.events():
            frames = builder(event)
            if isinstance(event, Usage):
                try:
                    await save(builder.response)
                except ResponseStoreUnavailable as exc:
                    frames = builder.fail(APIError(503, f"The response store is unavailable: {exc}"))
            for frame in frames:
                yield sse_frame(frame, event=frame.type)
            if isinstance(event, Failed | Usage):
                break
    except Exception as exc:  # a bug: still a terminal event
        logger.error("%s: responses stream failed", generation.request_id, exc_info=exc)
        for frame in builder.fail(
            APIError(500, f"Internal server error (request id {generation.request_id}).")
        ):
            yield sse_frame(frame, event=frame.type)
    finally:
        generation.close()


async def _read(awaitable: Awaitable[Any]) -> Any:
    try:
        return await awaitable
    except ResponseStoreUnavailable as exc:
        raise APIError(
            503, f"The response store is unavailable: {exc}", code="store_unavailable", retry_after=5
        ) from exc


async def _record(response_id: str, state: ServerState) -> dict[str, Any]:
    raw = await _read(state.require_response_store().get(response_id))
    if raw is None:
        raise APIError(
            404,
            f"Response `{response_id}` is not in the store: unknown, deleted, expired or evicted.",
            param="response_id",
            code="response_not_found",
        )
    return json.loads(raw)


@router.get(
    "/v1/responses/{response_id}", response_model=ResponseBody, responses=documented_errors(401, 404, 503)
)
async def get_response(response_id: str, request: Request) -> JSONResponse:
    return JSONResponse((await _record(response_id, get_state(request)))["response"])


@router.delete(
    "/v1/responses/{response_id}", response_model=DeletedResponse, responses=documented_errors(401, 404, 503)
)
async def delete_response(response_id: str, request: Request) -> DeletedResponse:
    state = get_state(request)
    if not await _read(state.require_response_store().delete(response_id)):
        await _record(response_id, state)  # the 404
    return DeletedResponse(id=response_id)


@router.get(
    "/v1/responses/{response_id}/input_items",
    response_model=InputItemList,
    responses=documented_errors(401, 404, 503),
)
async def list_input_items(response_id: str, request: Request, order: str = "desc") -> InputItemList:
    record = await _record(response_id, get_state(request))
    items = record["items"][record["own_from"] :]
    if order != "asc":
        items = items[::-1]
    return InputItemList(
        data=items, first_id=items[0]["id"] if items else None, last_id=items[-1]["id"] if items else None
    )


@router.post(
    "/v1/responses/input_tokens", response_model=InputTokens, responses=documented_errors(400, 401, 404, 503)
)
async def count_input_tokens(body: InputTokensRequest, request: Request) -> InputTokens:
    state = get_state(request)
    state.resolve_model(body.model)
    history = await _read(stored_items(body.previous_response_id, state)) if body.previous_response_id else []
    own = request_items(body)  # type: ignore[arg-type]
    offered = offered_tools(body)  # type: ignore[arg-type]
    prompt = await fit_prompt(body, history + own, offered, OutputLimit(1, "max_output_tokens", 1), state)
    return InputTokens(input_tokens=len(prompt.token_ids))
