"""``RemoteEngine``: the Engine's methods over HTTP, against ``rcmed serve`` (rcmed_engine.server).

It returns the same ``SegmentResult`` and raises the same ``EngineError`` (bad input) and
``Cancelled`` as the local Engine, so a caller (the Slicer layer, ``rcmed segment --server``) does not
care which one it holds::

    engine = RemoteEngine("http://gpu-box:8765", token="...")   # or RCMED_TOKEN
    result = engine.segment(volume, "liver", progress=lambda done, total: ..., cancel=event)

Images are uploaded once, named by their content hash; an image the server evicted is uploaded
again. A volume runs as a server job, followed by long polling (progress callback) and cancelled on
the server when ``cancel.is_set()``. Connection errors and 502/503/504 are retried with exponential
backoff; a job the server lost (it restarted) is submitted again once the server is back.
"""

from __future__ import annotations

import os
import random
import threading
import time
import uuid
from collections import OrderedDict
from typing import Any, Callable, Sequence
from urllib.parse import quote

import httpx
import numpy as np

from . import wire
from .geometry import Volume

from .results import Cancelled, CancelToken, EngineError, SegmentResult, as_volume  # the local Engine's own types

ProgressCallback = Callable[[int, int], None]

_RETRY_STATUS = (502, 503, 504)
_CONNECTION_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError, httpx.ReadError,
                      httpx.WriteError, httpx.PoolTimeout)


class RemoteError(RuntimeError):
    """The server failed or refused in a way the request cannot fix; the message says why."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class RemoteUnavailable(RemoteError, ConnectionError):
    """The server could not be reached (after the retries)."""


class RemoteAuthError(RemoteError, PermissionError):
    """The server refused the token."""


class RemoteNotFound(RemoteError, LookupError):
    """The server does not know the image, job or class."""


class RemoteNotImplemented(RemoteError, NotImplementedError):
    """The server's engine lacks the feature (e.g. one-shot adaptation)."""


class _JobLost(Exception):
    pass


