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
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import inspect
import ipaddress
import json
import logging
import math
import os
import secrets
import sys
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from . import __version__, wire
from .geometry import Volume

log = logging.getLogger("rcmed.server")

API = "v1"
ID_PATTERN = "^[0-9a-f]{64}$"
JOB_PATTERN = "^[0-9a-f]{32}$"
FINAL = ("done", "failed", "cancelled")


# ----------------------------------------------------------------------------------------- settings
@dataclass
class ServerSettings:
    """What ``rcmed serve`` is told; every limit answers 413 or 422 with a message when crossed."""

    host: str = "127.0.0.1"
    port: int = 8765
    token: str | None = None              # None: RCMED_TOKEN, else a generated one (printed at start)
    registry: str | None = None           # the class registry folder for one-shot adaptation
    max_upload_bytes: int = 1 << 30       # request body of an upload
    max_voxels: int = 1 << 29             # z * y * x of one image
    max_prompt_chars: int = 500
    max_prompts: int = 16                 # prompts in one request
    cache_bytes: int = 2 << 30            # uploaded images kept in memory (least recently used go first)
    max_active_jobs: int = 32             # queued plus running; more answer 503 with Retry-After
    keep_jobs: int = 16                   # finished jobs (and their results) kept for the client to fetch
    job_ttl_s: float = 600.0
    max_wait_s: float = 30.0              # the longest long poll

    def resolved_token(self) -> tuple[str, bool]:
        """(token, generated): --token, then RCMED_TOKEN, then a fresh random one."""
        token = self.token or os.environ.get("RCMED_TOKEN") or ""
        if token.strip():
            return token.strip(), False
        return secrets.token_urlsafe(24), True


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def _one_line(exc: BaseException | str, limit: int = 400) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ----------------------------------------------------------------------------------------- image cache
class ImageCache:
    """Uploaded images by id, bounded in bytes; the least recently used go first."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, Volume] = OrderedDict()
        self._lock = threading.Lock()
        self.nbytes = 0
        self.peak_bytes = 0
        self.evictions = 0

    def get(self, key: str) -> Volume | None:
        with self._lock:
            vol = self._items.get(key)
            if vol is not None:
                self._items.move_to_end(key)
            return vol

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._items

    def put(self, key: str, volume: Volume) -> bool:
        """Store; False when it was already there. Raises ApiError 413 when it can never fit."""
        size = int(volume.array.nbytes)
        if size > self.max_bytes:
            raise ApiError(413, f"the image takes {size} bytes, more than this server's image cache "
                                f"({self.max_bytes} bytes); ask its operator to raise --cache-mb")
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return False
            while self._items and self.nbytes + size > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self.nbytes -= int(old.array.nbytes)
                self.evictions += 1
            self._items[key] = volume
            self.nbytes += size
            self.peak_bytes = max(self.peak_bytes, self.nbytes)
            return True

    def remove(self, key: str) -> bool:
        with self._lock:
            vol = self._items.pop(key, None)
            if vol is None:
                return False
            self.nbytes -= int(vol.array.nbytes)
            return True

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"images": len(self._items), "bytes": self.nbytes, "cap_bytes": self.max_bytes,
                    "peak_bytes": self.peak_bytes, "evictions": self.evictions}


# ----------------------------------------------------------------------------------------- jobs
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

    def public(self) -> dict[str, Any]:
        return {"id": self.id, "status": self.status, "done": self.done, "total": self.total,
                "error": self.error, "error_kind": self.error_kind, "version": self.version,
                "image": self.image, "prompts": list(self.prompts), "created": self.created,
                "finished": self.finished}


# ----------------------------------------------------------------------------------------- API models
Axis = Literal["axial", "coronal", "sagittal"]
Codec = Literal["zstd", "gzip"]


class ErrorModel(BaseModel):
    error: str


class HealthModel(BaseModel):
    status: str
    ready: bool
    version: str
    error: str | None = None


class GeometryModel(BaseModel):
    origin: list[float] = Field(min_length=3, max_length=3)
    spacing: list[float] = Field(min_length=3, max_length=3)
    direction: list[float] = Field(min_length=9, max_length=9)


class ImageModel(BaseModel):
    id: str
    shape: list[int]
    dtype: str
    geometry: GeometryModel
    meta: dict[str, str]
    existed: bool = False


class PackedMask(BaseModel):
    model_config = ConfigDict(extra="forbid")
    label: int = Field(ge=1, le=255)
    bbox: list[int] = Field(min_length=6, max_length=6)
    codec: Literal["zstd", "gzip", "none"] = "zstd"
    data: str = Field(max_length=1 << 28)


class LabelMapModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    shape: list[int] = Field(min_length=3, max_length=3)
    masks: list[PackedMask] = Field(max_length=255)


class ArrayModel(BaseModel):
    dtype: str
    shape: list[int]
    codec: str
    data: str


class ResultModel(BaseModel):
    prompt: str
    targets: list[str]
    answer: str
    modality: str
    axis: str
    slices: list[int]
    geometry: GeometryModel
    labels: LabelMapModel
    presence: ArrayModel
    timings: dict[str, float]
    provenance: dict[str, str]


class SegmentResponse(BaseModel):
    image: str
    results: list[ResultModel]


class JobModel(BaseModel):
    id: str
    status: Literal["queued", "running", "done", "failed", "cancelled"]
    done: int
    total: int
    error: str | None
    error_kind: str | None
    version: int
    image: str
    prompts: list[str]
    created: float
    finished: float | None


class JobsModel(BaseModel):
    jobs: list[JobModel]


class SegmentRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image: str = Field(pattern=ID_PATTERN, description="an image id from POST /v1/images")
    prompt: str | None = Field(None, max_length=100_000, description="what to segment, e.g. 'liver and spleen'")
    prompts: list[str] | None = Field(None, min_length=1, max_length=64,
                                      description="several prompts on one image (instead of prompt)")
    modality: str | None = Field(None, max_length=64, description="CT, MR, X-ray... (default: from the image)")
    axis: Axis = "axial"
    slices: list[int | None] | None = Field(None, min_length=2, max_length=2,
                                            description="[A, B): voxel indices along the cut axis")
    registry: bool | None = Field(None, description="use the server's class registry (one-shot adaptation); "
                                                    "default: when the server has one")
    codec: Codec = "zstd"
    job: bool = Field(False, description="always answer with a job, even for one slice")
    idempotency_key: str | None = Field(None, max_length=128,
                                        description="a retried request with the same key returns the same job")


class PrepareRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    modality: str | None = Field(None, max_length=64)
    axis: Axis = "axial"
    slices: list[int] | None = Field(None, max_length=1 << 16)


class PrepareResponse(BaseModel):
    keys: list[str]


class RegisterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image: str = Field(pattern=ID_PATTERN)
    mask: LabelMapModel
    name: str = Field(min_length=1, max_length=200)
    label: int | None = Field(None, ge=1, le=255)
    axis: Axis = "axial"
    slice: int | None = Field(None, ge=0, description="the slice along axis (default: the largest mask area)")
    modality: str | None = Field(None, max_length=64)


class ClassesModel(BaseModel):
    classes: list[Any]


class ClassModel(BaseModel):
    name: str
    info: Any = None


_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorModel, "description": text} for code, text in (
        (400, "malformed input"), (401, "missing or wrong bearer token"), (404, "unknown id"),
        (409, "not possible in the current state"), (413, "over a configured limit"),
        (422, "invalid request"), (501, "not available in this engine"), (503, "not ready or too busy; retry"))
}


def _responses(*extra: int, **models: Any) -> dict[int | str, dict[str, Any]]:
    out = {c: _ERRORS[c] for c in (400, 401, 404, 413, 422, 503) + extra}
    for code, model in models.items():
        out[int(code[1:])] = {"model": model}
    return out


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    body = json.dumps(data, separators=(",", ":"), allow_nan=False).encode()
    return Response(body, status_code=status, media_type="application/json", headers=headers)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return _json({"error": message}, status, headers)


# ----------------------------------------------------------------------------------------- engine glue
def _accepts(fn: Callable, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _filtered(fn: Callable, kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if v is not None and _accepts(fn, k)}


def _jsonable(value: Any) -> Any:
    """Class registry entries (dataclasses, numpy scalars...) as plain JSON values."""
    import dataclasses

    import numpy as np

    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist() if value.size <= 64 else f"array{list(value.shape)}"
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def result_to_wire(result: Any, codec: str = "zstd") -> dict[str, Any]:
    """A SegmentResult as JSON (rcmed_engine.wire sections 3 to 5)."""
    return {"prompt": result.prompt, "targets": list(result.targets), "answer": result.answer,
            "modality": result.modality, "axis": result.axis, "slices": [int(s) for s in result.slices],
            "geometry": wire.geometry_to_json(result.geometry),
            "labels": wire.encode_labels(result.labels, codec),
            "presence": wire.encode_array(result.presence, codec),
            "timings": {k: float(v) for k, v in result.timings.items()},
            "provenance": {k: str(v) for k, v in result.provenance.items()},
            "notes": [str(n) for n in getattr(result, "notes", [])]}


# ----------------------------------------------------------------------------------------- state
class _State:
    def __init__(self, engine: Any, settings: ServerSettings, token: str) -> None:
        self.settings = settings
        self.token = token.encode()
        self._engine_source = engine
        self.engine: Any = None if callable(engine) and not hasattr(engine, "segment_many") else engine
        self.load_error: str | None = None
        self.images = ImageCache(settings.cache_bytes)
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self.jobs_by_key: dict[str, str] = {}
        self.gpu = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rcmed-model")
        self.loop: asyncio.AbstractEventLoop | None = None
        self.on_load_error: Callable[[str], None] | None = None

    # -- model
    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        if self.engine is None:
            self.gpu.submit(self._load)

    def _load(self) -> None:
        try:
            self.engine = self._engine_source()
            log.info("model loaded: %s", self.engine.info())
        except BaseException as exc:  # noqa: BLE001 - reported as a one-line readiness error
            self.load_error = _one_line(exc)
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
        for job in self.jobs.values():
            job.cancel.set()
        self.gpu.shutdown(wait=False, cancel_futures=True)

    async def on_model(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the model thread, after everything queued before it."""
        return await asyncio.get_running_loop().run_in_executor(self.gpu, fn)

    # -- jobs
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

    def purge_jobs(self) -> None:
        now = time.time()
        finished = [j for j in self.jobs.values() if j.status in FINAL]
        excess = len(finished) - self.settings.keep_jobs
        for j in finished:
            if excess > 0 or now - (j.finished or now) > self.settings.job_ttl_s:
                self.jobs.pop(j.id, None)
                if j.key:
                    self.jobs_by_key.pop(j.key, None)
                excess -= 1

    def get_job(self, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            raise ApiError(404, f"unknown job {job_id}: it finished long ago or the server restarted; "
                                "submit it again")
        return job

    def run_job(self, job: Job, volume: Volume, params: dict[str, Any]) -> None:
        from .engine import Cancelled

        if job.cancel.is_set():
            self._finish(job, "cancelled", "cancelled by the client before it started")
            return
        job.status = "running"
        self.notify(job)

        def progress(done: int, total: int) -> None:
            job.done, job.total = int(done), int(total)
            self.notify(job)

        try:
            results = self.segment_now(volume, job.prompts, params, progress=progress, cancel=job.cancel)
        except Cancelled:
            self._finish(job, "cancelled", "cancelled by the client")
        except ApiError as exc:
            self._finish(job, "failed", exc.message, "invalid")
        except ValueError as exc:
            self._finish(job, "failed", _one_line(exc), "invalid")
        except Exception:  # noqa: BLE001 - logged here, reported as one line
            ref = uuid.uuid4().hex[:8]
            log.exception("job %s failed (ref %s)", job.id, ref)
            self._finish(job, "failed", f"internal error in the engine (server log ref {ref})", "internal")
        else:
            job.results = results
            self._finish(job, "done")

    def _finish(self, job: Job, status: str, error: str | None = None, kind: str | None = None) -> None:
        job.status, job.error, job.error_kind = status, error, kind
        job.finished = time.time()
        self.notify(job)

    def segment_now(self, volume: Volume, prompts: list[str], params: dict[str, Any], **kw: Any) -> list:
        engine = self.require_engine()
        kwargs = dict(params)
        use = kwargs.pop("registry", None)
        if use is None:
            use = self.settings.registry is not None and _accepts(engine.segment_many, "registry")
        if use:
            if not _accepts(engine.segment_many, "registry"):
                raise ApiError(501, "this engine has no class registry (one-shot adaptation) yet")
            kwargs["registry"] = self.settings.registry
            if kwargs["registry"] is None:
                kwargs.pop("registry")
        return engine.segment_many(volume, prompts, **kwargs, **kw)


# ----------------------------------------------------------------------------------------- uploads
def _sniff_file(body: bytes) -> str | None:
    """The suffix of a NIfTI or NRRD file, from its first bytes; None when it is neither."""
    if body[:4] == b"NRRD":
        return ".nrrd"
    if body[:2] == b"\x1f\x8b":
        import zlib

        try:
            head = zlib.decompressobj(wbits=31).decompress(body[:65536], 352)
        except zlib.error:
            return None
        return ".nii.gz" if _is_nifti(head) else None
    return ".nii" if _is_nifti(body[:352]) else None


def _is_nifti(head: bytes) -> bool:
    return len(head) >= 348 and (head[344:347] in (b"n+1", b"ni1", b"n+2") or head[4:8] in (b"n+2\0",))


def _nifti_required_bytes(head: bytes) -> int | None:
    """Bytes a NIfTI-1/2 file needs for its header's voxels (None when the header is unreadable)."""
    import struct

    for e in "<>":
        if len(head) >= 348 and struct.unpack(e + "i", head[:4])[0] == 348:
            dims = struct.unpack(e + "8h", head[40:56])
            bitpix = struct.unpack(e + "h", head[72:74])[0]
            offset = struct.unpack(e + "f", head[108:112])[0]
            break
        if len(head) >= 540 and struct.unpack(e + "i", head[:4])[0] == 540:
            bitpix = struct.unpack(e + "h", head[14:16])[0]
            dims = struct.unpack(e + "8q", head[16:80])
            offset = struct.unpack(e + "q", head[168:176])[0]
            break
    else:
        return None
    if not 1 <= dims[0] <= 7 or not math.isfinite(offset) or bitpix <= 0:
        return None
    return int(offset) + math.prod(max(1, int(d)) for d in dims[1:dims[0] + 1]) * bitpix // 8


def _check_nifti_complete(body: bytes, suffix: str) -> None:
    """ITK reads a NIfTI file cut short without complaint (the missing voxels come back as garbage);
    refuse it here: the gzip stream must end properly and hold every voxel the header announces."""
    import zlib

    if suffix == ".nii.gz":
        d = zlib.decompressobj(wbits=31)
        head, total, data = b"", 0, body
        try:
            while data and not d.eof:
                out = d.decompress(data, 1 << 24)
                if len(head) < 540:
                    head += out[:540 - len(head)]
                total += len(out)
                data = d.unconsumed_tail
            while not d.eof:  # output still buffered inside
                out = d.decompress(b"", 1 << 24)
                if not out:
                    break
                total += len(out)
        except zlib.error:
            raise ApiError(400, "the uploaded .nii.gz file is corrupt") from None
        if not d.eof:
            raise ApiError(400, "the uploaded .nii.gz file is truncated (its gzip stream ends early)")
    else:
        head, total = body[:540], len(body)
    need = _nifti_required_bytes(head)
    if need is None:
        raise ApiError(400, f"the uploaded {suffix} file has an unreadable NIfTI header")
    if total < need:
        raise ApiError(400, f"the uploaded {suffix} file is truncated: its header announces {need} bytes, "
                            f"it holds {total}")


def _ingest(state: _State, body: bytes) -> tuple[dict[str, Any], bool]:
    """Decode an uploaded body into the image cache; returns (image description, created)."""
    s = state.settings
    if body[:4] == wire.MAGIC:
        header = wire.peek_header(body)
        if header["voxels"] > s.max_voxels:
            raise ApiError(413, f"the image has {header['voxels']} voxels; this server's limit is {s.max_voxels}")
        if header["nbytes"] > s.cache_bytes:
            raise ApiError(413, f"the image takes {header['nbytes']} bytes, more than this server's image cache "
                                f"({s.cache_bytes} bytes)")
        if header["id"] is not None:
            cached = state.images.get(header["id"])
            if cached is not None:  # the same content again: nothing to decode
                return _describe(header["id"], cached, existed=True), False
        ident, volume = wire.decode_volume(body, header)
    else:
        suffix = _sniff_file(body)
        if suffix is None:
            raise ApiError(400, "the body is neither an RCMA array frame (see rcmed_engine.wire) nor a NIfTI "
                                "or NRRD file")
        ident, volume = _read_file(state, body, suffix)
    created = state.images.put(ident, volume)
    return _describe(ident, volume, existed=not created), created


def _read_file(state: _State, body: bytes, suffix: str) -> tuple[str, Volume]:
    import SimpleITK as sitk

    from .io import read_image

    if suffix.startswith(".nii"):
        _check_nifti_complete(body, suffix)
    with tempfile.TemporaryDirectory(prefix="rcmed-upload-") as tmp:
        path = Path(tmp) / f"upload{suffix}"
        path.write_bytes(body)
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        try:
            reader.ReadImageInformation()
        except RuntimeError:
            raise ApiError(400, f"the uploaded {suffix} file is corrupt or truncated") from None
        voxels = math.prod(reader.GetSize()[:3])
        if voxels > state.settings.max_voxels:
            raise ApiError(413, f"the image has {voxels} voxels; this server's limit is {state.settings.max_voxels}")
        try:
            volume = read_image(path)
        except (ValueError, RuntimeError) as exc:
            raise ApiError(400, _one_line(str(exc).replace(str(path), f"the uploaded {suffix} file"))) from None
    volume.meta.pop("source", None)
    array, geometry, meta = wire.as_wire_volume(volume)
    return wire.image_id(array, geometry, meta), Volume(array, geometry, meta)


def _describe(ident: str, volume: Volume, existed: bool = False) -> dict[str, Any]:
    return {"id": ident, "shape": list(volume.array.shape), "dtype": volume.array.dtype.str,
            "geometry": wire.geometry_to_json(volume.geometry), "meta": dict(volume.meta), "existed": existed}


# ----------------------------------------------------------------------------------------- the app
class _BodyLimit:
    """Every request body (JSON included) is bounded by the upload limit, declared or streamed."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        message = f"the request body is over this server's limit of {self.limit} bytes"
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and int(value) > self.limit:
                await _error(413, message)(scope, receive, send)
                return
        received = 0

        async def limited() -> dict:
            nonlocal received
            msg = await receive()
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                if received > self.limit:
                    raise StarletteHTTPException(413, message)
            return msg

        await self.app(scope, limited, send)


def create_app(engine: Any, settings: ServerSettings | None = None) -> FastAPI:
    """The FastAPI app around ``engine``: an Engine, or a callable that loads one (then the server
    answers liveness at once and readiness when the model is loaded)."""
    settings = settings or ServerSettings()
    token, _ = settings.resolved_token()
    st = _State(engine, settings, token)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        st.start()
        try:
            yield
        finally:
            st.stop()

    app = FastAPI(title="RCMed engine", version=__version__, lifespan=lifespan,
                  openapi_url=f"/{API}/openapi.json", docs_url=None, redoc_url=None,
                  description="Text-prompted medical image segmentation. Wire format: rcmed_engine.wire.")
    app.state.rcmed = st
    app.add_middleware(_BodyLimit, limit=settings.max_upload_bytes)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> Response:
        return _error(exc.status, exc.message, exc.headers)

    @app.exception_handler(wire.WireError)
    async def _wire_error(request: Request, exc: wire.WireError) -> Response:
        return _error(400, _one_line(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return _error(exc.status_code, _one_line(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        parts = []
        for e in exc.errors()[:4]:
            loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "request"
            parts.append(f"{loc}: {e.get('msg', 'invalid')}")
        return _error(422, _one_line("invalid request: " + "; ".join(parts)))

    @app.exception_handler(ValueError)
    async def _value_error(request: Request, exc: ValueError) -> Response:
        # EngineError, PromptError, ImageReadError...: the engine's own one-line messages.
        return _error(422, _one_line(exc))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> Response:
        ref = uuid.uuid4().hex[:8]
        log.error("internal error (ref %s) on %s %s", ref, request.method, request.url.path, exc_info=exc)
        return _error(500, f"internal server error (server log ref {ref})")

    bearer = HTTPBearer(auto_error=False, description="the server's token: rcmed serve --token or RCMED_TOKEN")

    async def require_token(cred: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        given = (cred.credentials if cred is not None else "").encode("utf-8", "surrogateescape")
        if cred is None or not hmac.compare_digest(given, st.token):
            raise ApiError(401, "missing or wrong bearer token: send 'Authorization: Bearer TOKEN' with the "
                                "server's token (rcmed serve --token or RCMED_TOKEN)", {"WWW-Authenticate": "Bearer"})

    open_routes = APIRouter(prefix=f"/{API}", tags=["health"])
    v1 = APIRouter(prefix=f"/{API}", dependencies=[Depends(require_token)])

    # ------------------------------------------------------------------------------------- health
    @open_routes.get("/health", response_model=HealthModel)
    async def health() -> Response:
        return _json({"status": "ok", "ready": st.engine is not None, "version": __version__,
                      "error": st.load_error})

    @open_routes.get("/health/ready", response_model=HealthModel, responses={503: {"model": HealthModel}})
    async def ready() -> Response:
        ok = st.engine is not None
        return _json({"status": "ok" if ok else ("failed" if st.load_error else "loading"), "ready": ok,
                      "version": __version__, "error": st.load_error}, 200 if ok else 503)

    # ------------------------------------------------------------------------------------- info
    @v1.get("/info", responses=_responses())
    async def info() -> Response:
        engine = st.require_engine()
        # Read-only, so not queued behind running jobs on the model thread.
        data = {k: _jsonable(v) for k, v in (await run_in_threadpool(engine.info)).items()}
        classes: Any = None
        if hasattr(engine, "list_classes"):
            with contextlib.suppress(Exception):
                classes = _jsonable(await run_in_threadpool(lambda: _call_registry(engine.list_classes)))
        data.update({
            "api": API, "server_version": __version__, "classes": classes,
            "limits": {"max_upload_bytes": settings.max_upload_bytes, "max_voxels": settings.max_voxels,
                       "max_prompt_chars": settings.max_prompt_chars, "max_prompts": settings.max_prompts,
                       "cache_bytes": settings.cache_bytes, "max_active_jobs": settings.max_active_jobs},
            "image_cache": st.images.stats(),
            "jobs": {s: sum(1 for j in st.jobs.values() if j.status == s) for s in ("queued", "running", *FINAL)},
            "codecs": list(wire.CODECS[:2]),
        })
        return _json(data)

    def _call_registry(fn: Callable, *args: Any, **kwargs: Any) -> Any:
        kwargs["registry"] = settings.registry
        return fn(*args, **_filtered(fn, kwargs))

    @v1.delete("/cache", responses=_responses())
    async def clear_cache() -> Response:
        """Empty the engine's embedding cache (Engine.clear_cache); uploaded images stay."""
        engine = st.require_engine()
        await st.on_model(engine.clear_cache)
        return _json({"cleared": True})

    # ------------------------------------------------------------------------------------- images
    upload_body = {"requestBody": {"required": True, "description": "an RCMA array frame (rcmed_engine.wire) or a "
                                                                     "NIfTI (.nii, .nii.gz) or NRRD file",
                                   "content": {"application/octet-stream": {"schema": {"type": "string",
                                                                                       "format": "binary"}}}}}

    @v1.post("/images", status_code=201, openapi_extra=upload_body,
             responses=_responses(_200=ImageModel, _201=ImageModel))
    async def upload_image(request: Request) -> Response:
        limit = settings.max_upload_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise ApiError(400, "Content-Length must be a whole number")
            if int(declared) > limit:
                raise ApiError(413, f"the upload is {int(declared)} bytes; this server's limit is {limit} bytes")
        body = bytearray()
        try:
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise ApiError(413, f"the upload is over this server's limit of {limit} bytes")
        except ClientDisconnect:
            log.info("an upload was cut off after %d bytes; nothing was stored", len(body))
            return _error(400, "the upload was cut off; nothing was stored")
        if declared is not None and len(body) != int(declared):
            raise ApiError(400, f"the upload is truncated: {len(body)} of {declared} bytes arrived")
        if not body:
            raise ApiError(400, "the upload is empty: send an RCMA array frame or a NIfTI/NRRD file")
        desc, created = await run_in_threadpool(_ingest, st, bytes(body))
        return _json(desc, 201 if created else 200)

    def _image(image_id: str) -> Volume:
        volume = st.images.get(image_id)
        if volume is None:
            raise ApiError(404, f"unknown image {image_id}: it was never uploaded or was evicted from the "
                                "image cache; upload it again")
        return volume

    @v1.get("/images/{image_id}", responses=_responses(_200=ImageModel))
    async def get_image(image_id: str = PathParam(pattern=ID_PATTERN)) -> Response:
        return _json(_describe(image_id, _image(image_id), existed=True))

    @v1.head("/images/{image_id}", responses=_responses())
    async def has_image(image_id: str = PathParam(pattern=ID_PATTERN)) -> Response:
        _image(image_id)
        return Response(status_code=200)

    @v1.delete("/images/{image_id}", responses=_responses())
    async def delete_image(image_id: str = PathParam(pattern=ID_PATTERN)) -> Response:
        if not st.images.remove(image_id):
            raise ApiError(404, f"unknown image {image_id}")
        return _json({"deleted": image_id})

    @v1.post("/images/{image_id}/prepare", responses=_responses(_200=PrepareResponse))
    async def prepare_image(req: PrepareRequest, image_id: str = PathParam(pattern=ID_PATTERN)) -> Response:
        engine = st.require_engine()
        volume = _image(image_id)
        n = _n_slices(volume, req.axis)
        if req.slices is not None and not all(0 <= s < n for s in req.slices):
            raise ApiError(422, f"slice indices must lie in 0..{n - 1} along the {req.axis} axis")
        _check_modality(req.modality)
        keys = await st.on_model(lambda: engine.set_image(volume, modality=req.modality, axis=req.axis,
                                                          slices=req.slices))
        return _json({"keys": list(keys)})

    # ------------------------------------------------------------------------------------- segment
    def _n_slices(volume: Volume, axis: str) -> int:
        try:
            frame = volume.slice_frame(axis)
        except ValueError as exc:
            raise ApiError(422, _one_line(exc)) from None
        return int(volume.array.shape[frame.slice_axis])

    def _check_modality(modality: str | None) -> None:
        if modality is None or modality == "auto":
            return
        from .preprocess import canonical_modality

        try:
            canonical_modality(modality)
        except ValueError as exc:
            raise ApiError(422, _one_line(exc)) from None

    def _check_prompts(req: SegmentRequest) -> list[str]:
        from .prompts import parse_targets

        if (req.prompt is None) == (req.prompts is None):
            raise ApiError(422, "give either prompt or prompts")
        prompts = [req.prompt] if req.prompt is not None else list(req.prompts or [])
        if len(prompts) > settings.max_prompts:
            raise ApiError(413, f"{len(prompts)} prompts in one request; this server's limit is {settings.max_prompts}")
        for p in prompts:
            if len(p) > settings.max_prompt_chars:
                raise ApiError(413, f"the prompt is {len(p)} characters long; this server's limit is "
                                    f"{settings.max_prompt_chars}")
            try:
                parse_targets(p)
            except ValueError as exc:
                raise ApiError(422, _one_line(exc)) from None
        return prompts

    async def _encode(results: list, image_id: str, codec: str) -> bytes:
        def run() -> bytes:
            data = {"image": image_id, "results": [result_to_wire(r, codec) for r in results]}
            return json.dumps(data, separators=(",", ":"), allow_nan=False).encode()

        return await run_in_threadpool(run)

    @v1.post("/segment", responses=_responses(409, 501, _200=SegmentResponse, _202=JobModel))
    async def segment(req: SegmentRequest, request: Request) -> Response:
        from .engine import Cancelled, Engine

        st.require_engine()
        prompts = _check_prompts(req)
        _check_modality(req.modality)
        if req.idempotency_key and req.idempotency_key in st.jobs_by_key:
            job = st.jobs.get(st.jobs_by_key[req.idempotency_key])
            if job is not None:
                return _json(job.public(), 202, {"Location": f"/{API}/jobs/{job.id}"})
        volume = _image(req.image)
        n = _n_slices(volume, req.axis)
        slices = None if req.slices is None else (req.slices[0], req.slices[1])
        try:
            lo, hi = Engine._check_range(slices, n)
        except ValueError as exc:
            raise ApiError(422, _one_line(exc)) from None
        if req.registry:
            if not _accepts(st.engine.segment_many, "registry"):
                raise ApiError(501, "this engine has no class registry (one-shot adaptation) yet")
            _require_registry(st.engine)
        params = {"modality": req.modality, "axis": req.axis, "slices": slices, "registry": req.registry}

        if hi - lo == 1 and not req.job:
            try:
                results = await st.on_model(lambda: st.segment_now(volume, prompts, params))
            except Cancelled:
                raise ApiError(409, "cancelled") from None
            except ValueError as exc:
                raise ApiError(422, _one_line(exc)) from None
            return Response(await _encode(results, req.image, req.codec), media_type="application/json")

        st.purge_jobs()
        active = sum(1 for j in st.jobs.values() if j.status not in FINAL)
        if active >= settings.max_active_jobs:
            raise ApiError(503, f"{active} jobs are queued or running, this server's limit; retry later",
                           {"Retry-After": "2"})
        job = Job(id=uuid.uuid4().hex, image=req.image, prompts=prompts, total=hi - lo, key=req.idempotency_key)
        st.jobs[job.id] = job
        if job.key:
            st.jobs_by_key[job.key] = job.id
        st.gpu.submit(st.run_job, job, volume, params)
        return _json(job.public(), 202, {"Location": f"/{API}/jobs/{job.id}"})

    # ------------------------------------------------------------------------------------- jobs
    @v1.get("/jobs", responses=_responses(_200=JobsModel))
    async def list_jobs() -> Response:
        st.purge_jobs()
        return _json({"jobs": [j.public() for j in st.jobs.values()]})

    @v1.get("/jobs/{job_id}", responses=_responses(_200=JobModel))
    async def job_status(job_id: str = PathParam(pattern=JOB_PATTERN),
                         wait: float = Query(0.0, ge=0.0, le=600.0, description="long poll: wait up to this "
                                             "many seconds for a change"),
                         since: int = Query(-1, ge=-1, le=1 << 62,
                                            description="the version the client has seen"),
                         final: bool = Query(False, description="with wait: return only when the job has "
                                             "ended (or the wait is over), not on progress")) -> Response:
        job = st.get_job(job_id)
        await _wait(job, wait, since, final)
        return _json(job.public())

    async def _wait(job: Job, wait: float, since: int = -1, final: bool = True) -> None:
        """Long poll: until the job changes from version ``since`` (or ends, with ``final``), at most ``wait`` s."""
        end = time.monotonic() + min(wait, settings.max_wait_s)
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

    @v1.get("/jobs/{job_id}/result", responses=_responses(409, _200=SegmentResponse))
    async def job_result(job_id: str = PathParam(pattern=JOB_PATTERN), codec: Codec = "zstd",
                         wait: float = Query(0.0, ge=0.0, le=600.0, description="long poll: wait up to this "
                                             "many seconds for the job to end")) -> Response:
        job = st.get_job(job_id)
        await _wait(job, wait)
        if job.status == "cancelled":
            raise ApiError(409, f"job {job_id} was cancelled; it has no result")
        if job.status == "failed":
            raise ApiError(409, f"job {job_id} failed: {job.error}")
        if job.status != "done" or job.results is None:
            raise ApiError(409, f"job {job_id} is {job.status} ({job.done}/{job.total}); poll /{API}/jobs/{job_id}")
        if codec not in job.encoded:
            job.encoded[codec] = await _encode(job.results, job.image, codec)
        return Response(job.encoded[codec], media_type="application/json")

    @v1.delete("/jobs/{job_id}", responses=_responses(_200=JobModel))
    async def cancel_job(job_id: str = PathParam(pattern=JOB_PATTERN)) -> Response:
        job = st.get_job(job_id)
        if job.status not in FINAL:
            job.cancel.set()
            if job.status == "queued":  # never started: it is cancelled now
                job.status, job.error, job.finished = "cancelled", "cancelled by the client", time.time()
                st.notify(job)
        return _json(job.public())

    # ------------------------------------------------------------------------------------- classes
    def _registry_method(name: str) -> Callable:
        engine = st.require_engine()
        fn = getattr(engine, name, None)
        if fn is None:
            raise ApiError(501, "this engine has no class registry (one-shot adaptation) yet: "
                                f"Engine.{name} is missing")
        _require_registry(engine)
        return fn

    def _require_registry(engine: Any) -> None:
        if settings.registry is None and getattr(engine, "registry", None) is None:
            raise ApiError(501, "this server has no class registry (one-shot adaptation): start it with "
                                "rcmed serve --registry DIR")

    @v1.get("/classes", responses=_responses(501, _200=ClassesModel))
    async def list_classes() -> Response:
        fn = _registry_method("list_classes")
        classes = await st.on_model(lambda: _call_registry(fn))
        return _json({"classes": _jsonable(list(classes or []))})

    @v1.post("/classes", status_code=201, responses=_responses(409, 501, _201=ClassModel))
    async def register_class(req: RegisterRequest) -> Response:
        fn = _registry_method("register_class")
        volume = _image(req.image)
        mask = await run_in_threadpool(wire.decode_labels, req.mask.model_dump(), settings.max_voxels)
        if tuple(mask.shape) != tuple(volume.array.shape[:3]):
            raise ApiError(422, f"the mask's shape {list(mask.shape)} differs from the image's "
                                f"{list(volume.array.shape[:3])}")
        if not mask.any():
            raise ApiError(422, "the mask is empty: outline the structure on at least one slice")
        n = _n_slices(volume, req.axis)
        if req.slice is not None and req.slice >= n:
            raise ApiError(422, f"slice {req.slice} is out of bounds: the {req.axis} axis has slices 0..{n - 1}")
        mask_volume = Volume(mask, volume.geometry, {})

        def run() -> Any:
            return _call_registry(fn, volume, mask_volume, req.name, label=req.label, axis=req.axis, slice=req.slice,
                                  modality=req.modality)

        try:
            info = await st.on_model(run)
        except ValueError as exc:
            raise ApiError(422, _one_line(exc)) from None
        return _json({"name": req.name, "info": _jsonable(info)}, 201)

    @v1.delete("/classes/{name}", responses=_responses(501, _200=ClassModel))
    async def remove_class(name: str = PathParam(min_length=1, max_length=200)) -> Response:
        fn = _registry_method("remove_class")
        try:
            info = await st.on_model(lambda: _call_registry(fn, name))
        except KeyError:
            raise ApiError(404, f"no class named {name!r} is registered") from None
        except ValueError as exc:
            raise ApiError(422, _one_line(exc)) from None
        if info is False:
            raise ApiError(404, f"no class named {name!r} is registered")
        return _json({"name": name, "info": _jsonable(info)})

    app.include_router(open_routes)
    app.include_router(v1)
    return app


# ----------------------------------------------------------------------------------------- serve
def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(engine: Any, settings: ServerSettings | None = None, *, log_level: str = "info",
          out: Any = None) -> int:
    """Run the server until interrupted (``rcmed serve``). ``engine``: an Engine or a callable that
    loads one. Prints where it listens and, when it generated one, the token. Returns 0, or raises
    RuntimeError when the model failed to load."""
    import uvicorn

    out = out or sys.stdout
    settings = settings or ServerSettings()
    token, generated = settings.resolved_token()
    settings = ServerSettings(**{**settings.__dict__, "token": token})
    app = create_app(engine, settings)
    st: _State = app.state.rcmed
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=log_level,
                            access_log=log_level == "debug", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)

    def stop_on_failure(message: str) -> None:
        server.should_exit = True

    st.on_load_error = stop_on_failure
    import socket

    try:
        infos = socket.getaddrinfo(settings.host, settings.port, type=socket.SOCK_STREAM)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(infos[0][4])
    except OSError as exc:
        raise RuntimeError(f"cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}") from None
    if not is_loopback(settings.host):
        print(f"rcmed serve: warning: listening on {settings.host}, not loopback: anyone who can reach this "
              "address and knows the token can use the engine; put TLS in front of it", file=sys.stderr)
    print(f"rcmed serve: http://{settings.host}:{settings.port}/{API} (preset loading in the background; "
          f"GET /{API}/health/ready says when it is ready)", file=out, flush=True)
    if generated:
        print(f"rcmed serve: generated token (give it to clients with --token or RCMED_TOKEN): {token}",
              file=out, flush=True)
    server.run()
    if st.load_error:
        raise RuntimeError(f"the model failed to load: {st.load_error}")
    return 0
