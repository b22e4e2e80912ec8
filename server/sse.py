"""Server-Sent Events: FastAPI's framing (``fastapi.sse``) of our typed chunks.

The OpenAI-style streams are ``data: {json}`` frames ending with ``data: [DONE]``; an error after
the 200 status line went out is one ``data: {"error": {...}}`` frame before ``[DONE]``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable, Iterable

from fastapi.sse import EventSourceResponse, format_sse_event
from pydantic import BaseModel

from server.errors import APIError, error_body
from server.events import Event, Failed
from server.pipeline import Generation

logger = logging.getLogger("server.sse")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DONE = format_sse_event(data_str="[DONE]")
# JSON leaves U+0085, U+2028 and U+2029 raw in strings, and Python's str.splitlines (so
# httpx's aiter_lines, and clients built on it) breaks lines there, cutting a data line in
# two. Escaped, the JSON means the same and every line splitter reads one line.
_LINE_BREAKS_JSON_KEEPS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def _data(json_text: str) -> str:
    return json_text.translate(_LINE_BREAKS_JSON_KEEPS)


def sse_frame(model: BaseModel, event: str | None = None) -> bytes:
    """One frame; unset fields are left out (see ``server.wire``)."""
    return format_sse_event(data_str=_data(model.model_dump_json(exclude_unset=True)), event=event)


def sse_error(error: APIError) -> bytes:
    body = error_body(error.status, error.message, error.param, error.code)
    return format_sse_event(data_str=_data(json.dumps(body, ensure_ascii=False, separators=(",", ":"))))


async def data_stream(
    head: Iterable[BaseModel], generation: Generation, chunks_of: Callable[[Event], list[BaseModel]]
) -> AsyncIterator[bytes]:
    """``head`` chunks, then the chunks of each event, then ``[DONE]``; a failure is an error
    frame. A client that disconnects cancels this: the generation is closed (aborted) at once."""
    try:
        for chunk in head:
            yield sse_frame(chunk)
        async for event in generation.events():
            if isinstance(event, Failed):
                yield sse_error(event.error)
                break
            for chunk in chunks_of(event):
                yield sse_frame(chunk)
    except Exception as exc:  # a bug in an adapter: still an error event, never a cut stream
        logger.error("%s: streaming failed", generation.request_id, exc_info=exc)
        yield sse_error(APIError(500, f"Internal server error (request id {generation.request_id})."))
    finally:
        generation.close()
    yield DONE


def sse_response(frames: AsyncIterator[bytes], headers: dict[str, str] | None = None) -> EventSourceResponse:
    return EventSourceResponse(frames, headers={**SSE_HEADERS, **(headers or {})})
