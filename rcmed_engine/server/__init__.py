"""``rcmed serve``: the Engine behind HTTP (FastAPI on uvicorn), API version 1 under ``/v1``.

One model serves many clients. Images are uploaded once and named by their content hash
(``rcmed_engine.wire``); a 2D request is answered directly, a volume becomes a job with progress,
a result and cancellation. All model work (loading, segmenting, registering classes) runs on one
worker thread, in order, so the model never runs two things at once.

Endpoints (all but ``/v1/health*`` and ``/v1/openapi.json`` need ``Authorization: Bearer TOKEN``)::

    GET    /v1/health                 liveness: {"status": "ok", "ready": bool}
    GET    /v1/health/ready           readiness: 200 when the model is loaded, else 503
    GET    /v1/info                   preset, weights and hash, device, version, classes, limits
    DELETE /v1/cache                  empty the engine's embedding cache (Engine.clear_cache)
    POST   /v1/images                 upload an RCMA array frame or a NIfTI/NRRD file -> {"id", ...}
    GET    /v1/images/{id}            the image's shape, dtype, geometry (HEAD: does it exist)
    DELETE /v1/images/{id}            forget an image
    POST   /v1/images/{id}/prepare    precompute the prompt-free work for its slices (Engine.set_image)
    POST   /v1/segment                one slice -> 200 with the result; more -> 202 with a job
    GET    /v1/jobs                   the jobs the server holds
    GET    /v1/jobs/{id}              a job's status and progress (long poll: ?wait=S&since=VERSION)
    GET    /v1/jobs/{id}/result       the finished job's result (?wait=S: wait for the job to end first)
    DELETE /v1/jobs/{id}              cancel a job
    GET    /v1/classes                registered classes (one-shot adaptation)
    POST   /v1/classes                register a class from one labelled slice
    DELETE /v1/classes/{name}         remove a class

Every error is ``{"error": "one line"}`` with a 4xx status; a failure of the server itself is a 500
with a reference to the log line, never a stack trace.

The package follows FastAPI's own layout:

* ``app.py``: ``create_app``, the factory; ``serve.py``: ``rcmed serve`` on uvicorn;
* ``routes/``: one APIRouter per resource (health, info, images, segment, jobs, classes);
* ``auth.py`` (the bearer token) and ``limits.py`` (upload, prompt and job limits), as dependencies;
  ``bodies.py``: every body's size limit and read timeout (408), large JSON bodies in a decode place;
* ``state.py``: the shared state in ``app.state.rcmed`` (engine, model thread, image cache, jobs);
* ``jobs.py``: the job table and how a job runs; ``chunks.py``: a job a batch of slices per turn on the
  model thread (``model_thread.py``); ``image_cache.py``; ``uploads.py``: frames and files;
* ``models.py``: the pydantic schemas; ``errors.py``: the one-line JSON errors; ``settings.py``;
* ``glue.py``: optional engine parameters, results and registry entries as JSON; ``checks.py``.
* ``timing.py``: each answer's ``Server-Timing`` header (its wait for the model thread and its run there);
* ``headers.py``: what an upload costs, from its NIfTI/NRRD header; ``memory.py``: the per-request budget and
  the server's memory bound; ``pools.py``: the bounded decode and model queues (503 with Retry-After beyond).
"""

from __future__ import annotations

from .app import create_app
from .errors import ApiError
from .glue import result_to_wire
from .image_cache import ImageCache
from .jobs import FINAL, Job, JobTable
from .models import API, ID_PATTERN, JOB_PATTERN
from .serve import is_loopback, serve
from .settings import ServerSettings
from .state import ServerState, get_state

__all__ = ["API", "ApiError", "FINAL", "ID_PATTERN", "ImageCache", "JOB_PATTERN", "Job", "JobTable",
           "ServerSettings", "ServerState", "create_app", "get_state", "is_loopback", "result_to_wire", "serve"]
