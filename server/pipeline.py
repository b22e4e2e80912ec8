"""One HTTP request's generation, whatever the API: its engine requests, their events, their end.

``open_generation`` adds every engine request up front (``n`` choices, or several prompts), so
a full queue or a prompt that does not fit is an HTTP error before anything streams. Then
``Generation.events()`` turns the engine's outputs, through one assembler per choice, into the
API-neutral events of ``server.events``, and ends with ``Usage``, or with one ``Failed``
whatever went wrong (the drain timed out, the engine failed a step, ...): a stream is never
cut. ``collect`` is the non-streaming form (a client that leaves aborts the generation; a
failure raises the ``APIError``). Closing the generation aborts whatever has not finished:
a client that went away, a stop string that matched, a drain that timed out.

``api_error`` is the only mapping of failures to what the client is told.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from engine.types import (
    EngineClient,
    EngineError,
    EngineFailure,
    FailureKind,
    RequestOutput,
    SamplingParams,
)
from server.errors import APIError
from server.events import ChoiceEvent, Event, Failed, Finished, Usage
from server.lifecycle import DrainController
from server.metrics import ServerMetrics
from server.state import ServerState

logger = logging.getLogger("server.pipeline")
text_logger = logging.getLogger("server.requests")  # prompt/completion text, only with --log-requests

QUEUE_FULL_RETRY_AFTER = 1  # seconds
ENGINE_DEAD_RETRY_AFTER = 5
CLIENT_CLOSED = 499  # nginx's code; nobody reads it, but the access log and metrics do

_SHUTDOWN = EngineFailure(FailureKind.SHUTDOWN, "the server is shutting down")
_DISCONNECT = object()


@dataclass(frozen=True)
class EngineRequest:
    prompt_ids: list[int]
    params: SamplingParams
    prompt_index: int = 0  # requests of one prompt (n choices) count its tokens once in usage


class Assembler(Protocol):
    """Turns one choice's engine outputs into events (``server.harmony_output``, ``server.text_output``)."""

    reasoning_tokens: int

    @property
    def stopped(self) -> bool: ...

    def feed(self, out: RequestOutput) -> list[ChoiceEvent]: ...

    def summary(self) -> str: ...


def api_error(failure: EngineFailure, request_id: str, prompt_param: str | None = None) -> APIError:
    """What a client is told about a failure, before the first byte (status) or after it
    (error event): the one place that decides."""
    kind = failure.kind
    if kind is FailureKind.PROMPT_TOO_LONG:
        return APIError(400, failure.message, param=prompt_param, code="context_length_exceeded")
    if kind is FailureKind.INVALID:
        return APIError(400, failure.message)
    if kind is FailureKind.QUEUE_FULL:
        return APIError(
            429,
            f"The server's waiting queue is full ({failure.message}); retry shortly.",
            code="queue_full",
            retry_after=QUEUE_FULL_RETRY_AFTER,
        )
    if kind is FailureKind.ENGINE_DEAD:
        logger.error("%s: %s", request_id, failure.message)
        return APIError(
            503,
            f"The engine is not running: {failure.message}",
            code="engine_dead",
            retry_after=ENGINE_DEAD_RETRY_AFTER,
        )
    if kind is FailureKind.SHUTDOWN:
        return APIError(503, "The server is shutting down; the request was aborted.", code="draining")
    logger.error("%s: %s", request_id, failure.message)  # a step failed: a real fault
    return APIError(500, f"Generation failed (request id {request_id}).")


class _Ended(Exception):
    """Ends the event stream with this error."""

    def __init__(self, error: APIError) -> None:
        super().__init__(error.message)
        self.error = error


