"""The limits of ``ServerSettings``: upload bodies (bodies.py bounds every body on its way in), prompts and
active jobs. Crossing one answers 413 (or 503 for jobs, with Retry-After) and says which limit it was."""

from __future__ import annotations

import logging
import math

from fastapi import Depends, Request
from starlette.requests import ClientDisconnect

from .errors import ApiError, one_line
from .models import SegmentRequest
from .state import ServerState, get_state

log = logging.getLogger("rcmed.server")


async def upload_body(request: Request, st: ServerState = Depends(get_state)) -> bytes:
    """The raw body of an upload, read in full within the upload limit and checked against its length."""
    limit = st.settings.max_upload_bytes
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
        raise ApiError(400, "the upload was cut off; nothing was stored") from None
    if declared is not None and len(body) != int(declared):
        raise ApiError(400, f"the upload is truncated: {len(body)} of {declared} bytes arrived")
    if not body:
        raise ApiError(400, "the upload is empty: send an RCMA array frame or a NIfTI/NRRD file")
    return bytes(body)


def checked_prompts(st: ServerState, req: SegmentRequest) -> list[str]:
    """The request's prompts, within the count and length limits and each readable as targets."""
    settings = st.settings
    if (req.prompt is None) == (req.prompts is None):
        raise ApiError(422, "give either prompt or prompts")
    prompts = [req.prompt] if req.prompt is not None else list(req.prompts or [])
    if len(prompts) > settings.max_prompts:
        raise ApiError(413, f"{len(prompts)} prompts in one request; this server's limit is {settings.max_prompts}")
    for p in prompts:
        check_prompt(st, p)
    return prompts


def check_prompt(st: ServerState, prompt: str) -> None:
    """One prompt within the length limit (413) and readable as targets (422)."""
    from ..prompts import parse_targets

    if len(prompt) > st.settings.max_prompt_chars:
        raise ApiError(413, f"the prompt is {len(prompt)} characters long; this server's limit is "
                            f"{st.settings.max_prompt_chars}")
    try:
        parse_targets(prompt)
    except ValueError as exc:
        raise ApiError(422, one_line(exc)) from None


def check_job_slots(st: ServerState) -> None:
    """Refuse a new job while the queued and running ones are at the limit (503: the client retries)."""
    st.jobs.purge()
    active = st.jobs.active()
    if active >= st.settings.max_active_jobs:
        raise ApiError(503, f"{active} jobs are queued or running, this server's limit; retry later",
                       {"Retry-After": "2"})


def check_label_map_cost(st: ServerState, shape: list[int]) -> None:
    """A label map decodes to one byte a voxel, plus one mask's bits unpacked (up to a byte a voxel again)."""
    voxels = math.prod(max(1, int(n)) for n in shape)
    if voxels > st.settings.max_voxels:
        raise ApiError(413, f"the label map has {voxels} voxels; this server's limit is {st.settings.max_voxels}")
    cost = 2 * voxels + voxels // 8
    if cost > st.request_bytes:
        raise ApiError(413, f"decoding the label map would take about {cost >> 20} MB of memory, more than this "
                            f"server allows one request ({st.request_bytes >> 20} MB, --max-request-mb)")


def check_output_cost(st: ServerState, n_prompts: int, voxels: int) -> None:
    """A segment request's answer: one uint8 label map per prompt, and one more while it is encoded."""
    cost = (n_prompts + 1) * voxels
    if cost > st.request_bytes:
        raise ApiError(413, f"{n_prompts} label maps of {voxels} voxels would take about {cost >> 20} MB of memory, "
                            f"more than this server allows one request ({st.request_bytes >> 20} MB, "
                            "--max-request-mb); send fewer prompts per request")
