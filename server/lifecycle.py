"""Graceful drain: what SIGTERM does to requests in flight.

The middleware counts HTTP requests in flight (a streaming response counts until its last
byte); each generation registers a callback that aborts it with an error the client sees.
``drain()`` flips readiness, waits for the count to reach zero (up to the timeout, or until
``force()``), then aborts what is left and waits briefly for those streams to send their
error event and end.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable

logger = logging.getLogger("server.lifecycle")

# How long aborted requests get to write their error event before the server closes.
ABORT_GRACE_SECONDS = 5.0


class DrainController:
    def __init__(self) -> None:
        self.draining = False
        self.inflight = 0
        self._abort_callbacks: dict[int, Callable[[], None]] = {}
        self._ids = itertools.count()
        self._idle: asyncio.Event | None = None
        self._forced: asyncio.Event | None = None

    # -- bookkeeping (event loop thread only) ---------------------------------------------------

    def _events(self) -> tuple[asyncio.Event, asyncio.Event]:
        if self._idle is None or self._forced is None:
            self._idle, self._forced = asyncio.Event(), asyncio.Event()
            if self.inflight == 0:
                self._idle.set()
        return self._idle, self._forced

    def request_started(self) -> None:
        self.inflight += 1
        self._events()[0].clear()

    def request_finished(self) -> None:
        self.inflight -= 1
        if self.inflight <= 0:
            self.inflight = 0
            self._events()[0].set()

    def register_abort(self, callback: Callable[[], None]) -> int:
        key = next(self._ids)
        self._abort_callbacks[key] = callback
        return key

    def unregister_abort(self, key: int) -> None:
        self._abort_callbacks.pop(key, None)

    # -- the drain --------------------------------------------------------------------------------

    def force(self) -> None:
        """A second signal: stop waiting, abort what is left now."""
        self._events()[1].set()

    async def _wait_idle(self, timeout: float, honour_force: bool) -> bool:
        idle, forced = self._events()
        waiters = [asyncio.ensure_future(idle.wait())]
        if honour_force:
            waiters.append(asyncio.ensure_future(forced.wait()))
        try:
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()
        return idle.is_set()

    def abort_all(self) -> int:
        callbacks = list(self._abort_callbacks.values())
        self._abort_callbacks.clear()
        for callback in callbacks:
            try:
                callback()
            except Exception:  # one broken request must not stop the others' abort
                logger.exception("abort callback failed")
        return len(callbacks)

    async def drain(self, timeout: float) -> None:
        self.draining = True
        logger.info("draining: %d request(s) in flight, up to %.1fs", self.inflight, timeout)
        if await self._wait_idle(timeout, honour_force=True):
            logger.info("drained: no request in flight")
            return
        aborted = self.abort_all()
        logger.warning("drain timeout or second signal: aborted %d generation(s)", aborted)
        if not await self._wait_idle(ABORT_GRACE_SECONDS, honour_force=False):
            logger.warning("%d request(s) still open after abort; closing anyway", self.inflight)
