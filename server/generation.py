"""One HTTP request's engine requests (``n`` choices, or several prompts), merged into one stream.

The session adds every engine request up front (so a full queue is a 429 before anything
streams), pumps their outputs into one queue, and on ``close()`` aborts whatever has not
finished: a client that went away, a stop string that matched, or a drain that timed out.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Protocol

from engine.types import (
    EngineDeadError,
    InvalidRequestError,
    PromptTooLongError,
    QueueFullError,
    RequestOutput,
    SamplingParams,
)
from server.errors import APIError
from server.lifecycle import DrainController
from server.metrics import ServerMetrics
from server.sse import sse_error

logger = logging.getLogger("server.generation")

QUEUE_FULL_RETRY_AFTER = 1  # seconds
_END = object()
_SHUTDOWN = object()
_DISCONNECT = object()


class ShuttingDown(Exception):
    """The drain timed out (or a second signal came): the request is aborted."""


class ClientGone(Exception):
    """The client closed the connection."""


class GenerationFailed(Exception):
    """The engine reported an error for a request (a real fault: 500)."""


class Choice(Protocol):
    """What a route keeps per choice: it takes outputs and may match a stop string."""

    stop: Any  # a StopStringFilter: ``stopped`` is set once a stop string matched

    def on_output(self, out: RequestOutput) -> Any: ...


def open_session(
    engine: Any,
    kind: str,
    drain: DrainController,
    metrics: ServerMetrics,
    requests: list[tuple[list[int], SamplingParams]],
    request_id: str,
) -> EngineSession:
    """Start one HTTP request's engine requests under a fresh response id ``{kind}-{hex}``:
    unique even when clients reuse an x-request-id, since it names the engine requests too."""
    session = EngineSession(engine, f"{kind}-{uuid.uuid4().hex}", drain, metrics)
    logger.debug("%s: %s", request_id, session.response_id)
    session.start(requests)
    return session


async def run_to_end(
    session: EngineSession,
    choices: Sequence[Choice],
    request_id: str,
    receive: Callable[[], Awaitable[dict]],
) -> None:
    """Non-streaming: feed every output to its choice until all finish (a choice whose stop
    string matched is aborted at once; a client that leaves aborts everything), then close
    the session; failures become the HTTP error they mean."""
    session.watch_disconnect(receive)
    try:
        while (item := await session.next_output()) is not None:
            index, out = item
            choices[index].on_output(out)
            if choices[index].stop.stopped is not None:
                session.finish_early(index)
    except ShuttingDown as exc:
        raise APIError(503, "The server is shutting down; the request was aborted.", code="draining") from exc
    except GenerationFailed as exc:
        logger.error("%s: %s", request_id, exc)
        raise APIError(500, f"Generation failed (request id {request_id}).") from exc
    except ClientGone as exc:
        logger.info("%s: client disconnected; generation aborted", request_id)
        raise APIError(499, "Client closed the request.", code="client_closed") from exc
    finally:
        session.close()


def stream_error_event(exc: Exception, request_id: str) -> bytes:
    """The SSE error event that ends a stream which failed after its 200 status line went out
    (always followed by ``[DONE]``: a stream is never cut silently)."""
    if isinstance(exc, ShuttingDown):
        return sse_error(503, "The server is shutting down; the request was aborted.", "draining")
    if isinstance(exc, APIError):
        return sse_error(exc.status, exc.message, exc.code)
    if isinstance(exc, GenerationFailed):
        logger.error("%s: %s", request_id, exc)
        return sse_error(500, f"Generation failed (request id {request_id}).")
    logger.error("%s: streaming failed", request_id, exc_info=exc)  # a bug
    return sse_error(500, f"Internal server error (request id {request_id}).")


def record_engine_metrics(metrics: ServerMetrics, out: RequestOutput) -> None:
    m = out.metrics
    if m is None:
        return
    if m.queue_time is not None:
        metrics.observe_queue_time(m.queue_time)
    if m.time_to_first_token is not None:
        metrics.observe_ttft(m.time_to_first_token)
    if m.finished_time is not None:
        metrics.observe_e2e(m.finished_time - m.arrival_time)
    for earlier, later in zip(m.token_times, m.token_times[1:], strict=False):
        metrics.observe_inter_token(later - earlier)


class EngineSession:
    def __init__(self, engine: Any, request_id: str, drain: DrainController, metrics: ServerMetrics):
        self._engine = engine
        self._request_id = request_id
        self._drain = drain
        self._metrics = metrics
        self.request_ids: list[str] = []
        self._iterators: list[AsyncIterator[RequestOutput]] = []
        self._done: set[int] = set()
        self._queue: asyncio.Queue = asyncio.Queue()
        self._tasks: list[asyncio.Task] = []
        self._abort_key: int | None = None
        self._closed = False

    @property
    def response_id(self) -> str:
        return self._request_id

    # -- setup ------------------------------------------------------------------------------------

    def start(self, requests: list[tuple[list[int], SamplingParams]]) -> None:
        """Add every engine request; on failure abort the ones added and raise an APIError."""
        for i, (prompt_ids, params) in enumerate(requests):
            rid = self._request_id if len(requests) == 1 else f"{self._request_id}-{i}"
            try:
                iterator = self._engine.add_request(rid, prompt_ids, params)
            except PromptTooLongError as exc:
                self.close()
                raise APIError(400, str(exc), param="messages", code="context_length_exceeded") from exc
            except InvalidRequestError as exc:
                self.close()
                raise APIError(400, str(exc)) from exc
            except QueueFullError as exc:
                self.close()
                raise APIError(
                    429,
                    f"The server's waiting queue is full ({exc}); retry shortly.",
                    code="queue_full",
                    retry_after=QUEUE_FULL_RETRY_AFTER,
                ) from exc
            except EngineDeadError as exc:
                self.close()
                raise APIError(
                    503, f"The engine is not running: {exc}", code="engine_dead", retry_after=5
                ) from exc
            self.request_ids.append(rid)
            self._iterators.append(iterator)
        self._abort_key = self._drain.register_abort(lambda: self._queue.put_nowait(_SHUTDOWN))
        self._tasks = [asyncio.create_task(self._pump(i, it)) for i, it in enumerate(self._iterators)]

    def watch_disconnect(self, receive: Callable[[], Awaitable[dict]]) -> None:
        """For non-streaming requests: a client that leaves aborts the generation at once."""

        async def listen() -> None:
            while True:
                message = await receive()
                if message.get("type") == "http.disconnect":
                    self._queue.put_nowait(_DISCONNECT)
                    return

        self._tasks.append(asyncio.create_task(listen()))

    async def _pump(self, index: int, iterator: AsyncIterator[RequestOutput]) -> None:
        try:
            async for out in iterator:
                self._queue.put_nowait((index, out))
                if out.finished:
                    return
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # surfaced to the consumer, which answers 500
            self._queue.put_nowait((index, exc))
            return
        self._queue.put_nowait((index, _END))

    # -- consuming -------------------------------------------------------------------------------

    async def next_output(self) -> tuple[int, RequestOutput] | None:
        """The next output of any unfinished request; None once all are finished."""
        while len(self._done) < len(self.request_ids):
            item = await self._queue.get()
            if item is _SHUTDOWN:
                raise ShuttingDown("the server is shutting down")
            if item is _DISCONNECT:
                raise ClientGone()
            index, out = item
            if index in self._done:
                continue
            if isinstance(out, Exception):
                self._done.add(index)
                raise GenerationFailed(f"engine error: {out!r}") from out
            if out is _END:
                self._done.add(index)
                raise GenerationFailed("the engine ended a request without a finish reason")
            if out.finish_reason == "error":
                self._done.add(index)
                if (out.error or "").startswith(QueueFullError.__name__):  # filled up since add_request
                    raise APIError(
                        429, "The server's waiting queue is full; retry shortly.", code="queue_full",
                        retry_after=QUEUE_FULL_RETRY_AFTER,
                    )  # fmt: skip
                raise GenerationFailed(out.error or "engine error")
            if out.finish_reason == "abort":  # not ours (ours are ignored above): the engine stopped
                self._done.add(index)
                raise ShuttingDown(out.error or "the engine aborted the request")
            if out.finished:
                self._done.add(index)
                record_engine_metrics(self._metrics, out)
            return index, out
        return None

    def finish_early(self, index: int) -> None:
        """Stop one request now (a stop string matched): abort it in the engine."""
        if index not in self._done:
            self._done.add(index)
            self._abort(self.request_ids[index])

    def _abort(self, rid: str) -> None:
        try:
            self._engine.abort(rid)
        except Exception:
            logger.exception("abort of %s failed", rid)

    def close(self) -> None:
        """Abort unfinished requests and stop listening. Synchronous: safe in a cancelled task."""
        if self._closed:
            return
        self._closed = True
        for i, rid in enumerate(self.request_ids):
            if i not in self._done:
                self._done.add(i)
                self._abort(rid)
        for task in self._tasks:
            task.cancel()
        if self._abort_key is not None:
            self._drain.unregister_abort(self._abort_key)
