"""The server's shared state (``app.state.rcmed``): the engine and its one model thread, the image cache,
the jobs. Routes receive it through the ``get_state`` dependency."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from fastapi import Request

from ..geometry import Volume
from .errors import ApiError, one_line
from .glue import accepts
from .image_cache import ImageCache
from .jobs import Job, JobTable
from .settings import ServerSettings

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
        self.jobs = JobTable(settings.keep_jobs, settings.job_ttl_s)
        # One worker: the model never runs two things at once, and work runs in the order it came.
        self.gpu = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rcmed-model")
        self.on_load_error: Callable[[str], None] | None = None

    # -- model
    def start(self) -> None:
        self.jobs.loop = asyncio.get_running_loop()
        if self.engine is None:
            self.gpu.submit(self._load)

    def _load(self) -> None:
        try:
            self.engine = self._engine_source()
            log.info("model loaded: %s", self.engine.info())
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
        """Run ``fn`` on the model thread, after everything queued before it."""
        return await asyncio.get_running_loop().run_in_executor(self.gpu, fn)

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

    def submit_job(self, job: Job, volume: Volume, params: dict[str, Any]) -> None:
        """Queue the job on the model thread, behind everything submitted before it."""
        self.jobs.add(job)
        self.gpu.submit(self.jobs.run, job, lambda **kw: self.segment_now(volume, job.prompts, params, **kw))


def get_state(request: Request) -> ServerState:
    """The dependency every route uses to reach the shared state."""
    return request.app.state.rcmed
