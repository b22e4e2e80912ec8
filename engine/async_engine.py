"""The engine loop in its own thread, with an asyncio face for the server.

The event loop never runs engine work: ``add_request`` validates (raising at once), puts
the request in an inbox and returns an async iterator. The engine thread drains the inbox
between steps, runs ``LLMEngine.step()``, and hands each step's outputs to their requests'
``asyncio.Queue``s, with one ``loop.call_soon_threadsafe`` per event loop and step. When there
is nothing to do the thread sleeps on a condition variable; adding or aborting a request wakes it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from model.config import ModelConfig

from .config import EngineConfig
from .llm_engine import LLMEngine
from .types import (
    EngineDeadError,
    EngineError,
    EngineFailure,
    EngineStats,
    FailureKind,
    InvalidRequestError,
    QueueFullError,
    RequestOutput,
    SamplingParams,
)

log = logging.getLogger(__name__)


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RequestOutput] = field(default_factory=asyncio.Queue)
    done: bool = False


def _put_all(items: list[tuple[_Stream, RequestOutput]]) -> None:
    for stream, out in items:
        stream.queue.put_nowait(out)


@dataclass
class _Add:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams


class AsyncEngine:
    def __init__(self, config_or_engine: EngineConfig | LLMEngine) -> None:
        if isinstance(config_or_engine, LLMEngine):
            self._engine: LLMEngine | None = config_or_engine
            self.config = config_or_engine.config
        else:
            self._engine = None
            self.config = config_or_engine
        self._cond = threading.Condition()
        self._inbox: list[_Add] = []
        self._aborts: list[str] = []
        self._streams: dict[str, _Stream] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._dead = False

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        """Start the engine thread, which loads the model (if not given) before its loop.
        Blocks until it has, and raises what the load raised. Call it from a worker thread at
        startup (e.g. ``await asyncio.to_thread(engine.start)``)."""
        if self._thread is not None:
            return
        built: concurrent.futures.Future[LLMEngine] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, args=(built,), name="engine-loop", daemon=True)
        self._thread.start()
        try:
            self._engine = built.result()
        except BaseException:
            self._thread = None
            raise

    def shutdown(self, timeout: float | None = 30.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        # Whatever is still open ends now.
        with self._cond:
            streams, self._streams = self._streams, {}
        failure = EngineFailure(FailureKind.SHUTDOWN, "the engine is shutting down")
        self._deliver([
            (stream, RequestOutput(request_id=rid, token_ids=[], finish_reason="abort", error=failure))
            for rid, stream in streams.items()
        ])  # fmt: skip

    @property
    def engine(self) -> LLMEngine:
        if self._engine is None:
            raise RuntimeError("AsyncEngine.start() has not been called")
        return self._engine

    @property
    def is_alive(self) -> bool:
        return (
            self._thread is not None and self._thread.is_alive() and not self._dead
            and not self._stopping and self.engine.alive
        )  # fmt: skip

    # -- requests --------------------------------------------------------------------------
    def add_request(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Validate and enqueue; raises PromptTooLongError, QueueFullError, EngineDeadError or
        InvalidRequestError at once. Must be called on the event loop that will iterate."""
        params = params if params is not None else SamplingParams()
        prompt_ids = [int(t) for t in prompt_ids]
        if not self.is_alive:
            raise EngineDeadError("the engine is not running")
        loop = asyncio.get_running_loop()
        with self._cond:
            if request_id in self._streams:
                raise InvalidRequestError(f"request id {request_id!r} is already in use")
            self.engine.validate_request(request_id, prompt_ids, params)
            if self.num_waiting >= self.max_waiting:
                raise QueueFullError(f"the waiting queue is full ({self.max_waiting} requests)")
            stream = _Stream(loop)
            self._streams[request_id] = stream
            self._inbox.append(_Add(request_id, prompt_ids, params))
            self._cond.notify_all()
        return self._iterate(request_id, stream)

    async def _iterate(self, request_id: str, stream: _Stream) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while not finished:
                out = await stream.queue.get()
                # Set before the yield: a consumer that stops at the last output (closing this
                # generator there) has had everything, and an abort would only wait on the lock.
                finished = out.finished
                yield out
        finally:
            if not finished:  # the consumer went away (client disconnect): free the blocks
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Thread-safe. The request's iterator then ends with finish_reason "abort"."""
        with self._cond:
            if request_id in self._streams:
                self._aborts.append(request_id)
                self._cond.notify_all()

    # -- introspection ---------------------------------------------------------------------
    def stats(self) -> EngineStats:
        s = self.engine.stats()
        s.num_waiting += len(self._inbox)
        s.alive = self.is_alive
        return s

    @property
    def num_waiting(self) -> int:
        return self.engine.num_waiting + len(self._inbox)

    @property
    def max_waiting(self) -> int:
        return self.config.max_waiting

    @property
    def model_config(self) -> ModelConfig:
        return self.engine.model_config

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def weights_bytes(self) -> int:
        return self.engine.weights_bytes

    @property
    def kv_cache_bytes(self) -> int:
        return self.engine.kv_cache_bytes

    @property
    def kv_cache_tokens(self) -> int:
        return self.engine.kv_cache_tokens

    # -- the engine thread -----------------------------------------------------------------
    def _deliver(self, batch: list[tuple[_Stream, RequestOutput]]) -> None:
        """Hand a step's outputs to their streams: one wake-up per event loop per step (not
        one per token), and each queue filled on its own loop's thread."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, RequestOutput]]] = {}
        for stream, out in batch:
            if stream.done:
                continue
            if out.finished:
                stream.done = True
            by_loop.setdefault(stream.loop, []).append((stream, out))
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):  # that event loop is closed: nobody listens
                loop.call_soon_threadsafe(_put_all, items)

    def _drain_inbox(self, engine: LLMEngine) -> list[RequestOutput]:
        """Under the lock: move new requests and aborts into the engine."""
        outputs: list[RequestOutput] = []
        adds, self._inbox = self._inbox, []
        aborts, self._aborts = self._aborts, []
        for add in adds:
            try:
                engine.add_request(add.request_id, add.prompt_ids, add.params)
            except EngineError as exc:  # e.g. the queue filled up since validation
                outputs.append(RequestOutput(request_id=add.request_id, token_ids=[], finish_reason="error",
                                             error=exc.failure))  # fmt: skip
        for rid in aborts:
            engine.abort(rid)
        return outputs

    def _publish(self, outputs: list[RequestOutput]) -> None:
        if not outputs:
            return
        batch: list[tuple[_Stream, RequestOutput]] = []
        with self._cond:
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is None:
                    continue
                if out.finished:
                    del self._streams[out.request_id]
                batch.append((stream, out))
            self._deliver(batch)

    def _run(self, built: concurrent.futures.Future[LLMEngine]) -> None:
        # The model is loaded on this thread too, so that it is the only one that ever ran
        # torch's parallel regions. GNU OpenMP keeps a pool of workers for each thread that
        # did, and once the pools hold more threads than there are CPUs it stops spin-waiting
        # between regions: each region then pays a futex wake-up (7 against 52 us per region,
        # measured on 2 cores; 2-3 ms of a 12 ms decode step).
        try:
            engine = self._engine if self._engine is not None else LLMEngine(self.config)
        except BaseException as exc:
            built.set_exception(exc)
            return
        built.set_result(engine)
        try:
            while True:
                with self._cond:
                    while not (self._stopping or self._inbox or self._aborts or engine.has_unfinished()):
                        self._cond.wait()
                    if self._stopping:
                        return
                    early = self._drain_inbox(engine)
                self._publish(early)
                self._publish(engine.step())
                if not engine.alive:
                    self._dead = True
                    return
        except BaseException as exc:  # a bug outside the model call: nothing is trustworthy now
            log.exception("engine loop crashed")
            self._dead = True
            with self._cond:
                message = f"engine loop crashed: {type(exc).__name__}: {exc}"
                outputs = engine.fail_all(message)
                failure = EngineFailure(FailureKind.ENGINE_DEAD, message)
                for rid in list(self._streams):
                    if all(o.request_id != rid for o in outputs):
                        outputs.append(RequestOutput(request_id=rid, token_ids=[], finish_reason="error",
                                                     error=failure))  # fmt: skip
            self._publish(outputs)
