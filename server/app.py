"""The FastAPI application: ``create_app(settings, engine=None)``.

Without an engine the app builds one in the background after the socket is open (so
``/health`` answers while weights load and ``/ready`` says 503 until they are in); with one
(tests) it uses it as is. The engine runs in its own thread: nothing here blocks the loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import FastAPI

from engine.types import EngineClient
from harmony.tokenizer import load_tokenizer
from server.chat import router as chat_router
from server.completions import router as completions_router
from server.errors import install_error_handlers
from server.middleware import RequestContextMiddleware
from server.reasoning_seal import ReasoningSealer
from server.response_store import open_response_store
from server.responses import router as responses_router
from server.routes import router as misc_router
from server.settings import ServerSettings, engine_config
from server.state import ServerState
from server.wire import STREAM_CHUNKS

logger = logging.getLogger("server")
T = TypeVar("T")


def _gib(n: int | None) -> str:
    return "?" if n is None else f"{n / 2**30:.3f} GiB"


def build_engine(settings: ServerSettings) -> EngineClient:
    """Create and start the engine (blocking: loads the weights). Runs in a worker thread."""
    from engine.async_engine import AsyncEngine

    if settings.model is None:
        from engine.default_model import ensure_default_checkpoint

        model_dir = str(ensure_default_checkpoint(settings.cache_dir))
    else:
        model_dir = settings.model
    config = engine_config(settings, model_dir)
    logger.info("loading model %s (dtype %s, device %s)", model_dir, config.dtype, settings.device)
    engine = AsyncEngine(config)
    engine.start()
    return engine


def log_startup(state: ServerState) -> None:
    engine = state.engine
    logger.info(
        "model %s served as %s: weights %s, KV cache %s = %s tokens of context in total, "
        "max_model_len %s, up to %d concurrent sequences",
        state.settings.model
        or "<embedded default: gpt-oss-tiny, a demonstration model trained on synthetic conversations>",
        ", ".join(state.model_names),
        _gib(getattr(engine, "weights_bytes", None)),
        _gib(getattr(engine, "kv_cache_bytes", None)),
        getattr(engine, "kv_cache_tokens", "?"),
        getattr(engine, "max_model_len", "?"),
        state.settings.max_num_seqs,
    )


async def in_daemon_thread(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in a daemon thread. Unlike ``asyncio.to_thread`` (the default executor,
    which ``asyncio.run`` joins on the way out), a load that never returns (weights on a hung
    network mount) cannot keep the process alive after SIGTERM; if the awaiting task is
    cancelled, the result is dropped."""
    future: concurrent.futures.Future[T] = concurrent.futures.Future()

    def run() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            result = fn(*args)
        except BaseException as exc:  # handed to the awaiting task
            future.set_exception(exc)
        else:
            future.set_result(result)

    threading.Thread(target=run, name=f"load-{getattr(fn, '__name__', 'task')}", daemon=True).start()
    return await asyncio.wrap_future(future)


EngineFactory = Callable[[ServerSettings], EngineClient]


async def _load(state: ServerState, given_engine: EngineClient | None, engine_factory: EngineFactory) -> None:
    try:
        state.tokenizer = state.tokenizer or await in_daemon_thread(load_tokenizer)
        if given_engine is None:
            engine = await in_daemon_thread(engine_factory, state.settings)
        else:
            engine = given_engine
            if not engine.is_alive:
                await asyncio.to_thread(engine.start)
        state.engine = engine  # only now do /ready and the generation routes accept work
        log_startup(state)
        logger.info("ready on http://%s:%d", state.settings.host, state.settings.port)
    except Exception as exc:
        state.load_error = f"{type(exc).__name__}: {exc}"
        logger.exception("startup failed")
        if state.on_fatal is not None:
            state.on_fatal()


def _honest_openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI documents a 422 on every route; we answer 400 (with the error body) instead."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        for path in schema.get("paths", {}).values():
            for operation in path.values():
                operation.get("responses", {}).pop("422", None)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            components.pop(name, None)
        for chunk in STREAM_CHUNKS:  # named by the SSE responses (x-sse-data)
            chunk_schema = chunk.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(chunk_schema.pop("$defs", {}))
            components[chunk.__name__] = chunk_schema
        app.openapi_schema = schema
    return app.openapi_schema


def create_app(
    settings: ServerSettings, engine: EngineClient | None = None, engine_factory: EngineFactory = build_engine
) -> FastAPI:
    """The app. ``engine``: one to serve as is (in-process tests); otherwise ``engine_factory``
    builds it in the background (tests inject scripted sampling there)."""
    state = ServerState(
        settings=settings,
        engine=None,
        owns_engine=engine is None,
        sealer=ReasoningSealer(settings.reasoning_encryption_key),
    )
    pending_engine = engine

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        state.response_store = open_response_store(
            settings.response_store,
            max_bytes=settings.response_store_max_bytes,
            ttl_seconds=settings.response_store_ttl,
        )
        load_task = asyncio.create_task(_load(state, pending_engine, engine_factory))
        app.state.load_task = load_task
        try:
            yield
        finally:
            await state.response_store.close()
            load_task.cancel()
            with contextlib.suppress(BaseException):
                await load_task
            if state.engine is not None and state.owns_engine:
                await asyncio.to_thread(state.engine.shutdown)
                logger.info("engine stopped")

    app = FastAPI(
        title="gptoss-server",
        version="0.1.0",
        description="OpenAI-compatible API for gpt-oss models. Errors are "
        '`{"error": {"message", "type", "param", "code"}}`.',
        lifespan=lifespan,
    )
    app.state.server = state
    app.openapi = lambda: _honest_openapi(app)  # type: ignore[method-assign]
    install_error_handlers(app)
    routers = (chat_router, completions_router, responses_router, misc_router)
    for router in routers:
        app.include_router(router)
    routes = [route for router in routers for route in router.routes]
    app.add_middleware(RequestContextMiddleware, state=state, routes=routes)
    return app
