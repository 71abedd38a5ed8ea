"""Where a request's time went, told to the client in a ``Server-Timing`` header (W3C Server Timing):

    Server-Timing: model-wait;dur=12.345, model-pool;dur=2.0, model-run;dur=40.1, app;dur=55.2

``model-wait``: from the request asking for the model (before its place in the model pool) to its work
starting on the model thread: time behind other clients' requests and the running step of a job.
``model-pool``: the part of it spent waiting for the model pool's one place, i.e. behind other clients'
requests (and what they waited for); the rest (model-wait - model-pool) is behind the job step the thread
was running when this request was handed to it.
``model-run``: its work on the model thread (pure compute, with whatever else the CPUs are doing).
``app``: from the request reaching the app to its answer starting, body reading and encoding included.
Milliseconds. The model entries appear only on requests that ran on the model thread (segment, refine,
prepare, classes, clearing the cache); a request that ran there twice (never today) shows the sums.
Under load, they tell a slow answer that waited for the model (scheduling) from one whose compute
itself ran slower (CPU contention)."""

from __future__ import annotations

import contextvars
import re
import time
from typing import Any, Callable

# A list per request: the middleware makes it, ModelThread work adds to it; a list (not a value set in the
# route) because a route's context may be a copy of the middleware's, but the list is the same object.
_MODEL: contextvars.ContextVar[list[tuple[float, float, float]] | None] = contextvars.ContextVar("rcmed_model_timing",
                                                                                         default=None)


def record_model(wait_s: float, run_s: float, pool_s: float) -> None:
    """Note a piece of model work of the current request (nothing outside a request)."""
    entries = _MODEL.get()
    if entries is not None:
        entries.append((max(0.0, wait_s), max(0.0, run_s), min(max(0.0, pool_s), max(0.0, wait_s))))


def header_value(model: list[tuple[float, float, float]], app_s: float) -> str:
    parts = []
    if model:
        for i, name in ((0, "model-wait"), (2, "model-pool"), (1, "model-run")):
            parts.append(f"{name};dur={1000 * sum(entry[i] for entry in model):.3f}")
    parts.append(f"app;dur={1000 * app_s:.3f}")
    return ", ".join(parts)


_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_DUR = re.compile(r';\s*dur\s*=\s*"?([-+0-9.eE]+)"?\s*(?=;|$)')


def parse_server_timing(value: str) -> dict[str, float | None]:
    """``{"model-wait": 12.345, ...}`` (ms; None for a metric without ``dur``) from a Server-Timing value;
    several header lines joined by commas parse as one. Parameters other than ``dur`` are ignored."""
    out: dict[str, float | None] = {}
    for part in _split_commas(value):
        name, _, params = part.strip().partition(";")
        if not _TOKEN.fullmatch(name.strip()):
            raise ValueError(f"not a Server-Timing metric: {part!r}")
        dur = _DUR.search(";" + params)
        out[name.strip()] = float(dur.group(1)) if dur else None
    return out


def _split_commas(value: str) -> list[str]:
    """The comma-separated metrics, commas inside quoted strings (``desc="a, b"``) kept."""
    parts, start, quoted = [], 0, False
    for i, ch in enumerate(value):
        if ch == '"':
            quoted = not quoted
        elif ch == "," and not quoted:
            parts.append(value[start:i])
            start = i + 1
    parts.append(value[start:])
    return [p for p in parts if p.strip()]


class ServerTiming:
    """ASGI middleware: a fresh model-timing list per HTTP request, written into the response's headers."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        began = time.perf_counter()
        model: list[tuple[float, float, float]] = []
        token = _MODEL.set(model)

        async def timed_send(message: dict) -> None:
            if message["type"] == "http.response.start":  # sent after the route returned: the list is complete
                value = header_value(model, time.perf_counter() - began)
                message = {**message, "headers": [*message.get("headers", ()), (b"server-timing", value.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, timed_send)
        finally:
            _MODEL.reset(token)
