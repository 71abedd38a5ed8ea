"""How answers and errors look on the wire: compact JSON, ``{"error": "one line"}`` with a 4xx status, and a
500 that names a log line instead of showing a stack trace."""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import wire

log = logging.getLogger("rcmed.server")


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def one_line(exc: BaseException | str, limit: int = 400) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    body = json.dumps(data, separators=(",", ":"), allow_nan=False).encode()
    return Response(body, status_code=status, media_type="application/json", headers=headers)


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return json_response({"error": message}, status, headers)


def add_exception_handlers(app: FastAPI) -> None:
    """Every failure becomes one line of JSON; the engine's ValueErrors are the client's mistakes (422)."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> Response:
        return error_response(exc.status, exc.message, exc.headers)

    @app.exception_handler(wire.WireError)
    async def _wire_error(request: Request, exc: wire.WireError) -> Response:
        return error_response(400, one_line(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return error_response(exc.status_code, one_line(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        parts = []
        for e in exc.errors()[:4]:
            loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "request"
            parts.append(f"{loc}: {e.get('msg', 'invalid')}")
        return error_response(422, one_line("invalid request: " + "; ".join(parts)))

    @app.exception_handler(ValueError)
    async def _value_error(request: Request, exc: ValueError) -> Response:
        # EngineError, PromptError, ImageReadError...: the engine's own one-line messages.
        return error_response(422, one_line(exc))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> Response:
        ref = uuid.uuid4().hex[:8]
        log.error("internal error (ref %s) on %s %s", ref, request.method, request.url.path, exc_info=exc)
        return error_response(500, f"internal server error (server log ref {ref})")
