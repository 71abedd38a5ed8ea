"""Request bodies on their way in (an ASGI middleware around the app).

Every body (JSON included) is bounded by the upload limit, declared or streamed (413), and must arrive
within ``body_timeout_s`` of the server starting to read it (408, and the connection is closed): a client
that sends its headers and then stalls or trickles its body would otherwise hold its place, in the decode
pool or in memory, for ever. A JSON body over ``SMALL_BODY`` (a class registration's mask) is read whole in
a place of the decode pool, as an upload is, so the bodies held at once are those of the memory bound.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from .errors import ApiError, error_response, one_line
from .models import API
from .pools import Pool

SMALL_BODY = 1 << 20  # a JSON body up to this (every segment request) is read at once, outside the pool
UPLOAD = ("POST", f"/{API}/images")  # takes its own place in the pool before reading (routes/images.py)


def declared_length(scope: dict) -> int | None:
    """The Content-Length header; None when absent (chunked) or not a number (the app answers 400)."""
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None


def reads_in_pool(scope: dict, declared: int | None) -> bool:
    """A large or unannounced JSON body: read in a place of the decode pool."""
    if (scope["method"], scope["path"]) == UPLOAD or scope["method"] in ("GET", "HEAD", "DELETE", "OPTIONS"):
        return False
    if declared is None:
        return any(name == b"transfer-encoding" for name, _ in scope.get("headers", ()))
    return declared > SMALL_BODY


class BoundedReceive:
    """``receive`` within the size limit and, from its first call until the body has arrived, the timeout."""

    def __init__(self, receive: Callable, limit: int, timeout_s: float) -> None:
        self.receive, self.limit, self.timeout_s = receive, limit, timeout_s
        self.received = 0
        self.deadline: float | None = None
        self.complete = False

    async def __call__(self) -> dict:
        if self.complete:  # after the body: disconnect notices, never timed
            return await self.receive()
        if self.deadline is None:
            self.deadline = time.monotonic() + self.timeout_s
        try:
            msg = await asyncio.wait_for(self.receive(), max(0.0, self.deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise StarletteHTTPException(408, f"the request body did not arrive within {self.timeout_s:g} s "
                                              f"({self.received} bytes came); send it again",
                                         headers={"Connection": "close"}) from None
        if msg["type"] == "http.request":
            self.received += len(msg.get("body", b""))
            if self.received > self.limit:
                raise StarletteHTTPException(413, f"the request body is over this server's limit of "
                                                  f"{self.limit} bytes")
            self.complete = not msg.get("more_body", False)
        return msg

    async def read_all(self) -> bytes:
        chunks = []
        while True:
            msg = await self()
            if msg["type"] == "http.disconnect":
                raise ClientDisconnect()
            chunks.append(msg.get("body", b""))
            if not msg.get("more_body", False):
                return b"".join(chunks)


def replay(body: bytes, receive: Callable) -> Callable:
    """A ``receive`` that gives ``body`` (already read) once, then what the connection says."""
    sent = False

    async def again() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return again


class BodyLimit:
    def __init__(self, app: Any, limit: int, timeout_s: float = 120.0, pool: Pool | None = None) -> None:
        self.app = app
        self.limit = limit
        self.timeout_s = timeout_s
        self.pool = pool  # the decode pool: large JSON bodies are read in one of its places

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = declared_length(scope)
        if declared is not None and declared > self.limit:
            message = f"the request body is over this server's limit of {self.limit} bytes"
            await error_response(413, message)(scope, receive, send)
            return
        bounded = BoundedReceive(receive, self.limit, self.timeout_s)
        if self.pool is None or not reads_in_pool(scope, declared):
            await self.app(scope, bounded, send)
            return
        try:
            async with self.pool.slot():
                body = await bounded.read_all()
        except ClientDisconnect:
            return  # nobody to answer
        except (ApiError, StarletteHTTPException) as exc:  # outside the app: answered here
            status = getattr(exc, "status", None) or getattr(exc, "status_code", 500)
            text = exc.message if isinstance(exc, ApiError) else one_line(exc.detail)
            await error_response(status, text, exc.headers)(scope, receive, send)
            return
        await self.app(scope, replay(body, receive), send)
