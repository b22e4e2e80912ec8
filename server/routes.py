"""Models, tokenize/detokenize, probes and the Prometheus scrape endpoint."""

from __future__ import annotations

import asyncio
import contextlib

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from server.chat_request import render_chat
from server.errors import APIError
from server.protocol import DetokenizeRequest, TokenizeChatRequest, TokenizePromptRequest
from server.response_store import ResponseStoreUnavailable
from server.state import ServerState, get_state
from server.wire import (
    DetokenizeResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    StatusResponse,
    TokenizeResponse,
    documented_errors,
)

router = APIRouter()


def _card(state: ServerState, name: str) -> ModelCard:
    return ModelCard(id=name, created=state.created, max_model_len=state.max_model_len or None)


@router.get(
    "/v1/models", response_model=ModelList, responses=documented_errors(401), summary="List served models"
)
async def list_models(request: Request) -> ModelList:
    state = get_state(request)
    return ModelList(data=[_card(state, name) for name in state.model_names])


@router.get(
    "/v1/models/{model_id:path}",
    response_model=ModelCard,
    responses=documented_errors(401, 404),
    summary="Describe one served model",
)
async def get_model(model_id: str, request: Request) -> ModelCard:
    state = get_state(request)
    if model_id not in state.model_names:
        raise APIError(404, f"The model `{model_id}` does not exist.", param="model", code="model_not_found")
    return _card(state, model_id)


@router.post(
    "/tokenize",
    response_model=TokenizeResponse,
    responses=documented_errors(400, 401, 404, 413, 503),
    summary="A chat request (exactly the prompt generation uses) or a prompt string, to token ids",
)
async def tokenize(body: TokenizeChatRequest | TokenizePromptRequest, request: Request) -> TokenizeResponse:
    state = get_state(request)
    tokenizer = state.require_tokenizer()
    state.resolve_model(body.model)
    if isinstance(body, TokenizeChatRequest):
        ids = (await render_chat(body, state)).token_ids
    else:
        ids = await asyncio.to_thread(tokenizer.encode_with_specials, body.prompt)
    return TokenizeResponse(tokens=ids, count=len(ids), max_model_len=state.max_model_len)


@router.post(
    "/detokenize",
    response_model=DetokenizeResponse,
    responses=documented_errors(400, 401, 404, 413, 503),
    summary="Token ids to text (special tokens written as text)",
)
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    state = get_state(request)
    tokenizer = state.require_tokenizer()
    state.resolve_model(body.model)
    bad = next((t for t in body.tokens if not tokenizer.is_known(t)), None)
    if bad is not None:
        raise APIError(400, f"token id {bad} is not in the vocabulary", param="tokens")
    return DetokenizeResponse(prompt=tokenizer.decode_with_specials(body.tokens))


_PROBE_RESPONSES = {503: {"model": StatusResponse, "description": "Not alive / not ready"}}


@router.get("/health", response_model=StatusResponse, responses=_PROBE_RESPONSES, summary="Liveness")
async def health(request: Request):
    """200 while the process serves and the engine loop (once started) is alive."""
    state = get_state(request)
    if state.load_error is not None:
        return JSONResponse({"status": "failed", "detail": {"error": state.load_error}}, status_code=503)
    if state.engine is not None and not state.engine.is_alive:
        return JSONResponse({"status": "engine_dead"}, status_code=503)
    return StatusResponse(status="ok" if state.engine is not None else "loading")


@router.get("/ready", response_model=StatusResponse, responses=_PROBE_RESPONSES, summary="Readiness")
async def ready(request: Request):
    """200 once the weights are loaded, the engine is alive and the server is not draining."""
    state = get_state(request)
    if state.drain.draining:
        return JSONResponse({"status": "draining"}, status_code=503, headers={"Retry-After": "5"})
    if state.engine is None or not state.engine.is_alive:
        return JSONResponse({"status": "not_ready"}, status_code=503, headers={"Retry-After": "5"})
    return StatusResponse(status="ready")


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus text"}
    },
    summary="Prometheus metrics",
)
async def metrics(request: Request) -> Response:
    state = get_state(request)
    if state.engine is not None:
        state.metrics.update_engine(state.engine.stats())
    if state.response_store is not None:
        with contextlib.suppress(ResponseStoreUnavailable):  # a scrape never fails on the store
            stats = await state.response_store.stats()
            state.metrics.update_store(stats.entries, stats.bytes)
    body, content_type = state.metrics.render()
    return Response(content=body, media_type=content_type)


__all__ = ["ErrorResponse", "router"]
