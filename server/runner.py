"""Runs the app under uvicorn with our own signal handling (uvicorn's would fight the drain).

SIGTERM/SIGINT once: drain (``/ready`` 503 at once, new requests 503, in-flight requests run
up to ``--drain-timeout``), then exit 0. Twice: abort what is left now (each client gets an
error event), then exit 0. A failed model load exits 1; a signal during the load exits 0
at once (the load runs in a daemon thread, see ``server.app.in_daemon_thread``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

import uvicorn

from server.app import EngineFactory, build_engine, create_app
from server.settings import ServerSettings
from server.state import ServerState

logger = logging.getLogger("server")


class _Server(uvicorn.Server):
    """uvicorn without its signal capture (it would re-raise SIGTERM after our clean exit)."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


async def serve(settings: ServerSettings, engine_factory: EngineFactory = build_engine) -> int:
    """Serve until drained. ``engine_factory`` builds the engine in the background (tests
    pass one that injects scripted sampling)."""
    app = create_app(settings, engine_factory=engine_factory)
    state: ServerState = app.state.server
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,  # our logging setup (server.__main__) applies
        access_log=False,  # the middleware logs each request with its id
        lifespan="on",
        timeout_graceful_shutdown=5,
        timeout_keep_alive=5,
    )
    server = _Server(config)
    exit_code = 0
    drain_task: asyncio.Task | None = None

    def fatal() -> None:
        nonlocal exit_code
        exit_code = 1
        server.should_exit = True

    async def drain_then_exit() -> None:
        try:
            await state.drain.drain(settings.drain_timeout)
        finally:
            server.should_exit = True

    def on_signal(signum: int) -> None:
        nonlocal drain_task
        name = signal.Signals(signum).name
        if drain_task is None:
            logger.info(
                "%s: draining (up to %.1fs); send it again to abort in-flight requests",
                name,
                settings.drain_timeout,
            )
            drain_task = asyncio.get_running_loop().create_task(drain_then_exit())
        else:
            logger.warning("%s again: aborting in-flight requests", name)
            state.drain.force()

    state.on_fatal = fatal
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        await server.serve()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    if not server.started and exit_code == 0:
        exit_code = 1  # could not bind, or startup failed
    logger.info("exit %d", exit_code)
    return exit_code


def run_server(settings: ServerSettings) -> int:
    return asyncio.run(serve(settings))
