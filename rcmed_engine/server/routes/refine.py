"""Refining: clicks and boxes correct a prompt's mask on an image the server already holds (no re-upload).

The answer is a segment request's (``{"image", "results": [one result]}``). It runs on the model thread
as a waiting client's request, ahead of queued jobs, like a one-slice segment."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from ... import wire
from ...geometry import Volume
from ..auth import require_token
from ..checks import check_modality, n_slices
from ..errors import ApiError, one_line
from ..glue import encode_results
from ..limits import check_label_map_cost, check_output_cost, check_prompt
from ..models import API, ID_PATTERN, PreviousModel, RefineRequest, SegmentResponse, responses
from ..state import ServerState, get_state

router = APIRouter(prefix=f"/{API}", dependencies=[Depends(require_token)])


@router.post("/images/{image_id}/refine", responses=responses(409, 501, _200=SegmentResponse))
async def refine(req: RefineRequest, image_id: str = PathParam(pattern=ID_PATTERN),
                 st: ServerState = Depends(get_state)) -> Response:
    from ...engine import Cancelled, Engine

    engine = st.require_engine()
    if not callable(getattr(engine, "refine", None)):
        raise ApiError(501, "this engine cannot refine a mask with clicks yet")
    check_prompt(st, req.prompt)
    check_modality(req.modality)
    volume = st.image(image_id)
    check_output_cost(st, 1, math.prod(volume.array.shape[:3]))
    slices = None if req.slices is None else (req.slices[0], req.slices[1])
    try:
        Engine._check_range(slices, n_slices(volume, req.axis))
        clicks, boxes = _prompts(req)
    except ValueError as exc:
        raise ApiError(422, one_line(exc)) from None
    previous = await _previous(st, req.previous, volume)

    def run() -> Any:
        return engine.refine(volume, req.prompt, clicks, boxes=boxes, previous=previous, propagate=req.propagate,
                             modality=req.modality, axis=req.axis, slices=slices, text=req.text)

    try:
        result = await st.on_model(run)
    except Cancelled:
        raise ApiError(409, "cancelled") from None
    except ValueError as exc:  # EngineError: a click outside the image, a box without area, another grid...
        raise ApiError(422, one_line(exc)) from None
    return Response(await encode_results([result], image_id, req.codec), media_type="application/json")


def _prompts(req: RefineRequest) -> tuple[list, list]:
    """The request's clicks and boxes as the engine's own (a non-finite number is a one-line EngineError)."""
    from ...clicks import Box, Click

    clicks = [Click(tuple(c.ras), c.label == "include", c.target) for c in req.clicks]  # type: ignore[arg-type]
    boxes = [Box(tuple(b.corners_ras[0]), tuple(b.corners_ras[1]), b.target) for b in req.boxes]  # type: ignore[arg-type]
    return clicks, boxes


async def _previous(st: ServerState, prev: PreviousModel | None, volume: Volume) -> Any:
    """The result to correct, decoded off the event loop within the request budget: a SegmentResult when
    its targets, axis and slices came along (the slices it never reached are segmented first), else a Volume
    (every slice counts as done). Its grid is checked against the image's by the engine."""
    if prev is None:
        return None
    given = [prev.targets is not None, prev.axis is not None, prev.slices is not None]
    if any(given) and not all(given):
        raise ApiError(422, "previous: targets, axis and slices come together (or none of them)")
    if prev.slices is not None:  # bounded before the engine makes a set of them
        n = n_slices(volume, str(prev.axis))
        if not 0 <= prev.slices[0] < prev.slices[1] <= n:
            raise ApiError(422, f"previous: slices {prev.slices[0]}:{prev.slices[1]} are out of bounds: the "
                                f"{prev.axis} axis has slices 0:{n}")
    check_label_map_cost(st, prev.labels.shape)
    async with st.decoders.slot():
        labels = await run_in_threadpool(wire.decode_labels, prev.labels.model_dump(), st.settings.max_voxels)
    geometry = volume.geometry if prev.geometry is None else wire.geometry_from_json(prev.geometry.model_dump())
    if not all(given):
        return Volume(labels, geometry, {})
    from ...results import SegmentResult

    targets = list(prev.targets or [])
    return SegmentResult(labels=labels, geometry=geometry, targets=targets,
                         presence=np.full((len(targets), 1), np.nan, np.float32),
                         slices=(int(prev.slices[0]), int(prev.slices[1])),  # type: ignore[index]
                         axis=str(prev.axis), modality="", answer="", prompt="", timings={}, provenance={})
