"""Jobs: a volume's segmentation runs on the model thread while the client polls its progress.

The table keeps queued, running and recently finished jobs (their results wait for the client), finds a
retried request by its idempotency key, and wakes long polls when a job changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from .errors import ApiError, one_line

log = logging.getLogger("rcmed.server")

FINAL = ("done", "failed", "cancelled")


@dataclass
class Job:
    id: str
    image: str
    prompts: list[str]
    total: int
    key: str | None = None
    status: str = "queued"
    done: int = 0
    error: str | None = None
    error_kind: str | None = None      # "invalid" (the request cannot be done) or "internal"
    version: int = 0
    created: float = field(default_factory=time.time)
    finished: float | None = None
    results: list | None = None
    encoded: dict[str, bytes] = field(default_factory=dict)
    cancel: threading.Event = field(default_factory=threading.Event)
    waiters: list = field(default_factory=list)

    def nbytes(self) -> int:
        """Memory its results hold (label maps, presence scores, encoded answers)."""
        held = sum(len(v) for v in self.encoded.values())
        for r in self.results or ():
            held += sum(int(getattr(getattr(r, k, None), "nbytes", 0) or 0) for k in ("labels", "presence"))
        return held

    def public(self) -> dict[str, Any]:
        return {"id": self.id, "status": self.status, "done": self.done, "total": self.total,
                "error": self.error, "error_kind": self.error_kind, "version": self.version,
                "image": self.image, "prompts": list(self.prompts), "created": self.created,
                "finished": self.finished}


class JobTable:
    """The server's jobs by id (in submission order) and by idempotency key."""

    def __init__(self, keep: int, ttl_s: float, max_bytes: int | None = None) -> None:
        self.keep = keep
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes  # the finished results kept, in all (the newest is always kept)
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self.by_key: dict[str, str] = {}
        self.loop: asyncio.AbstractEventLoop | None = None  # set at start: workers wake waiters through it

    def add(self, job: Job) -> None:
        self.jobs[job.id] = job
        if job.key:
            self.by_key[job.key] = job.id

    def by_idempotency_key(self, key: str | None) -> Job | None:
        if not key or key not in self.by_key:
            return None
        return self.jobs.get(self.by_key[key])

    def get(self, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            raise ApiError(404, f"unknown job {job_id}: it finished long ago or the server restarted; "
                                "submit it again")
        return job

    def values(self) -> list[Job]:
        return list(self.jobs.values())

    def active(self) -> int:
        return sum(1 for j in self.jobs.values() if j.status not in FINAL)

    def purge(self) -> None:
        """Drop finished jobs beyond the ``keep`` newest, those older than the time to live and, oldest
        first, those whose results take the held results over ``max_bytes``."""
        now = time.time()
        finished = [j for j in self.jobs.values() if j.status in FINAL]
        excess = len(finished) - self.keep
        held = sum(j.nbytes() for j in finished) if self.max_bytes is not None else 0
        for j in finished:
            over = self.max_bytes is not None and held > self.max_bytes and j is not finished[-1]
            if excess > 0 or now - (j.finished or now) > self.ttl_s or over:
                self.jobs.pop(j.id, None)
                if j.key:
                    self.by_key.pop(j.key, None)
                held -= j.nbytes() if self.max_bytes is not None else 0
                excess -= 1

    def cancel_all(self) -> None:
        for job in self.jobs.values():
            job.cancel.set()

    # -- change notification (called from the model thread; waiters live on the event loop)
    def notify(self, job: Job) -> None:
        def wake() -> None:
            job.version += 1
            waiters, job.waiters = job.waiters, []
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)

        if self.loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
                self.loop.call_soon_threadsafe(wake)

    def finish(self, job: Job, status: str, error: str | None = None, kind: str | None = None) -> None:
        job.status, job.error, job.error_kind = status, error, kind
        job.finished = time.time()
        self.notify(job)
        if self.loop is not None:  # keep the held results within max_bytes (on the loop: it owns the table)
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(self.purge)

    def cancel(self, job: Job) -> None:
        if job.status not in FINAL:
            job.cancel.set()
            if job.status == "queued":  # never started: it is cancelled now
                job.status, job.error, job.finished = "cancelled", "cancelled by the client", time.time()
                self.notify(job)

    async def wait(self, job: Job, wait: float, max_wait: float, since: int = -1, final: bool = True) -> None:
        """Long poll: until the job changes from version ``since`` (or ends, with ``final``), at most ``wait`` s."""
        end = time.monotonic() + min(wait, max_wait)
        while job.status not in FINAL and (final or since < 0 or job.version == since):
            left = end - time.monotonic()
            if left <= 0:
                return
            fut = asyncio.get_running_loop().create_future()
            job.waiters.append(fut)
            try:
                await asyncio.wait_for(fut, left)
            except asyncio.TimeoutError:
                return
            if not final:
                return

    # -- running (on the model thread, a step at a time)
    def stepper(self, job: Job, work: Callable[..., Iterator[None]]) -> Callable[[], bool]:
        """The job as steps for ModelThread.submit_steps: each call advances ``work(progress=..., cancel=...)``,
        a generator that yields between chunks of slices and returns the results, and says whether more
        remain. How the job ended is recorded here."""
        steps: Iterator[None] | None = None

        def progress(done: int, total: int) -> None:
            job.done, job.total = int(done), int(total)
            self.notify(job)

        def step() -> bool:
            nonlocal steps
            if steps is None:
                if job.cancel.is_set():
                    self.finish(job, "cancelled", "cancelled by the client before it started")
                    return False
                job.status = "running"
                self.notify(job)
                steps = work(progress=progress, cancel=job.cancel)
            try:
                next(steps)
                return True
            except StopIteration as end:
                job.results = end.value
                self.finish(job, "done")
            except Exception as exc:  # noqa: BLE001 - every ending is recorded on the job
                self._failed(job, exc)
            return False

        return step

    def _failed(self, job: Job, exc: Exception) -> None:
        from ..engine import Cancelled

        if isinstance(exc, Cancelled):
            self.finish(job, "cancelled", "cancelled by the client")
        elif isinstance(exc, ApiError):
            self.finish(job, "failed", exc.message, "invalid")
        elif isinstance(exc, ValueError):
            self.finish(job, "failed", one_line(exc), "invalid")
        else:
            ref = uuid.uuid4().hex[:8]
            log.error("job %s failed (ref %s)", job.id, ref, exc_info=exc)
            self.finish(job, "failed", f"internal error in the engine (server log ref {ref})", "internal")
