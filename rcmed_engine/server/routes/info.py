"""The engine itself: what it is and serves (``/info``) and its embedding cache (``/cache``)."""

from __future__ import annotations

import contextlib
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from ... import __version__, wire
from ..auth import require_token
from ..errors import json_response
from ..glue import call_registry, jsonable
from ..jobs import FINAL
from ..models import API, responses
from ..state import ServerState, get_state

router = APIRouter(prefix=f"/{API}", dependencies=[Depends(require_token)])


@router.get("/info", responses=responses())
async def info(st: ServerState = Depends(get_state)) -> Response:
    engine = st.require_engine()
    settings = st.settings
    # Read-only, so not queued behind running jobs on the model thread.
    data = {k: jsonable(v) for k, v in (await run_in_threadpool(engine.info)).items()}
    classes: Any = None
    if hasattr(engine, "list_classes"):
        with contextlib.suppress(Exception):
            classes = jsonable(await run_in_threadpool(lambda: call_registry(settings, engine.list_classes)))
    data.update({
        "api": API, "server_version": __version__, "classes": classes,
        "limits": {"max_upload_bytes": settings.max_upload_bytes, "max_voxels": settings.max_voxels,
                   "max_prompt_chars": settings.max_prompt_chars, "max_prompts": settings.max_prompts,
                   "cache_bytes": settings.cache_bytes, "max_active_jobs": settings.max_active_jobs,
                   "max_request_bytes": st.request_bytes, "decode_workers": settings.decode_workers,
                   "max_waiting": settings.max_waiting, "body_timeout_s": settings.body_timeout_s},
        "memory": {"bound_bytes": st.bound["bytes"], "bound_items": st.bound["items"],
                   "machine_bytes": st.bound["machine_bytes"], "rss_bytes": st.note_rss(),
                   "peak_rss_bytes": st.peak_rss},
        "pools": {"decode": st.decoders.stats(), "model": st.model_pool.stats()},
        "image_cache": st.images.stats(),
        "jobs": {s: sum(1 for j in st.jobs.values() if j.status == s) for s in ("queued", "running", *FINAL)},
        "codecs": list(wire.CODECS[:2]),
    })
    return json_response(data)


@router.delete("/cache", responses=responses())
async def clear_cache(st: ServerState = Depends(get_state)) -> Response:
    """Empty the engine's embedding cache (Engine.clear_cache); uploaded images stay."""
    engine = st.require_engine()
    await st.on_model(engine.clear_cache)
    return json_response({"cleared": True})
