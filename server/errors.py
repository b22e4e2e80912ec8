"""OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}`` with the right status."""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """Raised anywhere in a handler; turned into the OpenAI error body and status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: int | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.retry_after = retry_after


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {
        "error": {
            "message": message,
            "type": _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error"),
            "param": param,
            "code": code,
        }
    }


def error_response(
    status: int,
    message: str,
    *,
    param: str | None = None,
    code: str | None = None,
    retry_after: int | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    hdrs = dict(headers or {})
    if retry_after is not None:
        hdrs["Retry-After"] = str(retry_after)
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=hdrs)


def api_error_response(exc: APIError) -> JSONResponse:
    return error_response(
        exc.status, exc.message, param=exc.param, code=exc.code, retry_after=exc.retry_after
    )


def _loc_to_param(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path")]
    out = ""
    for p in parts:
        out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
    return out or None


def validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """Pydantic errors -> one readable message (first few problems) and the first param path."""
    if not errors:
        return "Invalid request body.", None
    lines = []
    for err in errors[:5]:
        param = _loc_to_param(tuple(err.get("loc", ())))
        msg = err.get("msg", "invalid value")
        if err.get("type") == "json_invalid":
            msg, param = "request body is not valid JSON", None
        elif param is None and err.get("type") in (
            "missing",
            "model_attributes_type",
            "dict_type",
            "model_type",
        ):
            msg = "the request body must be a JSON object, sent with Content-Type: application/json"
        lines.append(f"{param}: {msg}" if param else msg)
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    first = errors[0]
    param = None if first.get("type") == "json_invalid" else _loc_to_param(tuple(first.get("loc", ())))
    return "; ".join(lines) + more, param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return api_error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI says 422; OpenAI clients expect 400 for a malformed request.
        message, param = validation_message(json.loads(json.dumps(exc.errors(), default=str)))
        return error_response(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = f"Invalid URL ({request.method} {request.url.path})"
        elif exc.status_code == 405:
            message = f"Method {request.method} not allowed for {request.url.path}"
        else:
            message = str(exc.detail)
        return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))
