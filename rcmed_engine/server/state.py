"""The server's shared state (``app.state.rcmed``): the engine and its one model thread, the image cache,
the jobs. Routes receive it through the ``get_state`` dependency."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable, Iterator

from fastapi import Request

from ..geometry import Volume
from .chunks import chunk_slices, segment_in_chunks
from .errors import ApiError, one_line
from .glue import accepts
from .image_cache import ImageCache
from .jobs import Job, JobTable
from .model_thread import INTERACTIVE, ModelThread
from .memory import bound_problem, describe_bound, engine_cache_bytes, machine_memory_bytes, memory_bound, rss_bytes
from .pools import Pool
from .settings import ServerSettings
from .timing import record_model

log = logging.getLogger("rcmed.server")


class ServerState:
    def __init__(self, engine: Any, settings: ServerSettings, token: str) -> None:
        self.settings = settings
        self.token = token.encode()
        self._engine_source = engine
        # An engine, or a callable that loads one on the model thread (liveness answers meanwhile).
        self.engine: Any = None if callable(engine) and not hasattr(engine, "segment_many") else engine
        self.load_error: str | None = None
        self.images = ImageCache(settings.cache_bytes)
        self.machine_bytes = machine_memory_bytes()
        self.request_bytes = settings.request_bytes(self.machine_bytes)
        # Finished results are kept within one request budget in all (the oldest go first).
        self.jobs = JobTable(settings.keep_jobs, settings.job_ttl_s, max_bytes=self.request_bytes)
        # Uploads: read and decoded by at most decode_workers at once, each within request_bytes.
        self.decoders = Pool("decode", settings.decode_workers, settings.max_waiting, "uploads being decoded")
        # Requests answered on the model thread (jobs are bounded by max_active_jobs instead).
        self.model_pool = Pool("model", 1, settings.max_waiting, "requests on the model")
        self.peak_rss = rss_bytes()
        self.bound = self.memory_bound()
        # One thread: the model never runs two things at once; waiting clients go ahead of queued jobs.
        self.gpu = ModelThread("rcmed-model")
        self.on_load_error: Callable[[str], None] | None = None

    # -- model
    def start(self) -> None:
        self.jobs.loop = asyncio.get_running_loop()
        if self.engine is None:
            self.gpu.submit(self._load, priority=INTERACTIVE)

    def memory_bound(self) -> dict[str, Any]:
        """The peak this server can reach under its settings, with the process as it stands now."""
        engine_bytes = engine_cache_bytes(self.engine) if self.engine is not None else 0
        return memory_bound(self.settings, self.machine_bytes, rss_bytes(), engine_bytes)

    def note_rss(self) -> int:
        now = rss_bytes()
        self.peak_rss = max(self.peak_rss, now)
        return now

    def _load(self) -> None:
        try:
            engine = self._engine_source()
            self.engine = engine
            self.bound = self.memory_bound()  # the model's weights are now part of the process
            problem = bound_problem(self.bound, self.settings) if self.settings.check_memory else None
            if problem:  # not ready, ever: the server stops with this line (rcmed serve)
                self.engine = None
                raise RuntimeError(f"with the model loaded, {problem}")
            log.info("model loaded: %s", engine.info())
            log.info("%s", describe_bound(self.bound))
        except BaseException as exc:  # noqa: BLE001 - reported as a one-line readiness error
            self.load_error = one_line(exc)
            log.error("the model failed to load: %s", self.load_error)
            if self.on_load_error is not None:
                self.on_load_error(self.load_error)

    def require_engine(self) -> Any:
        if self.engine is not None:
            return self.engine
        if self.load_error:
            raise ApiError(503, f"the model failed to load: {self.load_error}")
        raise ApiError(503, "the model is still loading; retry shortly", {"Retry-After": "1"})

    def stop(self) -> None:
        self.jobs.cancel_all()
        self.gpu.shutdown(wait=False, cancel_futures=True)

    async def on_model(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the model thread, ahead of queued jobs (503 when too many wait). Its wait and run
        go into the request's Server-Timing header (timing.py), failed runs included."""
        asked = time.perf_counter()  # before the pool: waiting there is waiting for the model too
        placed = asked
        ran: list[float] = []

        def timed() -> Any:
            ran.append(time.perf_counter())
            try:
                return fn()
            finally:
                ran.append(time.perf_counter())

        try:
            async with self.model_pool.slot():
                placed = time.perf_counter()  # the pool's one place: no other client's request is on the thread
                return await asyncio.wrap_future(self.gpu.submit(timed, priority=INTERACTIVE))
        finally:
            if len(ran) == 2:  # it ran (not refused, cancelled or still running for a client that left)
                record_model(ran[0] - asked, ran[1] - ran[0], placed - asked)

    # -- images
    def image(self, image_id: str) -> Volume:
        volume = self.images.get(image_id)
        if volume is None:
            raise ApiError(404, f"unknown image {image_id}: it was never uploaded or was evicted from the "
                                "image cache; upload it again")
        return volume

    # -- segmenting
    def segment_now(self, volume: Volume, prompts: list[str], params: dict[str, Any], **kw: Any) -> list:
        engine = self.require_engine()
        kwargs = dict(params)
        use = kwargs.pop("registry", None)
        if use is None:
            use = self.settings.registry is not None and accepts(engine.segment_many, "registry")
        if use:
            if not accepts(engine.segment_many, "registry"):
                raise ApiError(501, "this engine has no class registry (one-shot adaptation) yet")
            kwargs["registry"] = self.settings.registry
            if kwargs["registry"] is None:
                kwargs.pop("registry")
        return engine.segment_many(volume, prompts, **kwargs, **kw)

    def submit_job(self, job: Job, volume: Volume, params: dict[str, Any], span: tuple[int, int]) -> None:
        """Queue the job on the model thread, behind the jobs submitted before it. It runs a chunk of slices
        per step: a waiting client's request goes in between, instead of waiting for the whole volume."""
        self.jobs.add(job)
        chunk = chunk_slices(self.engine, self.settings.job_chunk_slices)

        def segment(**kw: Any) -> list:
            return self.segment_now(volume, job.prompts, {**params, **kw})

        def work(progress: Callable[[int, int], None], cancel: Any) -> Iterator[None]:
            return segment_in_chunks(segment, volume, params["axis"], span, chunk, progress, cancel)

        self.gpu.submit_steps(self.jobs.stepper(job, work))


def get_state(request: Request) -> ServerState:
    """The dependency every route uses to reach the shared state."""
    return request.app.state.rcmed
