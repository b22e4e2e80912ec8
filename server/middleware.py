"""One pure-ASGI middleware for what every request shares (pure ASGI: it never buffers a stream).

In order: request id (echoed as ``x-request-id`` on every response), auth (constant-time key
compare; probes and /metrics exempt), drain (503 + Retry-After for new work), body size
(413, the body is read here and replayed), JSON nesting depth (400, ``server.json_depth``), then the app, counted as in flight for the
drain, timed and counted in metrics; an unexpected exception becomes a logged 500.
"""

from __future__ import annotations

import hmac
import logging
import re
import time
import uuid
from collections.abc import Sequence

from starlette.datastructures import Headers, MutableHeaders
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import error_response
from server.json_depth import MAX_JSON_DEPTH, json_depth
from server.state import NOT_READY_RETRY_AFTER, ServerState

logger = logging.getLogger("server.access")
error_logger = logging.getLogger("server.error")

# Probes and the scrape endpoint: no key, not refused while draining, not counted in flight.
UNGUARDED_PATHS = frozenset({"/health", "/ready", "/metrics"})
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


def _key_matches(given: str, keys: list[str]) -> bool:
    given_bytes = given.encode()
    ok = False
    for key in keys:  # compare with every key, so the time says nothing about which matched
        ok |= hmac.compare_digest(given_bytes, key.encode())
    return ok


def _endpoint_label(scope: Scope, routes: Sequence[BaseRoute]) -> str:
    """The route template a request belongs to (bounded label values). A request refused
    here (401, 503, 413) never reached the router, so its route is looked up among
    ``routes``; a path none of them serves is "unmatched"."""
    route = scope.get("route")
    if route is None:
        route = next((r for r in routes if r.matches(scope)[0] is not Match.NONE), None)
    return getattr(route, "path", None) or "unmatched"


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, state: ServerState, routes: Sequence[BaseRoute] = ()) -> None:
        self.app = app
        self.state = state
        self.routes = routes  # the API's routes, to label requests refused before routing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started_at = time.perf_counter()
        headers = Headers(scope=scope)
        incoming = headers.get("x-request-id", "")
        request_id = incoming if _REQUEST_ID.fullmatch(incoming) else f"req-{uuid.uuid4().hex}"
        scope.setdefault("state", {})["request_id"] = request_id
        path = scope.get("path", "")
        guarded = path not in UNGUARDED_PATHS
        response_started = False
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal response_started, status
            if message["type"] == "http.response.start":
                response_started = True
                status = message["status"]
                MutableHeaders(scope=message)["x-request-id"] = request_id
            await send(message)

        settings = self.state.settings
        rejection = None
        if guarded and settings.api_keys:
            auth = headers.get("authorization", "")
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not _key_matches(token.strip(), settings.api_keys):
                rejection = error_response(
                    401,
                    "Missing or invalid API key: send `Authorization: Bearer <key>`.",
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
        if rejection is None and guarded and self.state.drain.draining:
            rejection = error_response(
                503, "The server is shutting down.", code="draining", retry_after=NOT_READY_RETRY_AFTER
            )
        body_receive = receive
        if rejection is None and scope.get("method") in ("POST", "PUT", "PATCH"):
            body, too_large = await self._read_body(headers, receive, settings.max_body_bytes)
            if too_large:
                rejection = error_response(
                    413, f"Request body exceeds {settings.max_body_bytes} bytes.", code="body_too_large"
                )
            elif _is_json(headers) and json_depth(body) > MAX_JSON_DEPTH:
                rejection = error_response(
                    400, f"The JSON body nests deeper than {MAX_JSON_DEPTH} levels.", code="json_too_deep"
                )
            else:
                body_receive = _replay(body, receive)

        if guarded:
            self.state.drain.request_started()
        try:
            if rejection is not None:
                await rejection(scope, receive, send_with_id)
            else:
                await self.app(scope, body_receive, send_with_id)
        except Exception:
            error_logger.exception("request %s %s %s failed", request_id, scope.get("method"), path)
            if response_started:
                raise  # the status line is out: all we can do is drop the connection
            await error_response(500, f"Internal server error (request id {request_id}).")(
                scope, receive, send_with_id
            )
        finally:
            if guarded:
                self.state.drain.request_finished()
            self.state.metrics.observe_request(_endpoint_label(scope, self.routes), status)
            logger.log(
                logging.INFO if guarded else logging.DEBUG,  # probes every few seconds: debug only
                "%s %s %s %d %.1fms",
                request_id,
                scope.get("method"),
                path,
                status,
                (time.perf_counter() - started_at) * 1000,
            )

    @staticmethod
    async def _read_body(headers: Headers, receive: Receive, limit: int) -> tuple[bytes, bool]:
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return b"", True
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return b"", True
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks), False


def _is_json(headers: Headers) -> bool:
    """FastAPI parses a body as JSON when no content type says otherwise."""
    content_type = headers.get("content-type", "application/json").split(";")[0].strip().lower()
    return content_type == "" or content_type == "application/json" or content_type.endswith("+json")


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: wait for the disconnect

    return replay
