"""Bounded pools: at most ``workers`` requests inside at once, at most ``waiting`` more queued for a place;
beyond that a request is refused at once with 503 and Retry-After, so work never piles up without bound."""

from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator

from .errors import ApiError


class Pool:
    def __init__(self, name: str, workers: int, waiting: int, what: str) -> None:
        self.name = name
        self.workers = max(1, int(workers))
        self.max_waiting = max(0, int(waiting))
        self.what = what            # "uploads being decoded", for the refusal's message
        self._sem: asyncio.Semaphore | None = None
        self.running = 0
        self.waiting = 0
        self.peak_running = 0
        self.peak_waiting = 0
        self.refused = 0

    def _semaphore(self) -> asyncio.Semaphore:
        if self._sem is None:  # made on the event loop that uses it
            self._sem = asyncio.Semaphore(self.workers)
        return self._sem

    def check_room(self) -> None:
        """503 when every worker is busy and the queue is full."""
        if self.running >= self.workers and self.waiting >= self.max_waiting:
            self.refused += 1
            raise ApiError(503, f"the server is busy: {self.running} {self.what} and {self.waiting} waiting, its "
                                "limit; retry shortly", {"Retry-After": "1"})

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        self.check_room()
        sem = self._semaphore()
        self.waiting += 1
        self.peak_waiting = max(self.peak_waiting, self.waiting)
        try:
            await sem.acquire()
        finally:
            self.waiting -= 1
        self.running += 1
        self.peak_running = max(self.peak_running, self.running)
        try:
            yield
        finally:
            self.running -= 1
            sem.release()

    def stats(self) -> dict[str, int]:
        return {"workers": self.workers, "max_waiting": self.max_waiting, "running": self.running,
                "waiting": self.waiting, "peak_running": self.peak_running, "peak_waiting": self.peak_waiting,
                "refused": self.refused}