class RemoteEngine:
    """An Engine on another machine (``rcmed serve``), with the local Engine's methods.

    Args:
        url: ``http://host:port`` (``/v1`` is added when missing).
        token: the server's bearer token (default: RCMED_TOKEN).
        connect_timeout, read_timeout, write_timeout: seconds (httpx timeouts).
        retries: tries after the first on connection errors and 502/503/504, with exponential
            backoff from ``backoff`` seconds up to ``max_backoff`` (plus jitter).
        codec: "zstd" (default) or "gzip" for uploads and masks.
        poll_wait: seconds one long poll of a job may wait on the server (also the cancel latency).
    """

    def __init__(self, url: str, token: str | None = None, *, connect_timeout: float = 5.0,
                 read_timeout: float = 120.0, write_timeout: float = 120.0, retries: int = 5,
                 backoff: float = 0.25, max_backoff: float = 8.0, codec: str = "zstd", level: int = 1,
                 poll_wait: float = 0.5) -> None:
        if codec not in ("zstd", "gzip"):
            raise EngineError(f"codec must be zstd or gzip, got {codec!r}")
        base = url.rstrip("/")
        if not base.startswith(("http://", "https://")):
            raise EngineError(f"--server must be an http:// or https:// URL, got {url!r}")
        if not base.endswith("/v1"):
            base += "/v1"
        self.url = base
        token = (token or os.environ.get("RCMED_TOKEN") or "").strip()
        if not token:
            raise EngineError("the RCMed server needs a token: pass --token or set RCMED_TOKEN")
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.codec = codec
        self.level = level
        self.poll_wait = poll_wait
        self._known: OrderedDict[str, None] = OrderedDict()  # image ids the server is believed to hold
        self._lock = threading.Lock()
        self._info: dict[str, Any] | None = None
        self._http = httpx.Client(
            base_url=base, headers={"Authorization": f"Bearer {token}", "User-Agent": "rcmed-remote-engine"},
            timeout=httpx.Timeout(connect=connect_timeout, read=max(read_timeout, poll_wait + 10.0),
                                  write=write_timeout, pool=connect_timeout),
            follow_redirects=False)

    # ----------------------------------------------------------------------------------------- plumbing
    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "RemoteEngine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _sleep(self, attempt: int, response: httpx.Response | None = None) -> None:
        delay = min(self.max_backoff, self.backoff * 2 ** attempt) * (0.5 + random.random() / 2)
        if response is not None:
            with_retry = response.headers.get("Retry-After", "")
            if with_retry.replace(".", "", 1).isdigit():
                delay = min(self.max_backoff, max(delay, float(with_retry)))
        time.sleep(delay)

    def _request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        """One request, retried on connection errors and 502/503/504; returns any other answer."""
        attempt = 0
        while True:
            try:
                response = self._http.request(method, path, **kw)
            except _CONNECTION_ERRORS as exc:
                if attempt >= self.retries:
                    raise RemoteUnavailable(f"cannot reach the RCMed server at {self.url} after {attempt + 1} "
                                            f"tries ({type(exc).__name__}: {exc or 'connection failed'})") from None
                self._sleep(attempt)
                attempt += 1
                continue
            except httpx.TimeoutException as exc:
                raise RemoteError(f"the RCMed server at {self.url} did not answer {method} {path} in time "
                                  f"({type(exc).__name__})") from None
            if response.status_code in _RETRY_STATUS and attempt < self.retries:
                self._sleep(attempt, response)
                attempt += 1
                continue
            return response

    @staticmethod
    def _message(response: httpx.Response) -> str:
        try:
            data = response.json()
            if isinstance(data, dict) and isinstance(data.get("error"), str):
                return data["error"]
        except ValueError:
            pass
        return " ".join(response.text.split())[:300] or response.reason_phrase

    def _check(self, response: httpx.Response) -> httpx.Response:
        code = response.status_code
        if code < 400:
            return response
        message = self._message(response)
        if code == 401:
            raise RemoteAuthError(f"the RCMed server refused the token: {message}", code)
        if code in (400, 413, 422):
            raise EngineError(message)
        if code == 404:
            raise RemoteNotFound(message, code)
        if code == 501:
            raise RemoteNotImplemented(message, code)
        raise RemoteError(f"the RCMed server answered {code}: {message}", code)

    def _json(self, method: str, path: str, **kw: Any) -> Any:
        return self._check(self._request(method, path, **kw)).json()

    # ----------------------------------------------------------------------------------------- images
    def _remember(self, ident: str) -> None:
        with self._lock:
            self._known[ident] = None
            self._known.move_to_end(ident)
            while len(self._known) > 256:
                self._known.popitem(last=False)

    def _forget(self, ident: str) -> None:
        with self._lock:
            self._known.pop(ident, None)

    def _wire_image(self, image: Volume | np.ndarray,
                    rgb: bool | None = None) -> tuple[str, np.ndarray, Any, dict[str, str]]:
        volume = as_volume(image, rgb)
        try:
            array, geometry, meta = wire.as_wire_volume(volume)
        except wire.WireError as exc:
            raise EngineError(str(exc)) from None
        return wire.image_id(array, geometry, meta), array, geometry, meta

    def _upload(self, ident: str, array: np.ndarray, geometry: Any, meta: dict[str, str]) -> None:
        frame = wire.encode_frame(array, geometry, meta, ident, self.codec, self.level)
        data = self._json("POST", "/images", content=frame,
                          headers={"Content-Type": "application/octet-stream"})
        if data.get("id") != ident:
            raise RemoteError(f"the server named the upload {data.get('id')}, not {ident}")
        self._remember(ident)

    def _ensure(self, image: tuple[str, np.ndarray, Any, dict[str, str]], force: bool = False) -> str:
        ident = image[0]
        if not force and ident in self._known:
            return ident
        if not force:
            response = self._request("HEAD", f"/images/{ident}")
            if response.status_code == 200:
                self._remember(ident)
                return ident
            if response.status_code != 404:
                self._check(response)
        self._forget(ident)
        self._upload(*image)
        return ident

    def upload(self, image: Volume | np.ndarray, rgb: bool | None = None) -> str:
        """Upload an image (unless the server holds it already); returns its id."""
        return self._ensure(self._wire_image(image, rgb))

    # ----------------------------------------------------------------------------------------- info
    def info(self) -> dict[str, Any]:
        self._info = self._json("GET", "/info")
        return dict(self._info)

    def _cached_info(self, key: str) -> Any:
        if self._info is None:
            self.info()
        return self._info.get(key)  # type: ignore[union-attr]

    @property
    def preset(self) -> str:
        return self._cached_info("preset")

    @property
    def device(self) -> str:
        return self._cached_info("device")

    @property
    def weights_sha256(self) -> str:
        return self._cached_info("weights_sha256")

    def clear_cache(self) -> None:
        """Empty the server engine's embedding cache (uploaded images stay)."""
        self._json("DELETE", "/cache")

    def forget_image(self, image: Volume | np.ndarray | str, rgb: bool | None = None) -> bool:
        """Drop an image from the server; True when it was there."""
        ident = image if isinstance(image, str) else self._wire_image(image, rgb)[0]
        self._forget(ident)
        response = self._request("DELETE", f"/images/{ident}")
        if response.status_code == 404:
            return False
        self._check(response)
        return True

    def health(self) -> dict[str, Any]:
        return self._request("GET", "/health").json()

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Block until the server's model is loaded (RemoteUnavailable after ``timeout`` seconds)."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            try:
                response = self._http.get("/health/ready")
                if response.status_code == 200:
                    return
                last = self._message(response)
                if '"failed"' in response.text:
                    raise RemoteError(f"the RCMed server's model failed to load: {last}")
            except _CONNECTION_ERRORS as exc:
                last = type(exc).__name__
            time.sleep(0.1)
        raise RemoteUnavailable(f"the RCMed server at {self.url} was not ready within {timeout:.0f} s ({last})")

    # ----------------------------------------------------------------------------------------- segment
    def set_image(self, image: Volume | np.ndarray, modality: str | None = None, axis: str = "axial",
                  slices: Sequence[int] | None = None, rgb: bool | None = None) -> list[str]:
        """Upload the image and have the server compute and cache its prompt-free work."""
        wired = self._wire_image(image, rgb)
        body = {"modality": modality, "axis": axis, "slices": None if slices is None else [int(s) for s in slices]}
        for attempt in range(3):
            ident = self._ensure(wired, force=attempt > 0)
            response = self._request("POST", f"/images/{ident}/prepare", json=body)
            if response.status_code == 404:
                continue  # evicted between upload and use: upload again
            return list(self._check(response).json()["keys"])
        raise RemoteError("the server kept evicting the image before it could be used; its image cache is too "
                          "small for the load")

    def segment(self, image: Volume | np.ndarray, prompt: str, *, modality: str | None = None,
                axis: str = "axial", slices: tuple[int | None, int | None] | None = None,
                progress: ProgressCallback | None = None, cancel: CancelToken | None = None,
                registry: Any = None, rgb: bool | None = None) -> SegmentResult:
        """Segment what ``prompt`` names, on the server (see Engine.segment)."""
        return self.segment_many(image, [prompt], modality=modality, axis=axis, slices=slices,
                                 progress=progress, cancel=cancel, registry=registry, rgb=rgb)[0]

    def segment_many(self, image: Volume | np.ndarray, prompts: Sequence[str], *, modality: str | None = None,
                     axis: str = "axial", slices: tuple[int | None, int | None] | None = None,
                     progress: ProgressCallback | None = None, cancel: CancelToken | None = None,
                     registry: Any = None, rgb: bool | None = None) -> list[SegmentResult]:
        """Several prompts on one image, on the server (see Engine.segment_many).

        ``registry``: None lets the server decide (its class registry when it has one); a truthy
        value asks for the server's registry, False turns one-shot adaptation off.
        """
        started = time.perf_counter()
        if isinstance(prompts, str):
            prompts = [prompts]
        wired = self._wire_image(image, rgb)
        body: dict[str, Any] = {
            "prompts": [str(p) for p in prompts], "modality": modality, "axis": axis,
            "slices": None if slices is None else [None if s is None else int(s) for s in slices],
            "registry": None if registry is None else bool(registry), "codec": self.codec,
        }
        resubmits = 0
        evictions = 0
        while True:
            if cancel is not None and cancel.is_set():
                raise Cancelled("cancelled; nothing was written")
            body["image"] = self._ensure(wired, force=evictions > 0)
            body["idempotency_key"] = uuid.uuid4().hex
            response = self._request("POST", "/segment", json=body)
            if response.status_code == 404:  # the image was evicted: upload it again
                evictions += 1
                if evictions > 3:
                    raise RemoteError("the server kept evicting the image before it could be used; its image "
                                      "cache is too small for the load")
                continue
            self._check(response)
            if response.status_code == 200:
                data = response.json()
                break
            job = response.json()
            try:
                data = self._follow(job, progress, cancel)
                break
            except _JobLost:
                resubmits += 1
                if resubmits > 2:
                    raise RemoteError(f"the RCMed server at {self.url} lost job {job['id']} {resubmits} times "
                                      "(it keeps restarting)") from None
        results = [self._result(r, wired[1].shape[:3]) for r in data["results"]]
        elapsed = time.perf_counter() - started
        for r in results:
            r.timings["remote_total_s"] = elapsed
        return results

    def _follow(self, job: dict[str, Any], progress: ProgressCallback | None, cancel: CancelToken | None) -> Any:
        """Poll a job to its end; returns the result JSON or raises Cancelled/EngineError/RemoteError."""
        job_id = job["id"]
        shown: tuple[int, int] | None = None
        if progress:
            progress(0, int(job["total"]))
            shown = (0, int(job["total"]))
        while True:
            if cancel is not None and cancel.is_set():
                with_error = self._request("DELETE", f"/jobs/{job_id}")
                if with_error.status_code not in (200, 404):
                    self._check(with_error)
                raise Cancelled("cancelled; nothing was written")
            try:
                if progress is None:  # nothing to show: ask for the result, which waits for the job's end
                    response = self._request("GET", f"/jobs/{job_id}/result",
                                             params={"codec": self.codec, "wait": self.poll_wait})
                    if response.status_code == 200:
                        return response.json()
                    if response.status_code == 409:  # not done: the status says why
                        response = self._request("GET", f"/jobs/{job_id}")
                else:
                    response = self._request("GET", f"/jobs/{job_id}",
                                             params={"wait": self.poll_wait, "since": job["version"]})
            except RemoteUnavailable as exc:
                raise RemoteUnavailable(f"{exc}; job {job_id} was running there and is lost") from None
            if response.status_code == 404:
                raise _JobLost(job_id)
            job = self._check(response).json()
            now = (int(job["done"]), int(job["total"]))
            if progress and now != shown:
                progress(*now)
                shown = now
            status = job["status"]
            if status == "done":
                response = self._request("GET", f"/jobs/{job_id}/result", params={"codec": self.codec})
                if response.status_code == 404:
                    raise _JobLost(job_id)
                return self._check(response).json()
            if status == "cancelled":
                raise Cancelled(job.get("error") or "cancelled on the server; nothing was written")
            if status == "failed":
                if job.get("error_kind") == "invalid":
                    raise EngineError(job.get("error") or "the server could not do this request")
                raise RemoteError(f"job {job_id} failed on the server: {job.get('error')}")

    def refine(self, image: Volume | np.ndarray, prompt: str, clicks: Sequence[Any], *,
               boxes: Sequence[Any] | None = None, previous: SegmentResult | Volume | np.ndarray | None = None,
               propagate: bool = True, modality: str | None = None, axis: str = "axial",
               slices: tuple[int | None, int | None] | None = None, progress: ProgressCallback | None = None,
               cancel: CancelToken | None = None, rgb: bool | None = None, text: bool = True) -> SegmentResult:
        """Correct what ``prompt`` gave with clicks and boxes, on the server (see Engine.refine): the same
        masks as the local engine. One request (``POST /v1/images/{id}/refine``) that the server answers
        ahead of queued jobs: progress goes from 0 to 1, and ``cancel`` is looked at before it is sent."""
        from .clicks import Box, Click, parse_box, parse_click

        started = time.perf_counter()
        clicks = [c if isinstance(c, Click) else parse_click(str(c)) for c in clicks or ()]
        boxes = [b if isinstance(b, Box) else parse_box(str(b)) for b in boxes or ()]
        wired = self._wire_image(image, rgb)
        body: dict[str, Any] = {
            "prompt": str(prompt), "clicks": [c.to_json() for c in clicks], "boxes": [b.to_json() for b in boxes],
            "previous": self._previous_json(previous), "propagate": bool(propagate), "modality": modality,
            "axis": axis, "slices": None if slices is None else [None if s is None else int(s) for s in slices],
            "text": bool(text), "codec": self.codec,
        }
        if progress:
            progress(0, 1)
        for attempt in range(4):
            if cancel is not None and cancel.is_set():
                raise Cancelled("cancelled; nothing was written")
            ident = self._ensure(wired, force=attempt > 0)
            response = self._request("POST", f"/images/{ident}/refine", json=body)
            if response.status_code == 404 and "unknown image" in self._message(response):
                continue  # evicted between upload and use: upload again
            data = self._check(response).json()
            break
        else:
            raise RemoteError("the server kept evicting the image before it could be used; its image cache is too "
                              "small for the load")
        result = self._result(data["results"][0], wired[1].shape[:3])
        result.timings["remote_total_s"] = time.perf_counter() - started
        if progress:
            progress(1, 1)
        return result

    def _previous_json(self, previous: SegmentResult | Volume | np.ndarray | None) -> dict[str, Any] | None:
        """The result to correct on the wire: its label map (wire section 4), its geometry, and for a
        SegmentResult the targets, axis and slices the server needs to treat it as the local engine does."""
        if previous is None:
            return None
        out: dict[str, Any] = {}
        if isinstance(previous, SegmentResult):
            labels, geometry = previous.labels, previous.geometry
            out.update(targets=list(previous.targets), axis=previous.axis, slices=[int(s) for s in previous.slices])
        elif isinstance(previous, Volume):
            labels, geometry = previous.array, previous.geometry
        else:
            labels, geometry = np.asarray(previous), None
        labels = np.asarray(labels)
        if labels.ndim != 3:
            raise EngineError(f"the earlier result must be a (z, y, x) label map on the image's grid, got shape "
                              f"{labels.shape}")
        if labels.dtype != np.uint8:
            if labels.dtype != np.bool_ and labels.size and (labels.min() < 0 or labels.max() > 255):
                raise EngineError("the earlier result's labels must lie in 0..255")
            labels = labels.astype(np.uint8)
        out["labels"] = wire.encode_labels(np.ascontiguousarray(labels), self.codec)
        if geometry is not None:
            out["geometry"] = wire.geometry_to_json(geometry)
        return out

    @staticmethod
    def _result(data: dict[str, Any], shape: tuple[int, ...]) -> SegmentResult:
        try:
            labels = wire.decode_labels(data["labels"])
            presence = wire.decode_array(data["presence"])
            geometry = wire.geometry_from_json(data["geometry"])
        except (KeyError, wire.WireError) as exc:
            raise RemoteError(f"the server's answer is malformed: {exc}") from None
        if tuple(labels.shape) != tuple(shape):
            raise RemoteError(f"the server's label map has shape {labels.shape}, the image {tuple(shape)}")
        return SegmentResult(
            labels=labels, geometry=geometry, targets=list(data["targets"]), presence=presence.astype(np.float32),
            slices=(int(data["slices"][0]), int(data["slices"][1])), axis=data["axis"], modality=data["modality"],
            answer=data["answer"], prompt=data["prompt"], timings=dict(data["timings"]),
            provenance=dict(data["provenance"]), notes=[str(n) for n in data.get("notes", [])])

    # ----------------------------------------------------------------------------------------- classes
    def register_class(self, image: Volume | np.ndarray, mask: Volume | np.ndarray, name: str,
                       axis: str = "axial", slice_index: int | None = None, modality: str | None = None,
                       registry: Any = None, label: int | None = None, slice: int | None = None,
                       rgb: bool | None = None) -> Any:
        """Register a class in the server's registry from one labelled slice (see Engine.register_class);
        ``registry`` is the server's, whatever is passed here."""
        wired = self._wire_image(image, rgb)
        m = mask.array if isinstance(mask, Volume) else np.asarray(mask)
        if m.ndim == 2:
            m = m[None]
        if m.ndim != 3:
            raise EngineError(f"the mask must be 2D or 3D, got shape {m.shape}")
        if m.dtype != np.uint8:
            if m.dtype != np.bool_ and (m.min() < 0 or m.max() > 255):
                raise EngineError("mask values must lie in 0..255")
            m = m.astype(np.uint8)
        if slice is not None and slice_index is not None and int(slice) != int(slice_index):
            raise EngineError(f"slice_index={slice_index} and slice={slice} disagree; give one of them")
        k = slice_index if slice_index is not None else slice
        body = {"mask": wire.encode_labels(np.ascontiguousarray(m), self.codec), "name": name, "label": label,
                "axis": axis, "slice": None if k is None else int(k), "modality": modality}
        for attempt in range(3):
            body["image"] = self._ensure(wired, force=attempt > 0)
            response = self._request("POST", "/classes", json=body)
            if response.status_code == 404 and "unknown image" in self._message(response):
                continue
            return self._check(response).json().get("info")
        raise RemoteError("the server kept evicting the image before it could be used")

    def list_classes(self, registry: Any = None) -> list[Any]:
        return list(self._json("GET", "/classes")["classes"])

    def remove_class(self, name: str, registry: Any = None) -> Any:
        response = self._request("DELETE", f"/classes/{quote(name, safe='')}")
        if response.status_code == 404:
            raise KeyError(self._message(response))
        return self._check(response).json().get("info")