class Generation:
    def __init__(
        self,
        engine: EngineClient,
        drain: DrainController,
        metrics: ServerMetrics,
        *,
        kind: str,
        request_id: str,
        prompt_param: str | None,
        log_text: bool,
    ) -> None:
        # Unique even when clients reuse an x-request-id, since it names the engine requests too.
        self.response_id = f"{kind}{uuid.uuid4().hex}"
        self.request_id = request_id
        self._engine = engine
        self._drain = drain
        self._metrics = metrics
        self._prompt_param = prompt_param
        self._log_text = log_text
        self._requests: list[EngineRequest] = []
        self._assemblers: Sequence[Assembler] = ()
        self._engine_ids: list[str] = []
        self._last: list[RequestOutput | None] = []
        self._done: set[int] = set()
        self._queue: asyncio.Queue = asyncio.Queue()
        self._tasks: list[asyncio.Task] = []
        self._abort_key: int | None = None
        self._closed = False

    # -- setup -----------------------------------------------------------------------------------

    def start(self, requests: Sequence[EngineRequest], assemblers: Sequence[Assembler]) -> None:
        """Add every engine request; on a refusal abort the ones added and raise its APIError."""
        self._requests, self._assemblers = list(requests), assemblers
        self._last = [None] * len(self._requests)
        iterators = []
        for i, request in enumerate(self._requests):
            rid = self.response_id if len(self._requests) == 1 else f"{self.response_id}-{i}"
            try:
                iterators.append(self._engine.add_request(rid, request.prompt_ids, request.params))
            except EngineError as exc:
                self.close()
                raise api_error(exc.failure, self.request_id, self._prompt_param) from exc
            self._engine_ids.append(rid)
        self._abort_key = self._drain.register_abort(lambda: self._queue.put_nowait((-1, _SHUTDOWN)))
        self._tasks = [asyncio.create_task(self._pump(i, it)) for i, it in enumerate(iterators)]

    async def _pump(self, index: int, iterator: AsyncIterator[RequestOutput]) -> None:
        try:
            async for out in iterator:
                self._queue.put_nowait((index, out))
                if out.finished:
                    return
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug in the engine's face: the consumer answers 500
            logger.error("%s: engine output failed", self.request_id, exc_info=exc)
            self._queue.put_nowait((index, EngineFailure(FailureKind.STEP_FAILED, f"engine error: {exc!r}")))
            return
        self._queue.put_nowait(
            (
                index,
                EngineFailure(FailureKind.STEP_FAILED, "the engine ended a request without a finish reason"),
            )
        )

    # -- consuming -------------------------------------------------------------------------------

    async def events(self) -> AsyncIterator[Event]:
        """Every event of every choice, then ``Usage``; or, from any failure on, one ``Failed``."""
        try:
            while len(self._done) < len(self._requests):
                for event in self._choice_events(*(await self._queue.get())):
                    yield event
            yield self.usage()
        except _Ended as ended:
            yield Failed(ended.error)
        except Exception as exc:  # a bug: still an error the client sees, never a cut stream
            logger.error("%s: generation failed", self.request_id, exc_info=exc)
            yield Failed(APIError(500, f"Internal server error (request id {self.request_id})."))
        finally:
            self.close()

    async def collect(self, receive: Callable[[], Awaitable[dict]]) -> list[Event]:
        """Non-streaming: every event up to ``Usage``; a failure raises its APIError."""
        self._watch_disconnect(receive)
        events = [event async for event in self.events()]
        if isinstance(events[-1], Failed):
            raise events[-1].error
        return events

    def _choice_events(self, index: int, item: object) -> list[ChoiceEvent]:
        if item is _DISCONNECT:
            logger.info("%s: client disconnected; generation aborted", self.request_id)
            raise _Ended(APIError(CLIENT_CLOSED, "Client closed the request.", code="client_closed"))
        if isinstance(item, EngineFailure):
            raise _Ended(api_error(item, self.request_id, self._prompt_param))
        assert isinstance(item, RequestOutput)
        if index in self._done:
            return []  # after a stop string matched, or our own abort
        if item.finish_reason in ("error", "abort"):  # an abort we did not ask for: the engine stopped
            raise _Ended(api_error(item.error or _SHUTDOWN, self.request_id, self._prompt_param))
        self._last[index] = item
        assembler = self._assemblers[index]
        events = assembler.feed(item)
        if assembler.stopped:
            self._finish_early(index)
        elif item.finished:
            self._done.add(index)
            if item.metrics is not None:
                self._metrics.observe_finished(item.metrics)
        assert index not in self._done or isinstance(events[-1], Finished)
        return events

    def usage(self) -> Usage:
        outs = [(r, out) for r, out in zip(self._requests, self._last, strict=True) if out is not None]
        first: dict[int, RequestOutput] = {}
        for request, out in outs:
            first.setdefault(request.prompt_index, out)  # each prompt's tokens once
        return Usage(
            prompt_tokens=sum(o.num_prompt_tokens for o in first.values()),
            cached_tokens=sum(o.num_cached_tokens for o in first.values()),
            completion_tokens=sum(o.num_output_tokens for _, o in outs),
            reasoning_tokens=sum(a.reasoning_tokens for a in self._assemblers),
        )

    # -- the end ---------------------------------------------------------------------------------

    def _watch_disconnect(self, receive: Callable[[], Awaitable[dict]]) -> None:
        async def listen() -> None:
            while (await receive()).get("type") != "http.disconnect":
                pass
            self._queue.put_nowait((-1, _DISCONNECT))

        self._tasks.append(asyncio.create_task(listen()))

    def _finish_early(self, index: int) -> None:
        """Stop one request now (a stop string matched): abort it in the engine."""
        if index not in self._done:
            self._done.add(index)
            self._abort(self._engine_ids[index])

    def _abort(self, engine_id: str) -> None:
        try:
            self._engine.abort(engine_id)
        except Exception:
            logger.exception("abort of %s failed", engine_id)

    def close(self) -> None:
        """Abort unfinished requests, stop listening, account. Synchronous: safe in a cancelled task."""
        if self._closed:
            return
        self._closed = True
        for i, engine_id in enumerate(self._engine_ids):
            if i not in self._done:
                self._done.add(i)
                self._abort(engine_id)
        for task in self._tasks:
            task.cancel()
        if self._abort_key is not None:
            self._drain.unregister_abort(self._abort_key)
        if self._engine_ids:
            self._account()

    def _account(self) -> None:
        counted: set[int] = set()
        for request, out, assembler in zip(self._requests, self._last, self._assemblers, strict=True):
            prompt = 0
            if out is not None and request.prompt_index not in counted:
                counted.add(request.prompt_index)
                prompt = out.num_prompt_tokens
            self._metrics.add_tokens(prompt, out.num_output_tokens if out else 0, assembler.reasoning_tokens)
        for i, assembler in enumerate(self._assemblers):
            problems = getattr(assembler, "problems", None)
            if problems:
                logger.debug("%s choice %d: %d Harmony parse problem(s)", self.request_id, i, len(problems))
            if self._log_text:
                text_logger.info("%s choice %d: %s", self.request_id, i, assembler.summary())


def open_generation(
    state: ServerState,
    request_id: str,
    requests: Sequence[EngineRequest],
    assemblers: Sequence[Assembler],
    *,
    kind: str,
    prompt_param: str | None,
) -> Generation:
    """Start one HTTP request's engine requests under a fresh response id ``{kind}-{hex}``
    (raises the APIError of a refusal: 503 while loading or draining, 429, 400)."""
    engine = state.require_engine()
    generation = Generation(
        engine,
        state.drain,
        state.metrics,
        kind=kind,
        request_id=request_id,
        prompt_param=prompt_param,
        log_text=state.settings.log_requests,
    )
    logger.debug("%s: %s", request_id, generation.response_id)
    generation.start(requests, assemblers)
    return generation
