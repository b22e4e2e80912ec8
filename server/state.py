"""What every handler needs: settings, engine, tokenizer, metrics, drain state (one per app)."""

from __future__ import annotations

import asyncio
import datetime
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from fastapi import Request

from engine.types import EngineClient
from harmony.tokenizer import HarmonyTokenizer
from server.errors import APIError
from server.guided import GrammarCompiler
from server.lifecycle import DrainController
from server.metrics import ServerMetrics
from server.reasoning_seal import ReasoningSealer
from server.response_store import ResponseStore
from server.settings import ServerSettings

NOT_READY_RETRY_AFTER = 5  # seconds


@dataclass
class ServerState:
    settings: ServerSettings
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    drain: DrainController = field(default_factory=DrainController)
    engine: EngineClient | None = None  # set once loaded
    tokenizer: HarmonyTokenizer | None = None
    owns_engine: bool = True  # built here (shut down here) vs handed in by a test
    load_error: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    on_fatal: Callable[[], None] | None = None  # set by the runner: stop the process (exit 1)
    response_store: ResponseStore | None = None  # opened by the lifespan
    sealer: ReasoningSealer = field(default_factory=lambda: ReasoningSealer(None))
    _compiler: GrammarCompiler | None = None  # built on the first constrained request (~1 s)
    _compiler_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def grammar_compiler(self) -> GrammarCompiler:
        async with self._compiler_lock:
            if self._compiler is None:
                self._compiler = await asyncio.to_thread(GrammarCompiler, self.require_tokenizer())
            return self._compiler

    @property
    def model_names(self) -> list[str]:
        return self.settings.model_names()

    @property
    def ready(self) -> bool:
        return self.engine is not None and self.tokenizer is not None and not self.drain.draining

    def require_engine(self) -> EngineClient:
        if self.drain.draining:
            raise APIError(
                503, "The server is shutting down.", code="draining", retry_after=NOT_READY_RETRY_AFTER
            )
        if self.engine is None or self.tokenizer is None:
            message = (
                "The model is still loading." if self.load_error is None else "The model failed to load."
            )
            raise APIError(503, message, code="not_ready", retry_after=NOT_READY_RETRY_AFTER)
        return self.engine

    def require_tokenizer(self) -> HarmonyTokenizer:
        if self.tokenizer is None:
            raise APIError(
                503, "The tokenizer is still loading.", code="not_ready", retry_after=NOT_READY_RETRY_AFTER
            )
        return self.tokenizer

    def require_response_store(self) -> ResponseStore:
        if self.response_store is None:
            raise APIError(
                503, "The response store is not open.", code="not_ready", retry_after=NOT_READY_RETRY_AFTER
            )
        return self.response_store

    def resolve_model(self, requested: str | None) -> str:
        names = self.model_names
        if requested is None or requested == "":
            return names[0]
        if requested not in names:
            raise APIError(
                404,
                f"The model `{requested}` does not exist. Served: {', '.join(names)}.",
                param="model",
                code="model_not_found",
            )
        return requested

    @property
    def max_model_len(self) -> int:
        return int(self.engine.max_model_len) if self.engine is not None else 0

    @staticmethod
    def prompt_date() -> str:
        """The `Current date` of the system message (UTC)."""
        return datetime.datetime.now(datetime.timezone.utc).date().isoformat()


def get_state(request: Request) -> ServerState:
    return request.app.state.server


def request_id_of(request: Request) -> str:
    return getattr(request.state, "request_id", "") or "req-unknown"
